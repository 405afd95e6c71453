"""Fabric servers for the tests, started the way users start them: `fabric serve KIND` through fabric.procs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fabric.procs import ServerProcess, start_all

ROOT = Path(__file__).resolve().parent.parent
# Offline (the tests build their models), a small CPU KV cache, and the repository importable for plugin scorers.
TEST_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT)}


def server_process(kind: str, config: str | Path, overrides=(), **kwargs) -> ServerProcess:
    """`fabric serve KIND --config CONFIG --port 0`, not started yet: start it with serve() or several with
    start_all (their engines then load side by side); `.stop()` ends it."""
    env = {key: os.environ.get(key, value) for key, value in TEST_ENV.items()}
    # Not in a session of its own: its gRPC loop then shares the CPU thread by thread with its engine processes, and
    # the timing windows the rollout tests act in stay open on a 2-core host.
    kwargs.setdefault("own_session", False)
    return ServerProcess(kind, config, overrides=overrides, env=env, **kwargs)


def serve(kind: str, config: str | Path, overrides=(), timeout: float = 300.0, **kwargs) -> ServerProcess:
    """Starts `fabric serve KIND --config CONFIG --port 0` and waits for its ready line; `.stop()` ends it."""
    server = server_process(kind, config, overrides, **kwargs).start()
    server.wait_ready(timeout)
    return server


# ---- the suite's shared rollout servers ------------------------------------------------------------------------

PROMPTS = ["Add 3 and 4.\n", "Add 12 and 30.\n"]  # what the tests that push weights compare greedy outputs on
MAX_NEW = 8


def write_rollout_config(model: str, path: Path) -> str:
    path.write_text(
        "actor_infer:\n"
        f"  pretrain: {model}\n"
        f"  generating_args: {{max_new_tokens: {MAX_NEW}, temperature: 0.0}}\n"
        "  strategy_args:\n"
        "    strategy_name: vllm\n"
        "    strategy_config: {block_size: 32, dtype: float32, max_model_len: 256, enforce_eager: true,\n"
        "                      gpu_memory_utilization: 0.1}\n"
        "  infer_batch_size: 8\n"
        "  drain_grace_s: 5\n"
    )
    return str(path)


@dataclass
class Cluster:
    """Rollout servers (vLLM on the tiny model) that several test packages share: tests may push weights to them,
    put them to sleep, kill one and `restart` it. Each stages in a directory of its own, so a test can find (and
    sabotage) one server's staging files."""

    config: str
    tmp: Path
    procs: list[ServerProcess] = field(default_factory=list)  # mutable: a restarted server takes the dead one's place
    staging: dict[str, Path] = field(default_factory=dict)  # each live server's staging directory, by address

    def server(self, name: str, port: int = 0) -> ServerProcess:
        folder = self.tmp / f"staging-{name}"  # one per process: a killed server's files stay in its own
        folder.mkdir()
        return ServerProcess(
            "rollout", self.config, name=name, port=port, log_path=self.tmp / f"{name}.log",
            env={"FABRIC_SHM_DIR": str(folder)},
        )  # fmt: skip

    @property
    def addresses(self) -> list[str]:
        return [p.address for p in self.procs]

    def start(self, count: int, timeout: float = 600.0) -> None:
        self.procs[:] = [self.server(f"rollout-{i}") for i in range(count)]
        start_all(self.procs, timeout=timeout)
        self._note_staging()

    def restart(self, i: int, port: int = 0) -> ServerProcess:
        """A new server in the place of server i (stopped first, if a test has not killed it)."""
        self.procs[i].stop(grace=5)
        self.procs[i] = server = self.server(f"{self.procs[i].name}-restarted", port=port)
        server.start().wait_ready(600)
        self._note_staging()
        return server

    def _note_staging(self) -> None:
        self.staging = {p.address: Path(p.env["FABRIC_SHM_DIR"]) for p in self.procs}

    def stop(self) -> None:
        """Stops every server; each must exit 0 and, stopped with SIGTERM, delete its staging files."""
        codes = {p.name: (p.stop(), p.last_lines()) for p in self.procs}
        for name, (code, lines) in codes.items():
            assert code == 0, f"{name} exited with {code}:\n{lines}"
        for address, folder in self.staging.items():
            assert list(folder.iterdir()) == [], address
