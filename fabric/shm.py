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


def _shm_in_use() -> set[str]:
    """Names under /dev/shm that a live process maps or holds open."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    used.add(line.rsplit("/dev/shm/", 1)[1].split(" ")[0])
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    used.add(target.removeprefix("/dev/shm/"))
        except OSError:  # the process ended meanwhile, or is not ours to read
            continue
    return used


def orphaned_shm(before: set[str]) -> list[str]:
    """Shared memory that appeared since `before` and that no live process uses any more."""
    new = shm_entries() - before
    return sorted(new - _shm_in_use()) if new else []


def release_orphaned_shm(before: set[str]) -> list[str]:
    """Deletes what a stopped server's processes (killed ones too) left behind since `before`. Another live
    server's segments are mapped, so they stay."""
    orphans = orphaned_shm(before)
    for name in orphans:
        (SHM_DIR / name).unlink(missing_ok=True)
    return orphans
