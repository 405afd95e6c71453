"""Collective transports (gloo on CPU, NCCL on GPU): a process group kept across updates, the sender its rank 0.

Control stays on gRPC. A group lives as long as its membership: the same sender (process, backend, device, deadline)
and the same servers. Forming one costs a few hundred ms on NCCL (and tearing it down as much again), so the sender
keeps it after an update and the next update to the same servers reuses it; it is formed again only when a server
joins, leaves or restarts, or when anything failed (a deadline passed, a peer died: every rank drops the group).

    sender      hosts a torch.distributed TCPStore (one per group), opens one UpdateWeights stream per server whose
                header names the transport and a CollectiveRendezvous (store address, its rank, world size, bucket
                size, deadline, group_id = "<group>#<update sequence number>"), waits until each server has checked
                in (`ready/<rank>` under "<group>/<seq>/", the value naming the process group the server still holds,
                or empty), then publishes the plan (`go`: the ranks that checked in, renumbered, and the process group
                to use: the one all of them hold, or a new one to form; a server that refused the header is left
                out), broadcasts the version in buckets of the staging layout and ends with a vote (all_reduce MIN of
                "I have everything"): a server commits only after a vote every rank passed
    receiver    joins from the rollout server's process (not vLLM's worker): gloo buckets land straight in the
                staging file, NCCL buckets in a flat GPU buffer (fabric.weights.transports.ipc.DeviceStaging, two
                buffers reused version after version) that the worker then loads by CUDA IPC handle; every chunk is
                marked and the version store commits as for any other path

Every wait has a deadline (`timeout_s`: the check-in, forming the group, each bucket, the vote). A peer that dies or
stalls fails the group on every rank: each server drops the staged version and keeps serving the previous one, and
drops the group; nothing commits anywhere unless the vote passed. The next push forms a new group with whichever
servers answer then; a server that restarted holds no group (it checks in empty), so the group is formed again with it.
Sleep drops a server's group (its NCCL buffers are GPU memory).

Buckets are byte ranges of the staging layout (fabric.weights.staging), so a receiver's bucket is a contiguous slice of
its staging memory and needs no unpacking; the sender packs each bucket (a device-local copy) into one of two
buffers kept with the group. No crc32c per bucket: the header carries the sender's digest of every tensor
(fabric.weights.digest), which each server checks on its own memory before it votes.

The store is open to whoever reaches it, so it is trusted with nothing: it listens only on the sender's address
towards the servers, and the header (on the authenticated UpdateWeights stream) carries a secret of this update that
signs (HMAC) each server's check-in and the sender's plan; a server skips a plan that is not signed with it, and a
sender a check-in that is not. The sender counts a server as updated only when its own broadcast succeeded.
torch's TCPStore caps each value it receives at 8 MiB but not the number of keys (nor a value grown by `append`), so
the sender bounds the keys: an update checks the count before it publishes its plan and before the vote, and a store
past `max_store_keys(world)` (someone else writing to it) refuses the update (nobody commits) and is closed, with
everything written to it; a guard thread does the same for the stores kept between updates.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from typing import Any

import torch

from fabric.errors import FabricError, invalid
from fabric.v1 import rollout_pb2
from fabric.weights.digest import source_digests
from fabric.weights.manifest import PROTO_TO_TORCH
from fabric.weights.staging import layout
from fabric.weights.versions import content_mismatch

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 1 << 30  # ROLL's 1 GiB
DEFAULT_TIMEOUT_S = 60.0  # forming the group, and each collective after it
MAX_TIMEOUT_S = 600.0  # a header's timeout_s is clamped to this (it holds the server's group as long)
MIN_BUCKET_BYTES = 64 * 1024  # smaller buckets from a header are refused (one list entry and one broadcast each)
MIN_SECRET_CHARS = 32
BACKENDS = ("gloo", "nccl")
# NCCL in torch: a collective that times out makes the watchdog tear the process down by default. The fabric has its own
# deadlines and aborts the group itself, so the watchdog only cleans up (2) and never kills a rollout server.
NCCL_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    "TORCH_NCCL_ENABLE_MONITORING": "0",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
}

# Test hook: called by the sender after each bucket is sent (index); lets a test stall or kill it mid-broadcast.
AFTER_BUCKET = None

# An update writes a check-in per server and a plan, a group's rendezvous a few keys per rank, and the keys of groups
# formed before stay (measured: 3 keys after gloo updates to 2 servers); each key holds at most 8 MiB (torch's cap).
STORE_KEYS_BASE = 32  # keys a store may hold beyond STORE_KEYS_PER_RANK per rank (FABRIC_COLLECTIVE_MAX_STORE_KEYS)
STORE_KEYS_PER_RANK = 8
STORE_GUARD_S = 1.0  # how often the guard thread counts the keys of every store this sender holds


def max_store_keys(world: int) -> int:
    """The most keys the sender's store of a group of `world` ranks may hold before it is taken as flooded."""
    return int(os.environ.get("FABRIC_COLLECTIVE_MAX_STORE_KEYS") or STORE_KEYS_BASE + STORE_KEYS_PER_RANK * world)


