"""Issue 21: an unexpected exception's text (paths, values, secrets) does not reach clients: they get INTERNAL with an
id, and the server's log has the id with the trace. A real FabricServer over gRPC whose servicer hits a bug."""

from __future__ import annotations

import asyncio
import logging
import re

import grpc

from fabric.server import FabricServer
from fabric.v1 import trainer_pb2, trainer_pb2_grpc

SECRET = "/srv/private/key-material-42"


class Buggy(trainer_pb2_grpc.TrainerServiceServicer):
    async def GetStatus(self, request, context):
        raise RuntimeError(f"could not open {SECRET}")

    async def WatchMetrics(self, request, context):
        yield trainer_pb2.WatchMetricsResponse()
        raise KeyError(SECRET)


def test_unexpected_errors_answer_a_generic_message_with_an_id_in_the_log(caplog):
    async def go():
        servicer = Buggy()
        server = FabricServer(
            ["fabric.v1.TrainerService"], lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, s)
        )
        await server.start()
        errors = []
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = trainer_pb2_grpc.TrainerServiceStub(channel)
                try:
                    await stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    errors.append(exc)
                try:
                    _ = [m async for m in stub.WatchMetrics(trainer_pb2.WatchMetricsRequest(), timeout=10)]
                except grpc.aio.AioRpcError as exc:
                    errors.append(exc)
        finally:
            await server.stop(grace=1)
        return errors

    with caplog.at_level(logging.ERROR, logger="fabric.server"):
        errors = asyncio.run(go())
    assert len(errors) == 2
    for err in errors:
        assert err.code() == grpc.StatusCode.INTERNAL, err
        assert SECRET not in err.details() and SECRET not in (err.debug_error_string() or "")
        (error_id,) = re.findall(r"id ([0-9a-f]{12})", err.details())
        assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records), error_id
