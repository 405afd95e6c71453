"""`fabric serve reward`: builds the scorers of the `rewards` section and serves fabric.v1.RewardService."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from omegaconf import DictConfig

from fabric import security
from fabric.config import load_config
from fabric.reward.config import load_reward_configs
from fabric.reward.scorer import Scorer, build_scorer
from fabric.reward.servicer import RewardServicer
from fabric.server import FabricServer, print_ready
from fabric.v1 import reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


async def start_scorers(cfg: DictConfig, role: str = "rewards") -> dict[str, Scorer]:
    """Every scorer built first (so a config error shows before any model loads), then started one by one."""
    scorers = {name: build_scorer(rc) for name, rc in load_reward_configs(cfg, role).items()}
    try:
        for name, scorer in scorers.items():
            start = time.perf_counter()
            log.info("reward %r: starting %s ...", name, scorer.config.worker_cls)
            await scorer.start()
            tags = f", tag_included {scorer.config.tag_included}" if scorer.config.tag_included else ""
            log.info(
                "reward %r ready in %.1f s: %s on %s, batch %d%s",
                name,
                time.perf_counter() - start,
                scorer.model,
                scorer.device,
                scorer.config.infer_batch_size,
                tags,
            )
    except BaseException:
        await asyncio.gather(*(s.close() for s in scorers.values()), return_exceptions=True)
        raise
    return scorers


class RewardServer:
    """Scorers + servicer + FabricServer. `start()`/`stop()` for in-process use; `serve_forever()` for the CLI."""

    def __init__(self, scorers: dict[str, Scorer], host: str = "127.0.0.1", port: int = 0):
        self.scorers = scorers
        self.servicer = RewardServicer(scorers)
        self.server = FabricServer(
            [SERVICE_NAME],
            lambda s: reward_pb2_grpc.add_RewardServiceServicer_to_server(self.servicer, s),
            host=host,
            port=port,
            on_drain=self.servicer.drain,
        )
        self.servicer.label = f"fabric reward server on {self.server.address} (pid {os.getpid()})"

    @classmethod
    async def create(cls, cfg: DictConfig, role: str = "rewards", host: str = "127.0.0.1", port: int = 0):
        return cls(await start_scorers(cfg, role), host, port)

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        await self.servicer.start()
        await self.server.start()

    async def close(self) -> None:
        await self.servicer.stop()
        await asyncio.gather(*(s.close() for s in self.scorers.values()), return_exceptions=True)

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)
        await self.close()

    async def serve_forever(self, grace: float = 10.0) -> None:
        await self.servicer.start()
        try:
            await self.server.serve_forever(grace, ready=print_ready("reward"))
        finally:
            await self.close()


async def _serve(args) -> None:
    cfg = load_config(args.config, args.overrides, search_paths=args.config_search_path)
    security.configure(security.SecurityConfig.from_cfg(cfg))  # token / TLS for the server and its channels
    server = await RewardServer.create(cfg, args.role, args.host, args.port)
    await server.serve_forever()


def cli_main(args) -> int:
    asyncio.run(_serve(args))
    log.info("reward server stopped")
    return 0