class CollectiveError(RuntimeError):
    pass


class StoreFlooded(CollectiveError):
    """The sender's store holds more keys than an update writes: the update is refused and the store closed."""


def buckets(size: int, bucket_bytes: int) -> list[tuple[int, int]]:
    bucket_bytes = max(int(bucket_bytes), 1)
    return [(lo, min(lo + bucket_bytes, size)) for lo in range(0, size, bucket_bytes)] or [(0, 0)]


def local_address_towards(host: str) -> str:
    """This host's address on the route to `host` (what a peer there can reach us at)."""
    if os.environ.get("FABRIC_COLLECTIVE_HOST"):
        return os.environ["FABRIC_COLLECTIVE_HOST"]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


# ---- the group -------------------------------------------------------------------------------------------------


class Group:
    """One process group of one update: gloo or NCCL, made without torch.distributed's global state."""

    def __init__(self, backend: str, store, rank: int, world: int, timeout: float, host: str, device=None):
        from torch import distributed as dist

        self.backend, self.rank, self.world, self.timeout = backend, rank, world, timeout
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        delta = datetime.timedelta(seconds=timeout)
        # A ProcessGroupGloo or ProcessGroupNCCL (None once closed): torch's stubs lack their broadcast/allreduce.
        self.pg: Any
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # the stubs call it Options
            opts._timeout = delta
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            self.pg = dist.ProcessGroupGloo(store, rank, world, opts)
        elif backend == "nccl":
            saved = {k: os.environ.get(k) for k in NCCL_ENV}
            os.environ.update(NCCL_ENV)
            try:
                opts_nccl = dist.ProcessGroupNCCL.Options()
                opts_nccl._timeout = datetime.timedelta(
                    seconds=timeout + 30
                )  # ours fires first; the watchdog cleans up
                self.pg = dist.ProcessGroupNCCL(store, rank, world, opts_nccl)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        else:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.pending: list = []

    def broadcast(self, tensor: torch.Tensor):
        from torch import distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        work = self.pg.broadcast([tensor], opts)
        if self.backend == "gloo":
            work.wait()  # blocks; gloo's own timeout (the deadline) raises
        else:
            self.pending.append(work)
        return work

    def vote(self, ok: bool, deadline: float) -> bool:
        """all_reduce MIN of ok over every rank, within the deadline: True only if every rank had everything."""
        from torch import distributed as dist

        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN  # type: ignore[assignment]  # the stubs want a ReduceOp; torch takes this
        work = self.pg.allreduce([flag], opts)
        if self.backend == "gloo":
            work.wait()
        else:
            self.pending.append(work)
            self.wait_all(deadline)
        return bool(flag.item() == 1)

    def wait_all(self, deadline: float) -> None:
        """NCCL: polls the enqueued collectives until done or the deadline, then aborts the group (the kernels exit)."""
        while self.pending:
            if all(w.is_completed() for w in self.pending):
                for w in self.pending:
                    w.wait()  # raises if the collective failed
                self.pending.clear()
                return
            if time.monotonic() > deadline:
                self.abort()
                raise CollectiveError(f"{self.backend} collective did not finish within its deadline: group aborted")
            time.sleep(0.0005)

    def abort(self) -> None:
        self.pending.clear()
        for name in ("abort", "_abort", "shutdown"):
            fn = getattr(self.pg, name, None)
            if fn is not None:
                with contextlib.suppress(Exception):
                    fn()
                return

    def close(self) -> None:
        if self.backend == "nccl":
            fn = getattr(self.pg, "shutdown", None) or getattr(self.pg, "abort", None)
            if fn is not None:
                with contextlib.suppress(Exception):
                    fn()
        self.pg = None


def _store(host: str, port: int, is_master: bool, timeout: float):
    from torch.distributed import TCPStore

    if is_master:
        return _master_store(host, timeout)  # on a port of its own: `port` is for a client
    return TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout))


