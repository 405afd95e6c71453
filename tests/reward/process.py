"""Starting `fabric serve reward` as a subprocess and reading its address (tests and bench/reward.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, address: str, lines: list[str]):
        self.proc, self.address, self.lines = proc, address, lines
        # Keep reading its output so the pipe never fills and blocks the server.
        self._reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        self._reader.start()

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
            self._reader.join(5)
            return rc
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_server(config: Path, overrides: list[str] = (), timeout: float = 180.0) -> ServerProcess:
    """Starts `fabric serve reward --port 0` and waits for its `listening on HOST:PORT` line; `lines` is its output."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
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
