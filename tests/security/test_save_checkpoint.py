"""Issue 21: SaveCheckpoint writes only under the trainer's output folder, whatever path a token holder names.
A real TrainerService over gRPC; the trainer under it is a stand-in that records where it was asked to save (the
servicer, not the model, decides the folder)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from fabric.server import FabricServer
from fabric.trainer.servicer import TrainerServicer
from fabric.v1 import trainer_pb2, trainer_pb2_grpc


class RecordingTrainer:
    def __init__(self, out: Path):
        self.pc = SimpleNamespace(out=out)
        self.step, self.version, self.lock, self.saved = 2, 2, asyncio.Lock(), []

    async def save_checkpoint(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")
        self.saved.append(path)
        return path


def save(out: Path, paths: list[str]):
    async def go():
        trainer = RecordingTrainer(out)
        servicer = TrainerServicer(trainer)  # type: ignore[arg-type]
        server = FabricServer(
            ["fabric.v1.TrainerService"], lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, s)
        )
        await server.start()
        answers = []
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = trainer_pb2_grpc.TrainerServiceStub(channel)
                for path in paths:
                    try:
                        answers.append(
                            await stub.SaveCheckpoint(trainer_pb2.SaveCheckpointRequest(path=path), timeout=10)
                        )
                    except grpc.aio.AioRpcError as exc:
                        answers.append(exc)
        finally:
            await server.stop(grace=1)
        return answers, trainer.saved

    return asyncio.run(go())


@pytest.mark.parametrize("where", ["outside", "../escape", "{out}/../sibling", "{out}"])
def test_save_checkpoint_refuses_paths_outside_the_output_folder(tmp_path, where):
    out = tmp_path / "run"
    out.mkdir()
    target = str(tmp_path / "elsewhere") if where == "outside" else where.format(out=out)
    (answer,), saved = save(out, [target])
    assert isinstance(answer, grpc.aio.AioRpcError) and answer.code() == grpc.StatusCode.INVALID_ARGUMENT, answer
    assert "outside the trainer's output folder" in answer.details()
    assert saved == [] and not (tmp_path / "elsewhere").exists() and not (tmp_path / "escape").exists()


def test_save_checkpoint_writes_inside_the_output_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    answers, saved = save(out, ["", "mine", str(out / "abs")])
    assert [Path(a.path) for a in answers] == [out / "checkpoints" / "step_2", out / "mine", out / "abs"]
    assert saved == [out / "checkpoints" / "step_2", out / "mine", out / "abs"]