def _master_store(host: str, timeout: float):
    """The sender's store. torch's own listens on every interface; this one only on the address the servers reach
    the sender at: a socket bound there, handed over (the store owns and closes the fd from then on)."""
    from torch.distributed import TCPStore

    listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.listen(128)
    try:
        store = TCPStore(
            host, listener.getsockname()[1], None, True, datetime.timedelta(seconds=timeout), wait_for_workers=False,
            master_listen_fd=listener.fileno(),
        )  # fmt: skip
    except BaseException:
        listener.close()
        raise
    listener.detach()
    return store


# ---- the per-update secret: only the sender that announced the update on the authenticated stream can steer it ---


def _mac(secret: str, *parts: str) -> str:
    return hmac.new(secret.encode(), "\x00".join(parts).encode(), hashlib.sha256).hexdigest()


def _signed(secret: str, kind: str, group_id: str, body: dict) -> bytes:
    text = json.dumps(body, sort_keys=True)
    return json.dumps({"body": text, "mac": _mac(secret, kind, group_id, text)}).encode()


def _verified(secret: str, kind: str, group_id: str, raw: bytes) -> dict | None:
    """The body of a value signed with this update's secret, or None (planted by someone else, or garbled)."""
    try:
        value = json.loads(raw)
        text, mac = value["body"], value["mac"]
        expected = _mac(secret, kind, group_id, str(text))
        if isinstance(text, str) and isinstance(mac, str) and hmac.compare_digest(mac, expected):
            body = json.loads(text)
            return body if isinstance(body, dict) else None
    except (ValueError, KeyError, TypeError):
        pass
    return None


# ---- receiver --------------------------------------------------------------------------------------------------


def _parse_group_id(group_id: str) -> tuple[str, str]:
    """ "<group>#<seq>" -> (group, seq); a group_id without a sequence number is a one-update group."""
    base, _, seq = group_id.partition("#")
    return base, seq or "1"


class _Held:
    """A receiver's process group, kept between updates: the store client it talks through and the group itself."""

    def __init__(self, store_address: str, base: str, timeout: float, client):
        self.store_address, self.base, self.timeout, self.client = store_address, base, timeout, client
        self.group: Group | None = None
        self.pg_id = ""  # the sender's name for the process group (its store prefix)
        self.header_rank = 0

    def matches(self, rv, base: str, timeout: float) -> bool:
        return (self.store_address, self.base, self.timeout) == (rv.store_address, base, timeout)

    def drop_group(self, abort: bool = True) -> None:
        if self.group is not None:
            if abort:
                self.group.abort()
            self.group.close()
        self.group, self.pg_id = None, ""


