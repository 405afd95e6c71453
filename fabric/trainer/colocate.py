"""Colocated generation and training (ROLL's default placement: actor_train and actor_infer on the same GPUs).

Generation and training take turns on the device. After a step's rollouts the trainer puts every rollout server to
sleep (actor_infer's `sleep_level`: 1 keeps the weights in host memory, 2 drops them), trains, then wakes the
servers in ROLL's two steps: the weights (and the new version is pushed into them), then the KV cache. Each phase's
free device memory is read from the servers (GetServerInfo) and reported, so a user sees what colocation saves.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from fabric.v1 import rollout_pb2, rollout_pb2_grpc

GiB = 2**30


@dataclass
class Colocation:
    stubs: list[rollout_pb2_grpc.RolloutServiceStub]  # the rollout pool's own, one per live server
    level: int
    timeout: float
    seconds: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)

    async def _each(self, call) -> list:
        return await asyncio.gather(*(call(stub) for stub in self.stubs))

    async def free_gib(self) -> float:
        """The least free device memory any server reports (0 on CPU)."""
        infos = await self._each(
            lambda stub: stub.GetServerInfo(rollout_pb2.RolloutServiceGetServerInfoRequest(), timeout=self.timeout)
        )
        return min((i.device_memory_free_bytes for i in infos), default=0) / GiB

    async def sleep(self) -> None:
        self.memory["gpu_free_gib_generating"] = await self.free_gib()
        started = time.perf_counter()
        await self._each(lambda stub: stub.Sleep(rollout_pb2.SleepRequest(level=self.level), timeout=self.timeout))
        self.seconds["sleep_seconds"] = time.perf_counter() - started
        self.memory["gpu_free_gib_asleep"] = await self.free_gib()

    async def wake(self, tags: list[str]) -> None:
        started = time.perf_counter()
        await self._each(lambda stub: stub.WakeUp(rollout_pb2.WakeUpRequest(tags=tags), timeout=self.timeout))
        self.seconds[f"wake_{tags[0]}_seconds"] = time.perf_counter() - started


def trainer_peak_gib() -> float:
    """The trainer's peak device memory since the last call (0 on CPU)."""
    if not torch.cuda.is_available():
        return 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak
