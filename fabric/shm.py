"""Shared memory a fabric server leaves behind. RAM-backed /dev/shm holds the weight staging files and vLLM's
message queues (multiprocessing shared_memory, `psm_*`); a process killed before its cleanup leaves them there until
reboot, and on a node that restarts servers, or a CI machine that runs the suite again and again, that ends in
memory exhaustion. Whoever stops a server (the server itself after its engine, fabric.procs for the processes it
starts) deletes what appeared since it started and no live process uses any more."""

from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
# What fabric servers create in shared memory: weight staging files, and vLLM's message queues (multiprocessing
# shared_memory, `psm_*`). A process killed before its cleanup leaves them behind, RAM-backed, until reboot.
SHM_PATTERNS = ("fabric-weights-*", "psm_*")


def shm_entries() -> set[str]:
    if not SHM_DIR.is_dir():
        return set()
    return {p.name for pattern in SHM_PATTERNS for p in SHM_DIR.glob(pattern)}


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _shm_of(pid: int) -> set[str]:
    """Names under /dev/shm that process `pid` maps or holds open (empty if it is gone or not ours to read)."""
    used: set[str] = set()
    proc = Path("/proc") / str(pid)
    try:
        for line in (proc / "maps").read_text().splitlines():
            if "/dev/shm/" in line:
                used.add(line.rsplit("/dev/shm/", 1)[1].split(" ")[0])
        for fd in (proc / "fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("/dev/shm/"):
                used.add(target.removeprefix("/dev/shm/"))
    except OSError:  # the process ended meanwhile, or is not ours to read
        pass
    return used


def _shm_in_use() -> set[str]:
    """Names under /dev/shm that a live process maps or holds open."""
    return {name for pid in _pids() for name in _shm_of(pid)}


def group_pids(pgid: int) -> list[int]:
    """The live processes of a process group."""
    found = []
    for pid in _pids():
        try:
            stat = (Path("/proc") / str(pid) / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                found.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    return found


def descendant_pids(root: int) -> list[int]:
    """`root` and every live process below it."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        try:
            ppid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def shm_used_by(pids) -> set[str]:
    """What these processes use in /dev/shm, of the kinds a fabric server creates (SHM_PATTERNS)."""
    mine = shm_entries()
    return {name for pid in pids for name in _shm_of(pid) if name in mine}


def orphaned_shm(before: set[str]) -> list[str]:
    """Shared memory that appeared since `before` and that no live process uses any more."""
    new = shm_entries() - before
    return sorted(new - _shm_in_use()) if new else []


def release(owned: set[str]) -> list[str]:
    """Deletes those of `owned` (what a stopped server's processes used) that no live process uses any more. Only
    a server's own segments are candidates, so a server starting beside it never loses one mid-handshake."""
    existing = owned & shm_entries()
    orphans = sorted(existing - _shm_in_use()) if existing else []
    for name in orphans:
        (SHM_DIR / name).unlink(missing_ok=True)
    return orphans