class CollectiveReceiver:
    """The server's end of a collective: offered as "gloo" (always) or "nccl" (with a CUDA device staging)."""

    def __init__(self, backend: str, staging=None):
        if backend not in BACKENDS:
            raise ValueError(backend)
        self.name = self.backend = backend
        self.staging = staging  # fabric.weights.transports.ipc.DeviceStaging for nccl
        self._held: _Held | None = None
        self._lock = threading.Lock()  # one update at a time uses the held group

    def offer(self) -> rollout_pb2.WeightTransportOffer:
        params = {}
        if self.staging is not None:
            from fabric.weights.transports.ipc import gpu_uuid

            params["gpu_uuid"] = gpu_uuid(self.staging.device)
        return rollout_pb2.WeightTransportOffer(name=self.name, params=params)

    def drop_group(self) -> None:
        """Leaves the held group (sleep, shutdown); the next update forms a new one. Waits for an update in flight
        (bounded by its deadlines)."""
        with self._lock:
            self._drop_held()

    def _drop_held(self, abort: bool = True) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.drop_group(abort)
            held.client = None

    def close(self) -> None:
        self.drop_group()

    async def receive(self, store, header, staged, request_iterator, time_remaining):
        started = time.perf_counter()
        rv = header.collective
        err = None
        if rv.backend != self.backend or not rv.store_address or rv.world_size < 2 or not 1 <= rv.rank < rv.world_size:
            err = invalid(
                "header.collective",
                f"a {self.backend} update needs backend {self.backend!r}, the store address, world_size >= 2 and "
                f"1 <= rank < world_size (got backend {rv.backend!r}, rank {rv.rank} of {rv.world_size})",
                "BAD_RENDEZVOUS",
            )
        elif len(rv.secret) < MIN_SECRET_CHARS or not header.tensor_digests:
            err = invalid(
                "header.collective.secret",
                f"a {self.backend} update needs this update's secret (at least {MIN_SECRET_CHARS} characters) and "
                "header.tensor_digests: the store is open to anyone who reaches it, so the server trusts only what "
                "the secret signs and commits only bytes that match the digests",
                "BAD_RENDEZVOUS",
            )
        elif 0 < rv.bucket_bytes < MIN_BUCKET_BYTES:
            err = invalid(
                "header.collective.bucket_bytes",
                f"{rv.bucket_bytes} is below the minimum of {MIN_BUCKET_BYTES} bytes a bucket",
                "BAD_RENDEZVOUS",
            )
        if err is not None:
            store.fail(staged, err)
            raise err
        # every wait of the update uses it: a huge or infinite one would hold this server's group that long
        timeout = min(rv.timeout_s, MAX_TIMEOUT_S) if rv.timeout_s > 0 else DEFAULT_TIMEOUT_S
        # The thread writes into the staged buffer: this call must not return (and let the store reuse the buffer)
        # before it ends, which its deadlines bound, even when the sender's stream is cancelled.
        work = asyncio.ensure_future(asyncio.to_thread(self._run, staged, rv, timeout))
        cancelled = False
        while True:
            try:
                error, timings = await asyncio.shield(work)
                break
            except asyncio.CancelledError:
                cancelled = True
                if work.done():
                    error, timings = work.result()
                    break
        if error is not None:
            log.warning("%s update to version %d failed: %s (serving version stays)", self.name, staged.version, error)
            if self.staging is not None:
                self.staging.drop(staged.version)
            store.fail(staged, FabricError(_code(), f"{self.name} transfer failed: {error}", "COLLECTIVE_FAILED"))
        else:
            _mark_all(store, staged)
        if cancelled:
            raise asyncio.CancelledError
        received = time.perf_counter()
        result = await store.finish(staged, started)
        if not result.committed and self.staging is not None:
            self.staging.drop(staged.version)
        timings["commit_s"] = time.perf_counter() - received
        log.info(
            "%s update to version %d: %s",
            self.name,
            staged.version,
            ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in timings.items()),
        )
        return rollout_pb2.UpdateWeightsResponse(results=[result])

    def _target(self, staged) -> torch.Tensor:
        """The memory the buckets land in: the staging file (gloo) or a flat GPU buffer of the same layout (nccl)."""
        if self.staging is None:
            buffer = staged.buffer
            if not buffer.size:
                return torch.empty(0, dtype=torch.uint8)
            return torch.frombuffer(buffer.read(0, 0, buffer.size), dtype=torch.uint8)
        return self.staging.allocate(staged.version, _specs(staged))

    def _run(self, staged, rv, timeout: float) -> tuple[Exception | None, dict]:
        """Joins (or reuses) the group and receives every bucket; returns (the error or None, timings)."""
        t0 = time.perf_counter()
        timings: dict = {}
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            return CollectiveError("another collective update still holds this server's group"), timings
        try:
            return self._run_locked(staged, rv, timeout, deadline, t0, timings), timings
        finally:
            self._lock.release()

    def _run_locked(self, staged, rv, timeout, deadline, t0, timings) -> Exception | None:
        from torch.distributed import PrefixStore

        base, seq = _parse_group_id(rv.group_id)
        try:
            host, port = _split(rv.store_address)
            held = self._held
            if held is None or not held.matches(rv, base, timeout):
                self._drop_held()  # another sender, or another deadline: that group is done
                held = self._held = _Held(rv.store_address, base, timeout, _store(host, port, False, timeout))
            store = PrefixStore(f"{base}/{seq}/", held.client)
            holding = held.pg_id if held.group is not None and held.header_rank == rv.rank else ""
            checkin = {"rank": rv.rank, "holding": holding}
            # torch's stub says str; the store takes bytes
            store.set(f"ready/{rv.rank}", _signed(rv.secret, "ready", rv.group_id, checkin))  # type: ignore[arg-type]
            plan = _wait_plan(store, rv, deadline)
            timings["checkin_s"] = time.perf_counter() - t0
            rank = plan["ranks"].get(str(rv.rank))
            if rank is None:
                held.drop_group()
                return CollectiveError(f"left out of group {rv.group_id} by the sender: {plan.get('reason', '')}")
            device = self.staging.device if self.staging is not None else None
            if device is not None:
                torch.cuda.set_device(device)
            t = time.perf_counter()
            target = self._target(staged)
            timings["target_s"] = time.perf_counter() - t
            t = time.perf_counter()
            if held.group is None or plan["pg"] != held.pg_id:
                held.drop_group()
                held.group = Group(
                    self.backend, PrefixStore(plan["pg"], held.client), rank, plan["world"], timeout,
                    local_address_towards(host), device,
                )  # fmt: skip
                held.pg_id, held.header_rank = plan["pg"], rv.rank
                if self.backend == "nccl":  # the sender's first collective: the communicator forms here
                    held.group.vote(True, time.monotonic() + timeout)
                timings["formed"] = 1
            else:
                timings["formed"] = 0
            timings["group_s"] = time.perf_counter() - t
            t = time.perf_counter()
            group = held.group
            size = len(target) if self.staging is None else _layout_size(staged)
            for lo, hi in buckets(size, rv.bucket_bytes or DEFAULT_BUCKET_BYTES):
                if hi > lo:
                    group.broadcast(target[lo:hi])  # gloo: blocks, its timeout raises; nccl: enqueued
            if group.backend == "nccl":
                group.wait_all(time.monotonic() + timeout)
            timings["transfer_s"] = time.perf_counter() - t
            t = time.perf_counter()
            slots = layout(_specs(staged))[0]
            bad = content_mismatch(staged, lambda i: target[slots[i].offset : slots[i].offset + slots[i].nbytes])
            timings["digest_s"] = time.perf_counter() - t
            t = time.perf_counter()
            if not group.vote(bad is None, time.monotonic() + timeout):  # every rank votes, even one that failed
                raise CollectiveError(
                    bad.message if bad is not None else "another rank of the group did not receive everything"
                )
            staged.content_checked = True
            timings["vote_s"] = time.perf_counter() - t
            if "#" not in rv.group_id:  # the sender keeps no group (FABRIC_COLLECTIVE_KEEP=0): neither does this end
                t = time.perf_counter()
                self._drop_held(abort=False)
                timings["close_s"] = time.perf_counter() - t
            return None
        except Exception as exc:  # the group broke (peer gone, deadline): this server keeps its version, drops it
            self._drop_held()
            return exc if isinstance(exc, Exception) else CollectiveError(str(exc))


