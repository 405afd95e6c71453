"""The rollout server's scheduler: the admission queue, dispatch into the engine and drain, in engine types only.

The servicer (fabric.rollout.servicer) validates each request and hands it here as prompt ids and a Sampling;
`admit` queues it in `pending`, `_dispatch` keeps at most infer_batch_size requests in the engine (an idle engine
first waits out the admission window, so that a burst enters in one pass: `_hold`), `_run` starts one
`_sample` per num_return_sequences, and each finished sample goes onto its stream's `out` queue as an `Answer`,
which the servicer turns into a GenerateResponse. As the reward side's fabric.reward.batcher.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import grpc

from fabric.errors import FabricError, invalid, unavailable
from fabric.rollout.engine import FinishReason, RolloutEngine, Sample, Sampling

log = logging.getLogger(__name__)

END = object()  # ends a stream's `out` queue
# Responses a stream may hold that its client has not read, plus its requests still owed answers: past it, the
# stream's next request is not read (backpressure), so the queue stays under this times the samples per request.
MAX_UNSENT_RESPONSES = 256
# A burst held for an idle engine never waits longer than this many admission windows.
MAX_HOLD_WINDOWS = 25


@dataclass
class Answer:
    """One sample (or an error for one request) for the client; the servicer maps it to a GenerateResponse."""

    request_id: str
    index: int = 0
    sample: Sample | None = None
    error: FabricError | None = None
    prompt_ids: list[int] = field(default_factory=list)
    version: int = 0  # the weight version in force when the request entered the engine
    last_version: int = 0  # ... and when its sample finished


@dataclass(eq=False)
class Stream:
    """One Generate call: its `out` queue (Answer, a stream-level FabricError, or END) and its live requests."""

    id: int
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    live: dict[str, Request] = field(default_factory=dict)
    reading: bool = True
    taken: asyncio.Event = field(default_factory=asyncio.Event)  # set when the call takes a response off `out`

    async def room(self) -> None:
        """Backpressure: while the client's unread responses and its requests still owed answers reach
        MAX_UNSENT_RESPONSES, its next request is not read."""
        while self.out.qsize() + len(self.live) >= MAX_UNSENT_RESPONSES:
            self.taken.clear()
            await self.taken.wait()

    def end_if_done(self) -> None:
        """The client sent its last request and every one is answered: end the stream."""
        if not self.reading and not self.live:
            self.out.put_nowait(END)


@dataclass(eq=False)
class Request:
    """A live request: waiting in `pending`, then in the engine (task set) until all its samples are sent."""

    stream: Stream
    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    engine_ids: list[str] = field(default_factory=list)
    task: asyncio.Task | None = None


class Scheduler:
    def __init__(
        self, engine: RolloutEngine, infer_batch_size: int, max_queue_length: int, admission_window_s: float = 0.0
    ):
        self.engine = engine
        self.infer_batch_size = infer_batch_size
        self.max_queue_length = max_queue_length
        self.admission_window_s = admission_window_s
        self._hold_timer: asyncio.TimerHandle | None = None
        self._held_since = 0.0
        self.pending: deque[Request] = deque()  # waiting for an engine slot, oldest first
        self.running = 0  # requests in the engine
        self.by_id: dict[str, set[Request]] = {}  # client request id -> live requests on any stream (for Abort)
        self.streams: set[Stream] = set()
        self.draining = False
        self._stream_ids = itertools.count(1)

    # ---- streams and admission ----

    def open_stream(self) -> Stream:
        stream = Stream(next(self._stream_ids))
        self.streams.add(stream)
        return stream

    def close_stream(self, stream: Stream) -> None:
        """The call ended (normally, on an error, or its client went away): nothing of it stays in the engine."""
        self.streams.discard(stream)
        for request in list(stream.live.values()):
            self._drop(request)

    def check_open(self, stream: Stream, request_id: str) -> None:
        """Refusals that come before the request's own validation: draining, an id already live on the stream."""
        if self.draining:
            raise unavailable("the rollout server is shutting down: send this request to another server", "DRAINING")
        if request_id and request_id in stream.live:
            raise invalid(
                "request_id",
                f"{request_id!r} is already live on this stream: ids must be unique among its live requests",
                reason="DUPLICATE_REQUEST_ID",
            )

    def admit(self, stream: Stream, request_id: str, prompt_ids: list[int], sampling: Sampling) -> None:
        """Queues a validated request (or refuses it when the queue is full) and dispatches what fits."""
        # Held requests that will fit in the engine when the window closes do not wait for it.
        waiting = len(self.pending) - max(0, self.infer_batch_size - self.running)
        if waiting >= self.max_queue_length:
            raise FabricError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queue full: {waiting} requests wait for the engine (max_queue_length); "
                "retry later or send to another server",
                reason="QUEUE_FULL",
            )
        live = Request(stream, request_id, prompt_ids, sampling)
        stream.live[live.request_id] = live
        self.by_id.setdefault(live.request_id, set()).add(live)
        self.pending.append(live)
        if self.running == 0 and self.admission_window_s > 0 and len(self.pending) < self.infer_batch_size:
            self._hold()
        else:
            self._dispatch()

    # ---- dispatch ----

    def _hold(self) -> None:
        """An idle engine waits until no request has come for one admission window (at most MAX_HOLD_WINDOWS from
        the first): over Generate a round's requests arrive one gRPC message at a time, and dispatched one by one
        they enter vLLM over several engine steps, where a caller's gather in-process adds them at once. (On an H200
        the window alone did not bring a round's samples back together: they still came 0.5-0.9 s apart.)"""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._hold_timer is None:
            self._held_since = now
        else:
            self._hold_timer.cancel()
        last = self._held_since + MAX_HOLD_WINDOWS * self.admission_window_s
        self._hold_timer = loop.call_at(min(now + self.admission_window_s, last), self._dispatch)

    def _dispatch(self) -> None:
        """Moves waiting requests into the engine while fewer than infer_batch_size are there."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        while self.pending and self.running < self.infer_batch_size:
            request = self.pending.popleft()
            self.running += 1
            # Engine ids are unique across streams; responses echo the client's id.
            request.engine_ids = [
                f"s{request.stream.id}/{i}/{request.request_id}" for i in range(request.sampling.num_return_sequences)
            ]
            request.task = asyncio.create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        version = self.engine.weight_version  # the version in force when the request entered the engine
        try:
            await asyncio.gather(*(self._sample(request, i, version) for i in range(len(request.engine_ids))))
        finally:
            self.running -= 1
            self._forget(request)
            self._dispatch()

    async def _sample(self, request: Request, index: int, version: int) -> None:
        try:
            sample = await self.engine.generate(request.engine_ids[index], request.prompt_ids, request.sampling, index)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an engine failure answers this sample; the server and stream go on
            log.warning("request %r sample %d failed: %r", request.request_id, index, exc)
            err = FabricError(grpc.StatusCode.INTERNAL, f"generation failed in the engine: {exc}", "ENGINE_ERROR")
            request.stream.out.put_nowait(Answer(request.request_id, index, error=err))
            return
        last = self.engine.weight_version
        request.stream.out.put_nowait(
            Answer(request.request_id, index, sample, None, request.prompt_ids, version, last)
        )

    def _forget(self, request: Request) -> None:
        stream = request.stream
        if stream.live.get(request.request_id) is request:
            del stream.live[request.request_id]
        same_id = self.by_id.get(request.request_id)
        if same_id is not None:
            same_id.discard(request)
            if not same_id:
                del self.by_id[request.request_id]
        stream.end_if_done()

    def _drop(self, request: Request) -> None:
        """The stream is gone: remove a waiting request, cancel a running one (vLLM aborts it in the engine)."""
        if request.task is None:
            self.pending.remove(request)
            self._forget(request)
        else:
            request.task.cancel()

    # ---- abort and drain ----

    async def _abort(self, request: Request) -> None:
        """Aborts a live request; its samples are still answered, with finish reason abort."""
        if request.task is None:
            self.pending.remove(request)
            aborted = Sample(token_ids=[], text="", logprobs=[], finish_reason=FinishReason.ABORT)
            version = self.engine.weight_version
            for index in range(request.sampling.num_return_sequences):
                answer = Answer(request.request_id, index, aborted, None, request.prompt_ids, version, version)
                request.stream.out.put_nowait(answer)
            self._forget(request)
        else:
            await self.engine.abort(request.engine_ids)

    async def abort(self, request_ids: list[str]) -> list[str]:
        """Aborts the live requests with these client ids on every stream; returns the ids that were live."""
        aborted = []
        for request_id in dict.fromkeys(request_ids):
            live = list(self.by_id.get(request_id, ()))
            if live:
                aborted.append(request_id)
            for one in live:
                await self._abort(one)
        return aborted

    async def abort_all(self) -> None:
        for request in [*self.pending, *(r for ids in self.by_id.values() for r in ids if r.task is not None)]:
            await self._abort(request)

    async def drain(self, grace: float) -> None:
        """SIGTERM: take no new requests, let live ones finish for `grace` seconds, abort the rest, end streams."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        log.info("draining: %d running, %d queued; grace %.0f s", self.running, len(self.pending), grace)
        while (self.running or self.pending) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.running or self.pending:
            log.info("grace over: aborting %d running and %d queued requests", self.running, len(self.pending))
            await self.abort_all()
            settle = loop.time() + 5.0
            while self.running and loop.time() < settle:
                await asyncio.sleep(0.05)
        for stream in list(self.streams):
            stream.out.put_nowait(END)
