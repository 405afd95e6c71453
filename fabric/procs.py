"""Fabric servers as child processes: start `fabric serve ...`, wait for its ready line, stop it cleanly.

Used by the launcher (`fabric run`), the benchmarks and the tests, so that all of them start servers the way a user
does, and none of them leaves a process behind.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from fabric.shm import descendant_pids, group_pids, release, shm_used_by

READY_RE = re.compile(r"fabric (\w+) server listening on (\S+)")
SHM_NOTE_S = 1.0  # how often a live server's shared memory is noted (vLLM's queues live as long as the engine)
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


class ServerProcess:
    """One `fabric serve KIND` process. Its output is kept (the last lines) and optionally copied to a log file."""

    def __init__(
        self,
        kind: str,
        config: str | Path,
        *,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        role: str | None = None,
        overrides: Sequence[str] = (),
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        command: Sequence[str] | None = None,
        own_session: bool = True,
    ):
        self.own_session = own_session
        self.kind = kind
        self.name = name or kind
        head = command or ["serve", kind]  # `fabric train` prints the same kind of ready line
        cmd = [*prefix, sys.executable, "-m", "fabric.cli", *head, "--config", str(config)]
        if command is None:
            cmd += ["--host", host, "--port", str(port)]
        if role:
            cmd += ["--role", role]
        self.cmd = [*cmd, *overrides]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.tail: deque[str] = deque(maxlen=200)
        self.shm_owned: set[str] = set()  # every segment the group used while it lived: what stop() releases
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._noter: threading.Thread | None = None

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            # Its own process group either way, so a stop reaches the engine's children too. Its own session
            # also makes it its own scheduling group under Linux autogroup: servers cannot starve each other or
            # the launcher, but a server's busy engine processes compete with its own gRPC loop for that share.
            start_new_session=self.own_session,
            process_group=None if self.own_session else 0,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        self._noter = threading.Thread(target=self._note_shm, daemon=True)
        self._noter.start()
        return self

    def _note_shm(self) -> None:
        """Notes what the group uses in /dev/shm while it lives: a group SIGKILLed from outside (a test, an OOM
        kill) cannot be asked any more, and its processes cleaned nothing up. Once the group is gone, releases it
        here: whoever killed it may never call stop() (a test that puts a restarted server in the dead one's place)."""
        pgid = self.process.pid
        while not self._stopping.wait(SHM_NOTE_S):
            self.process.poll()  # reaps the leader once it exits: a zombie still counts as one of the group
            # Orphans of a killed group are reparented to a subreaper (fabric run is one) and stay zombies of the
            # group until reaped: reaped here, as _wait_group_gone does.
            pids = [pid for pid in group_pids(pgid) if pid == pgid or not _reaped(pid)]
            if not pids:
                release(self.shm_owned)
                return
            self.shm_owned |= shm_used_by(pids)

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None  # started by start() with stdout=PIPE
        log = self.log_path.open("a") if self.log_path else None
        try:
            for line in self.proc.stdout:
                self.tail.append(line.rstrip("\n"))
                if log:
                    log.write(line)
                    log.flush()
                match = READY_RE.search(line)
                if match and not self._ready.is_set():
                    self.address = match.group(2)
                    self._ready.set()
        finally:
            if log:
                log.close()
            self._ready.set()

    def wait_ready(self, timeout: float = 300.0) -> str:
        """Blocks until the ready line; raises with the process's last output if it died or timed out."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if time.monotonic() > deadline:
                self.stop(grace=1)
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s:\n{self.last_lines()}")
        if self.address is None:
            assert self.proc is not None
            self.proc.wait(timeout=10)
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.last_lines()}")
        return self.address

    def last_lines(self, n: int = 25) -> str:
        return "\n".join(list(self.tail)[-n:])

    @property
    def process(self) -> subprocess.Popen:
        """The started process (start() first)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.proc

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:  # alive
            os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM (the server drains and stops its engine), then SIGKILL of whatever of the group is left after
        `grace` seconds; returns once every process of the group is gone and its shared memory released."""
        if self.proc is None:
            return None
        deadline = time.monotonic() + grace
        self._stopping.set()
        if self._noter is not None:
            self._noter.join()
        self.shm_owned |= shm_used_by(group_pids(self.proc.pid))  # what to release if its processes leave it
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Engine children exit on their own once the server has stopped them (cleaning their shared memory):
        # give them what is left of the grace, then kill the rest, and wait until the group is really gone.
        _wait_group_gone(self.proc, max(deadline - time.monotonic(), 1.0))
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = self.proc.wait()
        _wait_group_gone(self.proc, 10.0)
        release(self.shm_owned)
        return code

    def __enter__(self) -> ServerProcess:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _wait_group_gone(proc: subprocess.Popen, timeout: float) -> bool:
    """True once no process of the group led by `proc` is left. An exited process counts until its parent reaps it:
    `proc` is reaped by its Popen, orphans reparented here (fabric run is their subreaper) by _reaped."""
    deadline = time.monotonic() + timeout
    while True:
        others = [pid for pid in group_pids(proc.pid) if pid != proc.pid and not _reaped(pid)]
        if proc.poll() is not None and not others:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def become_subreaper() -> bool:
    """Makes this process the one that inherits its descendants' orphans (Linux), whatever group or session they
    moved to, so that end_descendants() can wait for them. False where the system has no such thing."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_now(code: int) -> NoReturn:
    """Ends this process once its work is done and its own clean-up has run: the atexit handlers run, the output is
    flushed, and the interpreter's teardown is skipped. For a server that has stopped cleanly that teardown only
    frees memory, and with torch and vLLM loaded it takes 2-3 s of CPU (measured on the 2-core CI host), which
    every stop (a launcher's, a test's) would wait for."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to flush
            pass
    os._exit(code)


def end_descendants(grace: float = 10.0) -> list[int]:
    """Returns once no process below this one is left: waits `grace` seconds for them to exit on their own, then
    SIGKILLs the rest. Orphans reparented here (become_subreaper) are reaped. Returns the pids it had to kill."""
    me = os.getpid()
    killed: list[int] = []
    for wait in (grace, 10.0):  # on their own, then after SIGKILL
        deadline = time.monotonic() + wait
        while left := [pid for pid in descendant_pids(me) if pid != me and not _reaped(pid)]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return killed
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    raise RuntimeError(f"processes {left} outlived SIGKILL")


def _reaped(pid: int) -> bool:
    """Reaps `pid` if it is an exited child of ours; True once it is gone (an exited process that another parent has
    not reaped yet still counts)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return True
    except ChildProcessError:  # not our child: its parent reaps it
        pass
    return not (Path("/proc") / str(pid)).exists()


def start_all(servers: Sequence[ServerProcess], timeout: float = 300.0) -> list[str]:
    """Starts several servers at once (engines load in parallel) and waits for all; stops all on failure."""
    for server in servers:
        server.start()
    try:
        return [server.wait_ready(timeout) for server in servers]
    except BaseException:
        for server in servers:
            server.stop(grace=2)
        raise