def _wait_plan(store, rv, deadline: float) -> dict:
    """The sender's plan, signed with this update's secret; a plan someone else wrote is skipped until the deadline."""
    store.wait(["go"], datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.1)))
    while True:
        plan = _verified(rv.secret, "go", rv.group_id, store.get("go"))
        if plan is not None:
            return plan
        if time.monotonic() > deadline:
            raise CollectiveError("no plan signed with this update's secret arrived (the store holds someone else's)")
        time.sleep(0.01)


def _specs(staged) -> list:
    return [(t.name, PROTO_TO_TORCH[t.dtype], tuple(t.shape)) for t in staged.manifest.tensors]


def _mark_all(store, staged) -> None:
    for i, chunk in enumerate(staged.manifest.chunks):
        store.mark(staged, i, chunk.length)


def _layout_size(staged) -> int:
    return layout(_specs(staged))[1]


def _code():
    import grpc

    return grpc.StatusCode.ABORTED


# ---- sender ----------------------------------------------------------------------------------------------------


def unusable(backend: str, offer, source) -> str | None:
    if backend == "nccl":
        if source.device.type != "cuda":
            return f"the source tensors are on {source.device.type}: NCCL needs them on a GPU"
        if not torch.distributed.is_nccl_available():
            return "this torch has no NCCL"
    return None


class _Session:
    """The sender's side of a group kept across updates: its store, the process group while it holds, the packing
    buffers. One per (backend, device, servers, deadline); pushing to another set of servers starts another."""

    def __init__(self, key: tuple, host: str, timeout: float):
        self.key, self.host, self.timeout = key, host, timeout
        self.master = _master_store(host, timeout)
        self.store_address = f"{host}:{self.master.port}"
        self.base = f"fabric-{uuid.uuid4().hex[:12]}"
        self.seq = 0
        self.group: Group | None = None
        self.pg_id = ""
        self.members: tuple[int, ...] = ()  # header ranks of the held group, in order
        self.buffers: list[torch.Tensor] = []
        self.busy = False
        self.last_used = time.monotonic()
        self.flood = ""  # set by the guard thread: why the store is taken as flooded
        _start_guard(self)

    def drop_group(self, abort: bool = True) -> None:
        if self.group is not None:
            if abort:
                self.group.abort()
            self.group.close()
        self.group, self.pg_id, self.members = None, "", ()

    def flooded(self) -> str:
        """Why the store is taken as flooded ('' while it is not): more keys than this group's updates write."""
        limit = max_store_keys(len(self.key[1]) + 1)
        try:
            count = self.master.num_keys() if self.master is not None else 0
        except Exception as exc:  # noqa: BLE001 - a store that cannot answer is not trusted either
            return f"the collective store at {self.host}:{self.port} does not answer ({exc})"
        if count <= limit:
            return ""
        return (
            f"the collective store at {self.host}:{self.port} holds {count} keys, more than the {limit} an update "
            "writes: something else is writing to it; the update is refused and the store closed (the next push "
            "opens a new one)"
        )

    @property
    def port(self) -> int:
        return int(self.store_address.rsplit(":", 1)[1])

    def close(self) -> None:
        self.drop_group()
        self.buffers = []
        self.master = None
        _LIVE.discard(self)


