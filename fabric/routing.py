"""Spreading generation over rollout servers, and surviving one that dies mid-rollout.

`RolloutPool.generate(requests)` keeps one GenerateBatch stream per live server and sends each request to the
least-loaded one (fewest unfinished requests from this pool), or to the server its `session_key` hashes to, so a
multi-turn session keeps its prefix cache. When a server's stream breaks (killed, connection cut, keepalive timeout)
its unfinished requests are resubmitted to the others, asking only for the samples that had not arrived;
(request_id, sample_index) pairs already delivered are never delivered twice. A server that aborts samples on its
own (it drains on SIGTERM or is put to sleep) or refuses a request as UNAVAILABLE is treated the same way; a
resubmission carries a request_id of its own on the wire and is answered under the caller's. A dead server is out
of the pool until `admit()` brings it back (after the caller has brought it to the current weight version).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from dataclasses import dataclass, field

import grpc

from fabric import security
from fabric.v1 import reward_pb2, rollout_pb2, rollout_pb2_grpc

log = logging.getLogger(__name__)


class NoRolloutServerError(RuntimeError):
    pass


@dataclass
class _Pending:
    request: rollout_pb2.GenerateRequest
    missing: list[int]  # sample indices of the caller's request not delivered yet
    index_map: list[int] = field(default_factory=list)  # a resubmission's sample_index -> the caller's index
    caller_id: str = ""  # the caller's request_id; a resubmission travels under an id of its own

    def __post_init__(self):
        self.caller_id = self.caller_id or self.request.request_id


class _Server:
    def __init__(self, address: str, channel_factory):
        self.address = address
        self.channel = channel_factory(address)
        self.stub = rollout_pb2_grpc.RolloutServiceStub(self.channel)
        self.alive = True
        self.pending: dict[str, _Pending] = {}
        self.queue: asyncio.Queue | None = None
        self.error = ""


class RolloutPool:
    def __init__(self, addresses: Sequence[str], channel_factory=None, stream_timeout: float | None = 3600.0):
        if not addresses:
            raise ValueError("a rollout pool needs at least one server address")
        self.channel_factory = channel_factory or security.channel
        self.servers = {a: _Server(a, self.channel_factory) for a in addresses}
        self.stream_timeout = stream_timeout
        self.events: list[str] = []  # what happened (a server lost, requests resubmitted), for the run's log

    @property
    def alive(self) -> list[str]:
        return [a for a, s in self.servers.items() if s.alive]

    @property
    def lost(self) -> list[str]:
        """The servers out of routing (dead, or not re-admitted yet)."""
        return [a for a, s in self.servers.items() if not s.alive]

    def stubs(self) -> list[rollout_pb2_grpc.RolloutServiceStub]:
        """The live servers' stubs, for calls beside Generate (sleep, wake-up) on the pool's own channels."""
        return [s.stub for s in self.servers.values() if s.alive]

    def mark_dead(self, address: str, reason: str) -> None:
        server = self.servers[address]
        if server.alive:
            server.alive = False
            server.error = reason
            self.events.append(f"rollout server {address} lost: {reason}")
            log.warning("rollout server %s lost: %s", address, reason)

    async def admit(self, address: str) -> None:
        """(Re)admits a server, e.g. one restarted and brought to the current weight version."""
        old = self.servers.get(address)
        if old is not None:
            await old.channel.close()
        self.servers[address] = _Server(address, self.channel_factory)
        self.events.append(f"rollout server {address} admitted")

    def _pick(self, request: rollout_pb2.GenerateRequest) -> _Server:
        live = [s for s in self.servers.values() if s.alive]
        if not live:
            reasons = "; ".join(f"{s.address}: {s.error}" for s in self.servers.values())
            raise NoRolloutServerError(f"no rollout server left ({reasons})")
        if request.session_key:
            digest = int(hashlib.sha1(request.session_key.encode()).hexdigest(), 16)
            ordered = sorted(self.servers)  # stable over deaths: a key moves only when its server is down
            for offset in range(len(ordered)):
                server = self.servers[ordered[(digest + offset) % len(ordered)]]
                if server.alive:
                    return server
        return min(live, key=lambda s: len(s.pending))

    async def generate(
        self, requests: Sequence[rollout_pb2.GenerateRequest] | AsyncIterable[rollout_pb2.GenerateRequest]
    ) -> AsyncGenerator[rollout_pb2.GenerateResponse, None]:
        """Yields every sample of every request exactly once (sample_index as the caller asked), or the request's
        error response; completion order. Each request must set sampling.num_return_sequences.

        `requests` may be an async iterable (a stream): each request is routed as it comes, while samples of the
        earlier ones stream back, and the call ends once the stream has ended and every sample is delivered. The
        asynchronous trainer keeps one such call open for the whole run. request_ids must be unique per call."""
        out: asyncio.Queue = asyncio.Queue()
        delivered: set[tuple[str, int]] = set()
        expected = 0

        def count(request: rollout_pb2.GenerateRequest) -> int:
            n = request.sampling.num_return_sequences if request.sampling.HasField("num_return_sequences") else 0
            if n < 1:
                raise ValueError(f"request {request.request_id!r}: set sampling.num_return_sequences for the pool")
            return n

        streamed = not isinstance(requests, Sequence)
        if not streamed:
            for request in requests:  # type: ignore[union-attr]
                expected += count(request)
        readers: list[asyncio.Task] = []  # one per stream opened (a re-admitted server's new one too)
        retries = itertools.count(1)

        def submit(pending: _Pending) -> None:
            server = self._pick(pending.request)
            server.pending[pending.request.request_id] = pending
            if server.queue is None:
                server.queue = asyncio.Queue()
                readers.append(asyncio.create_task(read(server)))
            server.queue.put_nowait(pending.request)

        async def feed(server: _Server):
            """The requests routed to this server, as GenerateBatch messages: each takes every request queued by
            then, so a round goes out in one message and enters the engine in one pass."""
            queue = server.queue  # made by submit() before it started this reader; ends with a None
            assert queue is not None
            while (request := await queue.get()) is not None:
                batch = [request]
                while not queue.empty():
                    if (more := queue.get_nowait()) is None:
                        yield rollout_pb2.GenerateBatchRequest(requests=batch)
                        return
                    batch.append(more)
                yield rollout_pb2.GenerateBatchRequest(requests=batch)

        async def responses(call):
            async for batch in call:
                for response in batch.responses:
                    yield response

        def lose(server: _Server, reason: str) -> None:
            """A stream that ended with requests unanswered: they go to the other servers. The server leaves
            routing, unless it is no longer the pool's (re-admitted meanwhile: the new one stays)."""
            if self.servers.get(server.address) is server:
                self.mark_dead(server.address, reason)
            orphans = list(server.pending.values())
            server.pending.clear()
            out.put_nowait(("failover", server.address, orphans))

        async def read(server: _Server) -> None:
            queue = server.queue
            call = server.stub.GenerateBatch(feed(server), timeout=self.stream_timeout)
            reason = None
            try:
                async for response in responses(call):
                    wire_id = response.request_id
                    pending = server.pending.get(wire_id)
                    if pending is None:
                        continue
                    response.request_id = pending.caller_id
                    if response.error.code == grpc.StatusCode.UNAVAILABLE.value[0]:
                        # Refused because the server is going away (draining): another server takes the request.
                        server.pending.pop(wire_id, None)
                        self.mark_dead(server.address, response.error.message)
                        out.put_nowait(("failover", server.address, [pending]))
                        continue
                    if response.HasField("error"):
                        server.pending.pop(wire_id, None)
                        out.put_nowait(("error", response, pending))
                        continue
                    original = pending.index_map[response.sample_index] if pending.index_map else response.sample_index
                    response.sample_index = original
                    if response.finish_reason == rollout_pb2.FINISH_REASON_ABORT:
                        # The server gave the sample up (drained or put to sleep; the pool never aborts): it is
                        # not a sample, and another server generates it.
                        self.mark_dead(server.address, "it aborted in-flight samples (shutting down or asleep)")
                        if original in pending.missing:
                            pending.missing.remove(original)
                            one = _Pending(pending.request, [original], pending.index_map, pending.caller_id)
                            out.put_nowait(("failover", server.address, [one]))
                        if not pending.missing:
                            server.pending.pop(wire_id, None)
                        continue
                    if original in pending.missing:
                        pending.missing.remove(original)
                    if not pending.missing:
                        server.pending.pop(wire_id, None)
                    out.put_nowait(("sample", response, None))
                if server.pending:
                    reason = "the stream ended with requests unanswered"
            except grpc.aio.AioRpcError as err:
                reason = f"{err.code().name}: {err.details()}"
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the call is over: generate() is closing its readers
                # The call itself was cancelled, not this reader: its channel closed (the server was re-admitted
                # on a new one). What it still held goes elsewhere; a reader that just ended would lose it.
                reason = "CANCELLED: its stream was cancelled (its channel closed)"
            finally:
                call.cancel()
                if queue is not None:
                    queue.put_nowait(None)  # ends feed(), which the call may still be waiting on
                if server.queue is queue:  # a request routed here later opens a new stream
                    server.queue = None
            if reason is not None:
                lose(server, reason)

        async def pump(stream: AsyncIterable[rollout_pb2.GenerateRequest]) -> None:
            try:
                async for request in stream:
                    out.put_nowait(("request", request, None))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's loop
                out.put_nowait(("input_failed", exc, None))
                raise
            finally:
                out.put_nowait(("input_done", None, None))

        pumper: asyncio.Task | None = None
        if streamed:
            pumper = asyncio.create_task(pump(requests))  # type: ignore[arg-type]
        else:
            for request in requests:  # type: ignore[union-attr]
                submit(_Pending(request, list(range(request.sampling.num_return_sequences))))
        input_open = streamed
        try:
            while input_open or len(delivered) < expected:
                kind, payload, extra = await out.get()
                if kind == "request":
                    expected += count(payload)
                    submit(_Pending(payload, list(range(payload.sampling.num_return_sequences))))
                    continue
                if kind == "input_done":
                    input_open = False
                    continue
                if kind == "input_failed":
                    raise payload
                if kind == "failover":
                    for orphan in extra:
                        if not orphan.missing:
                            continue
                        self.events.append(
                            f"resubmitted {orphan.caller_id} ({len(orphan.missing)} samples) after losing {payload}"
                        )
                        # A server numbers a request's samples from 0 and seeds sample k with seed + k. With a seed,
                        # each missing sample goes alone with the seed it had: it is the sample it would have been,
                        # never a copy of another sample of its request.
                        seeded = orphan.request.sampling.HasField("seed")
                        parts = [[i] for i in orphan.missing] if seeded else [list(orphan.missing)]
                        for indices in parts:
                            retry = rollout_pb2.GenerateRequest()
                            retry.CopyFrom(orphan.request)
                            retry.sampling.num_return_sequences = len(indices)
                            if seeded:  # the orphan's request seeded its k-th sample with its seed + k
                                k = orphan.index_map.index(indices[0]) if orphan.index_map else indices[0]
                                retry.sampling.seed = orphan.request.sampling.seed + k
                            # Its own id: the target may still hold a live part of the same request.
                            retry.request_id = f"{orphan.caller_id}#retry{next(retries)}"
                            submit(_Pending(retry, list(indices), list(indices), orphan.caller_id))
                    continue
                if kind == "error":
                    pending = extra
                    for index in pending.missing:
                        delivered.add((payload.request_id, index))
                    yield payload
                    continue
                key = (payload.request_id, payload.sample_index)
                if key in delivered:
                    continue
                delivered.add(key)
                yield payload
        finally:
            if pumper is not None:
                pumper.cancel()
                await asyncio.gather(pumper, return_exceptions=True)
            for server in self.servers.values():
                if server.queue is not None:
                    server.queue.put_nowait(None)
                    server.queue = None
                server.pending.clear()
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def close(self) -> None:
        for server in self.servers.values():
            await server.channel.close()


