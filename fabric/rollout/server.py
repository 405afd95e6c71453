"""`fabric serve rollout --config FILE [--role actor_infer] [--host H] [--port P] [key=value ...]`.

Loads and checks the config (a bad one exits 2 with one line naming the key), starts the vLLM engine, then serves
fabric.v1.RolloutService with health and reflection until SIGTERM, which drains (see RolloutServicer.drain).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable

from fabric import security
from fabric.config import load_config
from fabric.rollout.config import RolloutConfig, load_rollout_config
from fabric.rollout.engine import create_engine
from fabric.rollout.servicer import RolloutServicer
from fabric.rollout.validation import check_generating_args
from fabric.server import FabricServer, print_ready
from fabric.shm import descendant_pids, release, shm_used_by
from fabric.v1 import rollout_pb2, rollout_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name


class EngineStartError(RuntimeError):
    """vLLM's engine process failed to start (its own log above says why)."""


async def serve(
    config: RolloutConfig, host: str = "127.0.0.1", port: int = 0, ready: Callable[[str], None] | None = None
) -> None:
    engine = create_engine(config)  # checks the engine arguments: ConfigError before the slow start
    servicer = RolloutServicer(engine, config)
    server = FabricServer(
        [SERVICE_NAME],
        lambda s: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, s),
        host=host,
        port=port,
        on_drain=servicer.drain,
    )  # binds now, so a taken port fails before the engine starts
    servicer.server_name = server.address
    try:
        try:
            await engine.start()
        except Exception as exc:
            raise EngineStartError(
                f"{config.strategy_name} engine failed to start ({exc}); its log above says why"
            ) from exc
        await server.serve_forever(grace=config.drain_grace_s, ready=ready)
        log.info("stopped")
    finally:
        servicer.close()  # staging files first: they are RAM-backed shared memory
        owned = shm_used_by(descendant_pids(os.getpid()))
        engine.shutdown()
        leftovers = release(owned)  # what the engine's processes did not clean up themselves
        if leftovers:
            log.info("released %d shared-memory segments the engine left: %s", len(leftovers), ", ".join(leftovers))


def cli_main(args) -> int:
    cfg = load_config(args.config, args.overrides, search_paths=args.config_search_path)
    security.configure(security.SecurityConfig.from_cfg(cfg))  # token / TLS for the server and its channels
    config = load_rollout_config(cfg, args.role)
    check_generating_args(config.generating_args, config.role)
    try:
        asyncio.run(serve(config, args.host, args.port, ready=print_ready("rollout")))
    except EngineStartError as exc:
        print(f"fabric: {exc}", file=sys.stderr)
        return 1
    return 0