_SESSIONS: dict[tuple, _Session] = {}
_SESSIONS_LOCK = threading.Lock()
MAX_IDLE_S = 3600.0  # a group unused this long is formed again (FABRIC_COLLECTIVE_MAX_IDLE_S)


_LIVE: set[_Session] = set()  # every store this process holds as a sender, watched by the guard thread
_GUARD: list[threading.Thread] = []


def _start_guard(session: _Session) -> None:
    with _SESSIONS_LOCK:
        _LIVE.add(session)
        if not _GUARD:
            _GUARD.append(threading.Thread(target=_guard, name="collective-store-guard", daemon=True))
            _GUARD[0].start()


def _guard() -> None:
    """Counts the keys of every store this sender holds: a flooded store kept between updates is closed (its memory
    goes with it); one an update is using is marked, and its group aborted, so the update stops and refuses."""
    while True:
        time.sleep(STORE_GUARD_S)
        with _SESSIONS_LOCK:
            live = list(_LIVE)
        for session in live:
            why = session.flooded()
            if not why:
                continue
            with _SESSIONS_LOCK:
                idle = not session.busy and _SESSIONS.get(session.key) is session
                if idle:
                    del _SESSIONS[session.key]
                elif session.busy and not session.flood:
                    session.flood = why
                else:
                    continue
            log.warning("%s", why)
            if idle:
                session.close()
            elif session.group is not None:
                session.group.abort()  # a broadcast under way fails at once instead of at the vote


def _take_session(backend: str, addresses: list[str], device, timeout: float) -> tuple[_Session | None, bool]:
    """The session for these servers (new, or the one kept from the last update), marked busy; (session, kept).
    A session for other servers of the same backend and device is closed: one group per sender and device."""
    key = (backend, tuple(addresses), str(device), float(timeout))
    max_idle = float(os.environ.get("FABRIC_COLLECTIVE_MAX_IDLE_S") or MAX_IDLE_S)
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is not None and session.busy:
            return None, False  # another push to the same servers is in flight: this one uses a group of its own
        if session is not None and time.monotonic() - session.last_used > max_idle:
            _SESSIONS.pop(key).close()
            session = None
        stale = [k for k in _SESSIONS if k[0] == backend and k[2] == str(device) and k != key]
        for k in stale:
            if not _SESSIONS[k].busy:
                _SESSIONS.pop(k).close()
        if session is not None:
            session.busy = True
            return session, True
    return None, False


def _put_session(session: _Session) -> None:
    with _SESSIONS_LOCK:
        session.busy = False
        session.last_used = time.monotonic()
        old = _SESSIONS.get(session.key)
        if old is not None and old is not session:
            if old.busy:
                session.close()  # the other push keeps the slot
                return
            old.close()
        _SESSIONS[session.key] = session


def close_sessions() -> None:
    """Drops every group this process holds as a sender (tests; exit)."""
    with _SESSIONS_LOCK:
        sessions = list(_SESSIONS.values())
        _SESSIONS.clear()
    for session in sessions:
        session.close()


atexit.register(close_sessions)


class _Packer:
    """Packs byte ranges of the staging layout out of the source's tensors into two reused buffers."""

    def __init__(self, source, bucket_bytes: int, device, buffers: list):
        specs = [(n, t.dtype, tuple(t.shape)) for n, t in zip(source.names, source.tensors, strict=True)]
        self.slots, self.size = layout(specs)
        self.raw = [source._raw(i) for i in range(len(source.tensors))]
        n = min(bucket_bytes, max(self.size, 1))
        if len(buffers) != 2 or any(b.numel() < n or b.device != torch.device(device) for b in buffers):
            buffers[:] = [torch.empty(n, dtype=torch.uint8, device=device) for _ in range(2)]
        self.buffers = buffers

    def pack(self, lo: int, hi: int, buffer: torch.Tensor) -> torch.Tensor:
        out = buffer[: hi - lo]
        for slot, raw in zip(self.slots, self.raw, strict=True):
            a, b = max(lo, slot.offset), min(hi, slot.offset + slot.nbytes)
            if a < b:
                out[a - lo : b - lo].copy_(raw[a - slot.offset : b - slot.offset], non_blocking=True)
        return out


