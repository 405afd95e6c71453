"""fabric.procs stops what it started: the whole process group, children that outlive their parent included, and
the shared memory they leave (what `make run` and the tests rely on to leave nothing behind)."""

from __future__ import annotations

import os
import time

from fabric.procs import ServerProcess
from fabric.shm import SHM_DIR

# A "server" whose child ignores SIGTERM and outlives it, and which holds a segment in /dev/shm that it never
# deletes (as a killed vLLM process leaves its message queues).
SCRIPT = """
trap '' TERM
(trap '' TERM; sleep 60) &
exec 3>{shm}
echo leak >&3
echo "fabric test server listening on 127.0.0.1:1"
wait
"""


def test_stop_returns_once_every_process_of_the_group_is_gone_and_its_shared_memory_released(tmp_path):
    segment = SHM_DIR / f"psm_fabric_test_{os.getpid()}"
    script = tmp_path / "server.sh"
    script.write_text(SCRIPT.format(shm=segment))
    server = ServerProcess("test", "unused", prefix=["bash", str(script)], own_session=False)
    server.start()
    assert server.wait_ready(timeout=30) == "127.0.0.1:1"
    assert segment.exists()
    started = time.monotonic()
    server.stop(grace=1)
    assert time.monotonic() - started < 15
    try:
        os.killpg(server.proc.pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "a process of the stopped server's group is still there"
    assert not segment.exists(), "the stopped server's shared memory is still in /dev/shm"
