"""Weight sync and server membership: the policy's weights onto every live rollout server as the next version
(fabric.weights.sender: relay chain by default), the servers a push failed on taken out of routing, and a lost
server that answers again brought to the current version and routed to again (re-admission). The rollout servers
may start with `load_format: dummy`: the first push (version 1) happens before any rollout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from fabric.routing import RolloutPool
from fabric.trainer.colocate import Colocation
from fabric.weights.channels import ChannelCache
from fabric.weights.sender import WeightSource, push_weights, serving_dtype, weights_status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncSettings:
    mode: str | None  # weight_sync.mode: relay (the default) or direct
    transport: str  # weight_sync.transport
    chunk_bytes: int
    push_timeout_s: float
    rpc_timeout_s: float
    colocate: bool  # the servers sleep while the trainer trains (actor_infer's sleep_level)
    sleep_level: int


class WeightSync:
    """The version the rollout servers serve, and which of them the pool routes to."""

    def __init__(self, policy: Any, settings: SyncSettings):
        self.policy = policy
        self.settings = settings
        self.version = 0
        self.serving_dtype: torch.dtype | None = None
        self._pool: RolloutPool | None = None
        # Control channels kept from one version to the next: a colocated IPC update is mostly control plane.
        self.channels = ChannelCache()

    @property
    def pool(self) -> RolloutPool:
        if self._pool is None:
            raise RuntimeError("no rollout servers: the run has not started")
        return self._pool

    @pool.setter
    def pool(self, pool: RolloutPool) -> None:
        self._pool = pool

    def colocation(self) -> Colocation | None:
        """With colocation, the live servers to put to sleep while the trainer trains; else None."""
        s = self.settings
        return Colocation(self.pool.stubs(), s.sleep_level, s.rpc_timeout_s) if s.colocate else None

    async def push(self, targets: list[str] | None = None, version: int | None = None) -> float:
        """Pushes the policy's weights to every live rollout server, as the next version unless `version` says
        otherwise (re-admitting a server: the current one). A server the push fails on leaves routing. Returns the
        seconds it took."""
        s = self.settings
        targets = targets if targets is not None else self.pool.alive
        if not targets:
            raise RuntimeError("no rollout server left to push weights to")
        started = time.perf_counter()
        if self.serving_dtype is None:
            found = await asyncio.gather(
                *(weights_status(t, timeout=s.rpc_timeout_s, channels=self.channels) for t in targets),
                return_exceptions=True,
            )
            statuses = [r for r in found if not isinstance(r, BaseException)]
            if not statuses:
                raise RuntimeError(f"no rollout server answers: {found[0]}")
            self.serving_dtype = serving_dtype(statuses)
        source = await asyncio.to_thread(WeightSource, self.policy.hf_weights(), s.chunk_bytes, self.serving_dtype)
        version = self.version + 1 if version is None else version
        result = await push_weights(
            source,
            targets,
            version=version,
            mode=s.mode,
            transport=s.transport,
            timeout=s.push_timeout_s,
            channels=self.channels,
        )
        for failed in result.failed:
            self.pool.mark_dead(
                failed.server, f"weight update to version {version} failed: {failed.error.message or 'not committed'}"
            )
        if not self.pool.alive:
            raise RuntimeError(f"weight update to version {version} failed on every rollout server")
        self.version = max(self.version, version)
        return time.perf_counter() - started

    async def readmit(self) -> None:
        """A lost rollout server that answers again is brought to the current version, then routed to."""
        for address in self.pool.lost:
            try:
                await weights_status(address, timeout=2)
            except Exception:
                continue
            try:
                await self.push([address], version=self.version)
                status = await weights_status(address, timeout=self.settings.rpc_timeout_s)
                if status.serving_version != self.version:
                    raise RuntimeError(f"it does not serve version {self.version} after the update")
            except Exception as exc:
                log.warning("could not re-admit %s: %s", address, exc)
                continue
            await self.pool.admit(address)
            log.info("rollout server %s re-admitted at version %d", address, self.version)

    async def close(self) -> None:
        await self.channels.close()