def _broadcast_all(session, plan, timeout, source, bucket_bytes, stats) -> None:
    """Rank 0: forms the group unless the plan reuses it, broadcasts every bucket, and holds the vote (raises on any
    failure, after dropping the group)."""
    from torch.distributed import PrefixStore

    backend = session.key[0]
    device = source.device if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    t = time.perf_counter()
    try:
        if session.group is None or plan["pg"] != session.pg_id:
            session.drop_group()
            session.group = Group(
                backend, PrefixStore(plan["pg"], session.master), 0, plan["world"], timeout, session.host, device
            )
            session.pg_id = plan["pg"]
            if backend == "nccl":  # the communicator forms at the first collective: time it apart from the bytes
                session.group.vote(True, time.monotonic() + timeout)
            stats["formed"] = 1
        stats["group_s"] = time.perf_counter() - t
        group = session.group
        t = time.perf_counter()
        packer = _Packer(source, bucket_bytes, device, session.buffers)
        works: list = [None, None]
        for i, (lo, hi) in enumerate(buckets(packer.size, bucket_bytes)):
            if hi <= lo:
                continue
            buffer = packer.buffers[i % 2]
            if works[i % 2] is not None and backend == "nccl":
                works[i % 2].wait()  # the stream waits until the broadcast that read this buffer is done
            out = packer.pack(lo, hi, buffer)
            works[i % 2] = group.broadcast(out)
            stats["bytes"] += hi - lo
            if AFTER_BUCKET is not None:
                AFTER_BUCKET(i)
        if backend == "nccl":
            group.wait_all(time.monotonic() + timeout)
        stats["transfer_s"] = time.perf_counter() - t
        flooded = session.flood or session.flooded()
        if flooded:  # the vote would pass: refuse it here, so nobody commits
            raise StoreFlooded(flooded)
        t = time.perf_counter()
        if not group.vote(True, time.monotonic() + timeout):
            raise CollectiveError("a server did not receive everything: nobody commits")
        stats["vote_s"] = time.perf_counter() - t
    except Exception:
        session.drop_group()
        raise


