"""Starting `fabric serve rollout` as a subprocess and reading its address (tests and bench/generation.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
READY = "fabric rollout server listening on "


def write_config(path: Path, model: str, **section) -> Path:
    """A ROLL-style config for the tiny model: the CPU-safe engine settings, plus `section` keys of actor_infer."""
    import yaml

    strategy_config = {
        "block_size": 32,
        "dtype": "float32",
        "max_model_len": 256,
        "enforce_eager": True,
        "gpu_memory_utilization": 0.3,
        **section.pop("strategy_config", {}),
    }
    actor_infer = {
        "model_args": {"model_name_or_path": model, "dtype": "fp32"},
        "generating_args": {"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "num_return_sequences": 1},
        "strategy_args": {"strategy_name": "vllm", "strategy_config": strategy_config},
        "device_mapping": "list(range(0,1))",
        "infer_batch_size": 8,
        **section,
    }
    path.write_text(yaml.safe_dump({"actor_infer": actor_infer}, sort_keys=False))
    return path


class RolloutServerProcess:
    """A running `fabric serve rollout`; its output is collected in `lines` (and never blocks it)."""

    def __init__(self, proc: subprocess.Popen, address: str, lines: list[str]):
        self.proc, self.address, self.lines = proc, address, lines
        self._reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        self._reader.start()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit code (killed if it does not exit in `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._reader.join(5)

    def log_tail(self, n: int = 30) -> str:
        return "".join(self.lines[-n:])


def start_rollout_server(config: Path, overrides: list[str] = (), timeout: float = 300.0) -> RolloutServerProcess:
    """Starts `fabric serve rollout --port 0` and waits for its ready line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = [sys.executable, "-m", "fabric.cli", "serve", "rollout", "--config", str(config), "--port", "0", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:  # vLLM logs to the same pipe; the ready line comes once the engine is warm
        lines.append(line)
        if READY in line:
            return RolloutServerProcess(proc, line.rsplit(" ", 1)[-1].strip(), lines)
        if time.monotonic() > deadline:
            break
    proc.kill()
    proc.wait()
    raise RuntimeError("rollout server did not start:\n" + "".join(lines[-30:]))
