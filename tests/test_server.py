"""What every fabric server shares (fabric/server.py), on a real gRPC server with only health and reflection:
the concurrent-call limit and the guard against bytes that are no message."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fabric.errors import error_info
from fabric.server import FabricServer


def serve(**kwargs) -> tuple[FabricServer, str]:
    server = FabricServer([], lambda s: None, **kwargs)
    return server, server.address


def test_calls_beyond_the_limit_are_resource_exhausted():
    async def scenario():  # health has a budget of its own (tests/security/test_health_budget.py): here 2 calls
        server, address = serve(max_concurrent_rpcs=2, open_call_slots=2)
        await server.start()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watches = [stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
            for watch in watches:
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            for watch in watches:
                watch.cancel()
            await asyncio.sleep(0.2)
            again = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # a freed slot serves again
        await server.stop(grace=1)
        return err.value, again

    err, again = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert again.status == health_pb2.HealthCheckResponse.SERVING


def test_bytes_that_are_no_message_are_invalid_argument_with_error_info():
    async def scenario():
        server, address = serve()
        await server.start()
        async with grpc.aio.insecure_channel(address) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await check(b"\xff\xff\xff", timeout=5)
            good = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        await server.stop(grace=1)
        return err.value, good

    err, good = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "do not parse" in err.details()
    info = error_info(err)
    assert info is not None and info.reason == "UNPARSEABLE_MESSAGE" and info.metadata["field"] == "request"
    assert good.status == health_pb2.HealthCheckResponse.SERVING
