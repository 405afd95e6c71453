"""TrainerService over a Trainer (no model, no pools): the servicer calls the Trainer's controls, and a FabricError
they raise reaches the client as a status with its reason."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from fabric.errors import error_info
from fabric.server import FabricServer
from fabric.trainer.servicer import TrainerServicer
from fabric.v1 import trainer_pb2, trainer_pb2_grpc
from tests.trainer.test_loop import make_trainer


def test_pause_resume_stop_and_a_refusal_after_the_end(tmp_path):
    async def scenario():
        trainer = make_trainer(tmp_path)
        trainer.state = trainer_pb2.TRAINER_STATE_RUNNING
        servicer = TrainerServicer(trainer)
        server = FabricServer(
            ["fabric.v1.TrainerService"], lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, s)
        )
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = trainer_pb2_grpc.TrainerServiceStub(channel)
                paused = await stub.Pause(trainer_pb2.PauseRequest())
                assert paused.state == trainer_pb2.TRAINER_STATE_PAUSED and not trainer.resume_event.is_set()
                resumed = await stub.Resume(trainer_pb2.ResumeRequest())
                assert resumed.state == trainer_pb2.TRAINER_STATE_RUNNING and trainer.resume_event.is_set()
                stopped = await stub.Stop(trainer_pb2.StopRequest())
                assert stopped.state == trainer_pb2.TRAINER_STATE_STOPPING and trainer.stop_requested
                trainer.state = trainer_pb2.TRAINER_STATE_FINISHED
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Pause(trainer_pb2.PauseRequest())
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert error_info(err.value).reason == "RUN_ENDED"
        finally:
            await server.stop(grace=0)

    asyncio.run(scenario())
