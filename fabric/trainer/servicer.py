"""fabric.v1.TrainerService: a thin servicer over the running Trainer (status, metrics stream, control). Errors are
raised as FabricError (the Trainer's too); the server's ErrorInterceptor turns them into statuses."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fabric.errors import invalid
from fabric.trainer.loop import FINAL_STATES, Trainer
from fabric.trainer.report import to_proto
from fabric.v1 import trainer_pb2, trainer_pb2_grpc


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    async def GetStatus(self, request, context):
        t = self.trainer
        response = trainer_pb2.GetStatusResponse(
            state=t.state, step=t.step, max_steps=t.pc.max_steps, weight_version=t.version, message=t.message
        )
        if t.history:
            response.last_metrics.CopyFrom(to_proto(t.history[-1]))
        return response

    async def WatchMetrics(self, request, context):
        if request.since_step < 0:
            raise invalid("since_step", f"must be >= 0, got {request.since_step}")
        queue: asyncio.Queue = asyncio.Queue()
        self.trainer.subscribers.add(queue)
        try:
            if request.since_step:
                for metrics in list(self.trainer.history):
                    if metrics["step"] >= request.since_step:
                        yield trainer_pb2.WatchMetricsResponse(metrics=to_proto(metrics))
            if self.trainer.state in FINAL_STATES:
                return
            while (message := await queue.get()) is not None:
                yield trainer_pb2.WatchMetricsResponse(metrics=message)
        finally:
            self.trainer.subscribers.discard(queue)

    async def Pause(self, request, context):
        return trainer_pb2.PauseResponse(state=self.trainer.pause())

    async def Resume(self, request, context):
        return trainer_pb2.ResumeResponse(state=self.trainer.resume())

    async def SaveCheckpoint(self, request, context):
        t = self.trainer
        out = Path(t.pc.out).resolve()
        # a token holder names the folder, the trainer writes it: only under the trainer's own output folder
        path = (out / request.path).resolve() if request.path else out / "checkpoints" / f"step_{t.step}"
        if not path.is_relative_to(out) or path == out:
            raise invalid(
                "path",
                f"{request.path!r} is outside the trainer's output folder {out}: name a folder inside it "
                "(a relative path is taken from there)",
                "PATH_OUTSIDE_OUTPUT",
            )
        if path.exists() and any(path.iterdir()) and not (path / "config.json").exists():
            raise invalid("path", f"{path} exists and is not a checkpoint: pick an empty directory")
        async with t.lock:  # between steps: never a half-updated model
            saved = await t.save_checkpoint(path)
        return trainer_pb2.SaveCheckpointResponse(path=str(saved), step=t.step, weight_version=t.version)

    async def Stop(self, request, context):
        return trainer_pb2.StopResponse(state=self.trainer.stop())