# Per-item errors worth another try (google.rpc codes): the item was fine, the server was not.
_TRANSIENT_ITEM_CODES = {
    grpc.StatusCode.INTERNAL.value[0],
    grpc.StatusCode.UNAVAILABLE.value[0],
    grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
    grpc.StatusCode.ABORTED.value[0],
}


class RewardPool:
    """Scores items on the reward servers: the batch is split over the live servers, and a part whose server fails
    is retried on another one (or on the same after a backoff). A failed call never turns into a silent score of 0:
    after the retries the step fails with the reasons."""

    def __init__(
        self,
        addresses: Sequence[str],
        timeout: float = 300.0,
        attempts: int = 3,
        backoff_s: float = 1.0,
        channel_factory=None,
    ):
        from fabric.reward.client import RewardClient

        if not addresses:
            raise ValueError("a reward pool needs at least one server address")
        self.clients = {a: RewardClient(a, timeout=timeout) for a in addresses}
        if channel_factory is not None:
            from fabric.v1 import reward_pb2_grpc

            for address, client in self.clients.items():
                client.channel = channel_factory(address)
                client.stub = reward_pb2_grpc.RewardServiceStub(client.channel)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.events: list[str] = []

    async def score(self, items: list[dict]) -> list:
        addresses = list(self.clients)
        shares = [items[i :: len(addresses)] for i in range(len(addresses))]
        results = await asyncio.gather(*(self._score_share(share, k) for k, share in enumerate(shares) if share))
        by_id = {r.request_id: r for part in results for r in part}
        return [by_id[item["request_id"]] for item in items]

    async def _score_share(self, share: list[dict], first: int):
        """Scores `share`; items the server answered with a transient per-item error (the model failed on the batch,
        a deadline) are retried like a failed call; an item refused as invalid fails the step with the reason."""
        addresses = list(self.clients)
        errors: list[str] = []
        scored: list[reward_pb2.ScoreResponse] = []
        for attempt in range(self.attempts * len(addresses)):
            address = addresses[(first + attempt) % len(addresses)]
            try:
                responses = await self.clients[address].score(share, raise_on_error=False)
            except grpc.aio.AioRpcError as err:
                errors.append(f"{address}: {err.code().name}: {err.details()}")
                self.events.append(f"reward call to {address} failed ({err.code().name}); retrying elsewhere")
            else:
                failed = {r.request_id: r for r in responses if r.HasField("error") and r.error.code}
                scored.extend(r for r in responses if r.request_id not in failed)
                for r in failed.values():
                    if r.error.code not in _TRANSIENT_ITEM_CODES:
                        raise RuntimeError(
                            f"reward server {address} refused {r.request_id!r}: {r.error.message} ({r.error.reason})"
                        )
                if not failed:
                    return scored
                share = [item for item in share if item["request_id"] in failed]
                first_error = next(iter(failed.values())).error
                errors.append(f"{address}: {len(failed)} item(s): {first_error.message}")
                self.events.append(f"{len(failed)} item(s) failed on reward server {address}; retrying elsewhere")
            if (attempt + 1) % len(addresses) == 0:
                await asyncio.sleep(self.backoff_s * (attempt + 1) / len(addresses))
        raise RuntimeError(f"scoring failed on every reward server after retries: {'; '.join(errors[-3:])}")

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
