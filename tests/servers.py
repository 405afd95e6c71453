"""Fabric servers for the tests, started the way users start them: `fabric serve KIND` through fabric.procs."""

from __future__ import annotations

import os
from pathlib import Path

from fabric.procs import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
# Offline (the tests build their models), a small CPU KV cache, and the repository importable for plugin scorers.
TEST_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT)}


def serve(kind: str, config: str | Path, overrides=(), timeout: float = 300.0, **kwargs) -> ServerProcess:
    """Starts `fabric serve KIND --config CONFIG --port 0` and waits for its ready line; `.stop()` ends it."""
    env = {key: os.environ.get(key, value) for key, value in TEST_ENV.items()}
    # Not in a session of its own: its gRPC loop then shares the CPU thread by thread with its engine processes, and
    # the timing windows the rollout tests act in stay open on a 2-core host.
    kwargs.setdefault("own_session", False)
    server = ServerProcess(kind, config, overrides=overrides, env=env, **kwargs).start()
    server.wait_ready(timeout)
    return server
