"""fabric.procs stops what it started: the whole process group, children that outlive their parent included, and
the shared memory they leave (what `make run` and the tests rely on to leave nothing behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


# A "server" holding a segment open: SIGKILLed from outside, it cleans nothing up, and its group is gone by the
# time whoever started it stops it.
HOLDER = """
exec 3>{shm}
echo leak >&3
echo "fabric test server listening on 127.0.0.1:1"
wait
sleep 60
"""


def test_a_sigkilled_group_s_shared_memory_is_released_by_stop(tmp_path):
    segment = SHM_DIR / f"psm_fabric_test_killed_{os.getpid()}"
    script = tmp_path / "server.sh"
    script.write_text(HOLDER.format(shm=segment))
    server = ServerProcess("test", "unused", prefix=["bash", str(script)], own_session=False)
    server.start()
    try:
        server.wait_ready(timeout=30)
        deadline = time.monotonic() + 10
        while segment.name not in server.shm_owned:  # noted while the group lives
            assert time.monotonic() < deadline, "the live server's segment was never noted"
            time.sleep(0.1)
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
    finally:
        server.stop(grace=1)
    assert not segment.exists(), "the SIGKILLed server's shared memory is still in /dev/shm"


def test_a_sigkilled_group_s_shared_memory_is_released_even_if_nobody_stops_it(tmp_path):
    """As tests/weights/test_collective.py and tests/reliability/test_failover.py do: the killed server's place is
    taken by a restarted one, and stop() is never called on the dead one."""
    segment = SHM_DIR / f"psm_fabric_test_unstopped_{os.getpid()}"
    script = tmp_path / "server.sh"
    script.write_text(HOLDER.format(shm=segment))
    server = ServerProcess("test", "unused", prefix=["bash", str(script)], own_session=False)
    server.start()
    try:
        server.wait_ready(timeout=30)
        deadline = time.monotonic() + 10
        while segment.name not in server.shm_owned:
            assert time.monotonic() < deadline, "the live server's segment was never noted"
            time.sleep(0.1)
        os.killpg(server.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while segment.exists():
            assert time.monotonic() < deadline, "the SIGKILLed server's shared memory is still in /dev/shm"
            time.sleep(0.1)
    finally:
        server.stop(grace=1)
        segment.unlink(missing_ok=True)


# As `fabric run` (a subreaper) sees a server group SIGKILLed from outside: the group's children are reparented to
# it and stay zombies of the group until it reaps them, and nobody calls stop() on the dead server.
SUBREAPER = """
import os, signal, sys, time
from pathlib import Path
from fabric.procs import ServerProcess, become_subreaper
assert become_subreaper()
segment = Path(sys.argv[2])
server = ServerProcess("test", "unused", prefix=["bash", sys.argv[1]]).start()
server.wait_ready(timeout=30)
while segment.name not in server.shm_owned:
    time.sleep(0.1)
os.killpg(server.process.pid, signal.SIGKILL)
deadline = time.monotonic() + 10
while segment.exists() and time.monotonic() < deadline:
    time.sleep(0.1)
print("released" if not segment.exists() else "left")
"""


def test_a_sigkilled_group_s_shared_memory_is_released_by_a_subreaper_that_never_stops_it(tmp_path):
    segment = SHM_DIR / f"psm_fabric_test_subreaper_{os.getpid()}"
    script = tmp_path / "server.sh"
    script.write_text(CHILD_HOLDER.format(shm=segment))
    try:
        out = subprocess.run(
            [sys.executable, "-c", SUBREAPER, str(script), str(segment)], capture_output=True, text=True, timeout=60
        )
        assert out.stdout.strip() == "released", out.stdout + out.stderr
    finally:
        segment.unlink(missing_ok=True)


# A "server" whose child holds the segment (as vLLM's engine process holds its queues).
CHILD_HOLDER = """
(exec 3>{shm}; echo leak >&3; sleep 60) &
while [ ! -s {shm} ]; do sleep 0.05; done
echo "fabric test server listening on 127.0.0.1:1"
wait
"""


# A "server" whose child moves to a session of its own: stopping the server's group does not reach it.
ESCAPER = """
setsid bash -c 'echo $$ > {pidfile}; exec sleep 60' &
while [ ! -s {pidfile} ]; do sleep 0.05; done  # it has left the group
echo "fabric test server listening on 127.0.0.1:1"
wait
"""

# What `fabric run` does around the processes it starts (fabric/run/launcher.py: cli_main, Launcher.stop_all).
LAUNCHER = """
import sys
from fabric.procs import ServerProcess, become_subreaper, end_descendants
assert become_subreaper()
server = ServerProcess("test", "unused", prefix=["bash", sys.argv[1]]).start()
server.wait_ready(30)
server.stop(grace=1)
print("killed", end_descendants(grace=1))
"""


def test_a_launcher_returns_only_once_every_process_it_started_is_gone(tmp_path):
    pidfile = tmp_path / "escaped.pid"
    script = tmp_path / "server.sh"
    script.write_text(ESCAPER.format(pidfile=pidfile))
    out = subprocess.run([sys.executable, "-c", LAUNCHER, str(script)], capture_output=True, text=True, timeout=60)
    escaped = int(pidfile.read_text())
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"killed [{escaped}]" in out.stdout, (escaped, out.stdout + out.stderr)
        assert not Path(f"/proc/{escaped}").exists(), "a process the launcher started outlived it"
    finally:
        if Path(f"/proc/{escaped}").exists():
            os.kill(escaped, signal.SIGKILL)


# A process that ends through exit_now: output still buffered, an atexit handler, and an object whose finalizer
# would only run in the interpreter's teardown (the teardown exit_now skips).
EXIT_NOW = """
import atexit, sys
from fabric.procs import exit_now
class Teardown:
    def __del__(self):
        print("teardown ran", flush=True)
kept = Teardown()
atexit.register(lambda: print("atexit ran"))
sys.stdout.write("buffered line")
exit_now(3)
"""


def test_exit_now_runs_atexit_flushes_output_keeps_the_code_and_skips_the_teardown():
    done = subprocess.run([sys.executable, "-c", EXIT_NOW], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONUNBUFFERED": ""})  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("buffered line") and "atexit ran" in done.stdout, done.stdout
    assert "teardown ran" not in done.stdout


def test_a_server_that_stops_cleanly_exits_through_exit_now(monkeypatch):
    """`fabric serve` ends through exit_now once its handler has returned (a clean stop), and only as the entry
    point: called in process (tests, `fabric run`'s checks) main() returns."""
    from fabric import cli

    ended: list[int] = []
    monkeypatch.setattr(cli, "exit_now", ended.append)
    monkeypatch.setattr("fabric.reward.server.cli_main", lambda args: 0)
    argv = ["serve", "reward", "--config", "unused.yaml"]
    monkeypatch.setattr(cli, "check_before_start", lambda args: None)
    assert cli.main(argv) == 0 and ended == []
    assert cli.main(argv, exiting=True) == 0 and ended == [0]