async def send_group(backend, source, version, targets, timeout, report, bucket_bytes=None, group_timeout=None):
    """One collective for all `targets` [(address, status)]: results per server, in order."""
    from fabric import security
    from fabric.v1 import rollout_pb2_grpc
    from fabric.weights.sender import _failure

    t_start = time.perf_counter()
    bucket_bytes = int(bucket_bytes or os.environ.get("FABRIC_BUCKET_BYTES") or DEFAULT_BUCKET_BYTES)
    group_timeout = float(group_timeout or os.environ.get("FABRIC_COLLECTIVE_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    addresses = [t for t, _ in targets]
    device = source.device if backend == "nccl" else torch.device("cpu")
    keep = os.environ.get("FABRIC_COLLECTIVE_KEEP", "1") != "0"
    session, kept = _take_session(backend, addresses, device, group_timeout) if keep else (None, False)
    if session is not None and (flooded := session.flooded()):  # filled between updates: start on a new store
        log.warning("%s", flooded)
        session.close()
        session, kept = None, False
    if session is None:
        host = local_address_towards(_split(addresses[0])[0])
        key = (backend, tuple(addresses), str(device), float(group_timeout))
        session = await asyncio.to_thread(_Session, key, host, group_timeout)
        session.busy = True
    session.seq += 1
    seq = session.seq
    world = len(addresses) + 1
    from torch.distributed import PrefixStore

    store = PrefixStore(f"{session.base}/{seq}/", session.master)
    group_id = f"{session.base}#{seq}" if keep else session.base
    secret = secrets.token_hex(32)  # this update's: it travels only on the authenticated UpdateWeights streams
    digests = await asyncio.to_thread(source_digests, source)
    timings = {"kept_session": int(kept), "session_s": time.perf_counter() - t_start}

    async def stream(rank: int, address: str):
        header = rollout_pb2.UpdateWeightsHeader(
            weight_version=version,
            manifest=source.manifest,
            transport=backend,
            collective=rollout_pb2.CollectiveRendezvous(
                backend=backend, store_address=session.store_address, world_size=world, rank=rank,
                bucket_bytes=bucket_bytes, timeout_s=group_timeout, group_id=group_id, secret=secret,
            ),
            tensor_digests=digests,
        )  # fmt: skip

        async def requests():
            yield rollout_pb2.UpdateWeightsRequest(header=header)

        async with security.channel(address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            return list((await stub.UpdateWeights(requests(), timeout=timeout)).results)

    t = time.perf_counter()
    tasks = {rank: asyncio.ensure_future(stream(rank, a)) for rank, a in enumerate(addresses, start=1)}
    # Check-in: every server that accepted the header says ready (naming the group it holds); one that refused the
    # header ends its stream at once.
    deadline = time.monotonic() + group_timeout
    holding: dict[int, str] = {}
    while time.monotonic() < deadline:
        for rank in tasks:
            if rank not in holding and store.check([f"ready/{rank}"]):
                body = _verified(secret, "ready", group_id, store.get(f"ready/{rank}"))
                if body is not None and body.get("rank") == rank:  # else planted: wait for the server's own
                    holding[rank] = str(body.get("holding", ""))
        if all(r in holding or tasks[r].done() for r in tasks):
            break
        await asyncio.sleep(0.001)
    ready = tuple(sorted(holding))
    timings["checkin_s"] = time.perf_counter() - t
    left_out = [addresses[r - 1] for r in tasks if r not in holding]
    reason = f"not ready within {group_timeout:.0f} s: {', '.join(left_out)}" if left_out else ""
    reuse = session.group is not None and ready == session.members and all(holding[r] == session.pg_id for r in ready)
    if reuse:
        pg = session.pg_id
    else:
        pg = f"{session.base}/pg{seq}-{secrets.token_hex(8)}/"
    ranks = {str(r): i for i, r in enumerate(ready, start=1)}
    error: Exception | None = None
    if flooded := session.flood or session.flooded():  # nobody joins: each server is left out with the reason
        error, ranks, reason = StoreFlooded(flooded), {}, flooded
        log.warning("%s broadcast of version %d refused: %s", backend, version, flooded)
    plan = {"ranks": ranks, "world": len(ranks) + 1, "pg": pg, "reason": reason}
    store.set("go", _signed(secret, "go", group_id, plan))
    stats = {"bytes": 0, "transfer_s": 0.0, "formed": 0}
    if ranks:
        try:
            await asyncio.to_thread(_broadcast_all, session, plan, group_timeout, source, bucket_bytes, stats)
            session.members = ready
        except Exception as exc:
            error = StoreFlooded(session.flood) if session.flood else exc  # the guard aborted it: say why
            log.warning("%s broadcast of version %d failed: %s", backend, version, error)
    else:
        session.drop_group()
    t = time.perf_counter()
    report.bytes_sent += stats["bytes"]
    report.transfer_seconds = getattr(report, "transfer_seconds", 0.0) + stats["transfer_s"]
    report.group_seconds = stats.get("group_s", 0.0)
    results = []
    try:
        for rank, address in enumerate(addresses, start=1):
            try:
                rs = await tasks[rank]
            except Exception as exc:  # noqa: BLE001 - a server that died or refused: its own failure
                rs = [_failure(address, version, exc, "PUSH_FAILED")]
            if error is not None and rank in holding:
                # this sender's own broadcast failed: whatever the server says, it did not get this sender's
                # bytes, so it is not counted as updated (a server that committed anyway is reported as such)
                for r in rs:
                    if not r.error.code:
                        said = " (the server says it committed: not by this sender's send)" if r.committed else ""
                        failed = FabricError(
                            _code(), f"{address}: {backend} group failed: {error}{said}", "COLLECTIVE_FAILED"
                        )
                        r.error.CopyFrom(failed.to_proto())
                        r.committed = False
            results.extend(rs)
    finally:
        if isinstance(error, StoreFlooded):
            session.close()  # the store goes with what was written to it; the next push opens a new one
        elif keep:
            _put_session(session)
        else:
            t_close = time.perf_counter()
            session.drop_group(abort=False)
            _LIVE.discard(session)
            timings["close_s"] = time.perf_counter() - t_close
        with contextlib.suppress(Exception):  # this update's check-in keys: the store stays small
            for rank in tasks:
                store.delete_key(f"ready/{rank}")
            store.delete_key("go")
    timings.update({k: stats[k] for k in ("formed", "group_s", "transfer_s", "vote_s") if k in stats})
    timings["commit_wait_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    report.collective_timings = timings
    return results
