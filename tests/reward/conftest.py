"""One reward server for the reward tests: the real CLI (`fabric serve reward`) in a subprocess, started once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CONFIG = HERE / "reward_config.yaml"
# Overrides on top of reward_config.yaml: a plugin scorer by dotted path, and a small char limit to test.
OVERRIDES = ["rewards.crashy.worker_cls=tests.reward.plugin_scorers.CrashOnMarkerScorer",
             "rewards.crashy.infer_batch_size=8", "rewards.crashy.batch_wait_ms=50",
             "rewards.answer_tag.max_input_chars=1000"]  # fmt: skip


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, address: str, lines: list[str]):
        self.proc, self.address, self.lines = proc, address, lines

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_server(config: Path, overrides: list[str] = (), timeout: float = 180.0) -> ServerProcess:
    """Starts `fabric serve reward --port 0` and waits for its `listening on HOST:PORT` line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fabric.cli", "serve", "reward", "--config", str(config), "--port", "0", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:  # the server logs to the same pipe; the ready line comes once every scorer is loaded
        lines.append(line)
        if "fabric reward server listening on " in line:
            address = line.rsplit(" ", 1)[-1].strip()
            return ServerProcess(proc, address, lines)
        if time.monotonic() > deadline:
            break
    proc.kill()
    proc.wait()
    raise RuntimeError("reward server did not start:\n" + "".join(lines[-30:]))


@pytest.fixture(scope="session")
def reward_server():
    server = start_server(CONFIG, OVERRIDES)
    # Drain its output in the background so the pipe never fills and blocks the server.
    threading.Thread(target=lambda: server.lines.extend(server.proc.stdout), daemon=True).start()
    yield server
    server.terminate()
