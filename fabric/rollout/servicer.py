"""fabric.v1.RolloutService over a VLLMEngine: validates, queues, maps proto <-> engine, streams samples back.

Path of a Generate request: `Generate` -> `_read` (validate, `_admit`) -> `pending` queue -> `_dispatch`
(at most infer_batch_size requests in the engine) -> `_run` -> one `_sample` per num_return_sequences ->
`VLLMEngine.generate` -> a GenerateResponse on the stream's queue as soon as that sample finishes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import grpc

from fabric.config.rollout import RolloutConfig
from fabric.errors import FabricError, invalid, precondition, unavailable
from fabric.rollout.engine import WAKE_TAGS, FinishReason, RolloutEngine, Sample, Sampling, SleepState
from fabric.rollout.validation import resolve_request
from fabric.v1 import rollout_pb2, rollout_pb2_grpc

log = logging.getLogger(__name__)

_END = object()  # ends a stream's response queue
# Responses a stream may hold that its client has not read, plus its requests still owed answers: past it, the
# stream's next request is not read (backpressure), so the queue stays under this times the samples per request.
MAX_UNSENT_RESPONSES = 256

# The engine's plain enums <-> the wire's.
_FINISH_REASONS = {
    FinishReason.STOP: rollout_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: rollout_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: rollout_pb2.FINISH_REASON_ABORT,
    FinishReason.UNSPECIFIED: rollout_pb2.FINISH_REASON_UNSPECIFIED,
}
_SLEEP_STATES = {
    SleepState.AWAKE: rollout_pb2.SLEEP_STATE_AWAKE,
    SleepState.ASLEEP: rollout_pb2.SLEEP_STATE_ASLEEP,
    SleepState.WEIGHTS_ONLY: rollout_pb2.SLEEP_STATE_WEIGHTS_ONLY,
}


@dataclass(eq=False)
class _Stream:
    """One Generate call: its response queue and its live requests by client id."""

    id: int
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    live: dict[str, _Request] = field(default_factory=dict)
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
            self.out.put_nowait(_END)


@dataclass(eq=False)
class _Request:
    """A live request: waiting in `pending`, then in the engine (task set) until all its samples are sent."""

    stream: _Stream
    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    engine_ids: list[str] = field(default_factory=list)
    task: asyncio.Task | None = None


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, engine: RolloutEngine, config: RolloutConfig, server_name: str = ""):
        self.engine = engine
        self.config = config
        self.server_name = server_name
        self.pending: deque[_Request] = deque()  # waiting for an engine slot, oldest first
        self.running = 0  # requests in the engine
        self.by_id: dict[str, set[_Request]] = {}  # client request id -> live requests on any stream (for Abort)
        self.streams: set[_Stream] = set()
        self.draining = False
        self.going_to_sleep = False
        self._stream_ids = itertools.count(1)
        self._receiver = None

    # ---- Generate ----

    def _asleep(self) -> FabricError | None:
        if self.going_to_sleep or self.engine.sleep_state != SleepState.AWAKE:
            state = rollout_pb2.SleepState.Name(_SLEEP_STATES[self.engine.sleep_state])
            return unavailable(
                f"the rollout server is asleep ({state}): call WakeUp (tags weights, then kv_cache) before Generate",
                reason="ASLEEP",
            )
        return None

    async def Generate(self, request_iterator, context):
        refusal = self._asleep() or (self.draining and unavailable("the rollout server is shutting down", "DRAINING"))
        if refusal:
            # Take the first request before refusing: a status sent while the client is still writing its first
            # message can reach it as INTERNAL ("Internal error from Core") instead of this code.
            try:
                await asyncio.wait_for(request_iterator.__anext__(), timeout=1.0)
            except Exception:  # end of stream, no request within the second, a broken stream: refuse all the same
                pass
            raise refusal
        stream = _Stream(next(self._stream_ids))
        self.streams.add(stream)
        reader = asyncio.create_task(self._read(stream, request_iterator))
        try:
            while True:
                item = await stream.out.get()
                stream.taken.set()
                if item is _END:
                    return
                if isinstance(item, FabricError):
                    raise item
                yield item
        finally:
            # Normal end, stream-level error or a client that went away: nothing of this stream stays in the engine.
            reader.cancel()
            self.streams.discard(stream)
            for request in list(stream.live.values()):
                self._drop(request)

    async def _read(self, stream: _Stream, request_iterator) -> None:
        try:
            async for request in request_iterator:
                await stream.room()
                refusal = self._asleep()
                if refusal:  # stream-level: the whole call ends UNAVAILABLE
                    stream.out.put_nowait(refusal)
                    return
                try:
                    self._admit(stream, request)
                except FabricError as err:  # per item: this request is refused, the stream goes on
                    stream.out.put_nowait(self._error_response(request.request_id, err))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client's side of the stream broke; the handler cleans up
            log.debug("stream %d: reading requests failed: %r", stream.id, exc)
        finally:
            stream.reading = False
            stream.end_if_done()

    def _admit(self, stream: _Stream, request: rollout_pb2.GenerateRequest) -> None:
        if self.draining:
            raise unavailable("the rollout server is shutting down: send this request to another server", "DRAINING")
        if request.request_id and request.request_id in stream.live:
            raise invalid(
                "request_id",
                f"{request.request_id!r} is already live on this stream: ids must be unique among its live requests",
                reason="DUPLICATE_REQUEST_ID",
            )
        engine = self.engine
        prompt_ids, sampling = resolve_request(
            request, self.config.generating_args, engine.tokenize, engine.vocab_size, engine.max_model_len
        )
        if len(self.pending) >= self.config.max_queue_length:
            raise FabricError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queue full: {len(self.pending)} requests wait for the engine (max_queue_length); "
                "retry later or send to another server",
                reason="QUEUE_FULL",
            )
        live = _Request(stream, request.request_id, prompt_ids, sampling)
        stream.live[live.request_id] = live
        self.by_id.setdefault(live.request_id, set()).add(live)
        self.pending.append(live)
        self._dispatch()

    def _dispatch(self) -> None:
        """Moves waiting requests into the engine while fewer than infer_batch_size are there."""
        while self.pending and self.running < self.config.infer_batch_size:
            request = self.pending.popleft()
            self.running += 1
            # Engine ids are unique across streams; responses echo the client's id.
            request.engine_ids = [
                f"s{request.stream.id}/{i}/{request.request_id}" for i in range(request.sampling.num_return_sequences)
            ]
            request.task = asyncio.create_task(self._run(request))

    async def _run(self, request: _Request) -> None:
        version = self.engine.weight_version  # the version in force when the request entered the engine
        try:
            await asyncio.gather(*(self._sample(request, i, version) for i in range(len(request.engine_ids))))
        finally:
            self.running -= 1
            self._forget(request)
            self._dispatch()

    async def _sample(self, request: _Request, index: int, version: int) -> None:
        try:
            sample = await self.engine.generate(request.engine_ids[index], request.prompt_ids, request.sampling, index)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an engine failure answers this sample; the server and stream go on
            log.warning("request %r sample %d failed: %r", request.request_id, index, exc)
            err = FabricError(grpc.StatusCode.INTERNAL, f"generation failed in the engine: {exc}", "ENGINE_ERROR")
            response = self._error_response(request.request_id, err)
            response.sample_index = index
            request.stream.out.put_nowait(response)
            return
        request.stream.out.put_nowait(
            self._sample_response(request, index, sample, version, last_version=self.engine.weight_version)
        )

    def _sample_response(
        self, request: _Request, index: int, sample: Sample, version: int, last_version: int | None = None
    ):
        return rollout_pb2.GenerateResponse(
            request_id=request.request_id,
            sample_index=index,
            token_ids=sample.token_ids,
            text=sample.text,
            logprobs=sample.logprobs,
            finish_reason=_FINISH_REASONS[sample.finish_reason],
            weight_version=version,
            first_weight_version=version,
            last_weight_version=version if last_version is None else last_version,
            prompt_token_ids=request.prompt_ids,
            server=self.server_name,
        )

    def _error_response(self, request_id: str, err: FabricError) -> rollout_pb2.GenerateResponse:
        return rollout_pb2.GenerateResponse(request_id=request_id, error=err.to_proto(), server=self.server_name)

    def _forget(self, request: _Request) -> None:
        stream = request.stream
        if stream.live.get(request.request_id) is request:
            del stream.live[request.request_id]
        same_id = self.by_id.get(request.request_id)
        if same_id is not None:
            same_id.discard(request)
            if not same_id:
                del self.by_id[request.request_id]
        stream.end_if_done()

    def _drop(self, request: _Request) -> None:
        """The stream is gone: remove a waiting request, cancel a running one (vLLM aborts it in the engine)."""
        if request.task is None:
            self.pending.remove(request)
            self._forget(request)
        else:
            request.task.cancel()

    async def _abort(self, request: _Request) -> None:
        """Aborts a live request; its samples are still answered, with finish reason abort."""
        if request.task is None:
            self.pending.remove(request)
            aborted = Sample(token_ids=[], text="", logprobs=[], finish_reason=FinishReason.ABORT)
            for index in range(request.sampling.num_return_sequences):
                response = self._sample_response(request, index, aborted, self.engine.weight_version)
                request.stream.out.put_nowait(response)
            self._forget(request)
        else:
            await self.engine.abort(request.engine_ids)

    async def _abort_all(self) -> None:
        for request in [*self.pending, *(r for ids in self.by_id.values() for r in ids if r.task is not None)]:
            await self._abort(request)

    # ---- Abort ----

    async def Abort(self, request, context):
        if not request.request_ids:
            raise invalid("request_ids", "empty: name at least one request id to abort")
        aborted = []
        for request_id in dict.fromkeys(request.request_ids):
            live = list(self.by_id.get(request_id, ()))
            if live:
                aborted.append(request_id)
            for one in live:
                await self._abort(one)
        return rollout_pb2.AbortResponse(aborted_request_ids=aborted)

    # ---- Sleep / wake-up ----

    async def Sleep(self, request, context):
        level = request.level or self.config.sleep_level
        if level not in (1, 2):
            raise invalid("level", f"must be 1 or 2 (0: the server's sleep_level), got {request.level}")
        if self.engine.sleep_state == SleepState.AWAKE and not self.going_to_sleep:
            self.going_to_sleep = True  # refuse new requests from here on
            try:
                await self._abort_all()
                await self.engine.sleep(level)
            finally:
                self.going_to_sleep = False
            log.info("asleep (level %d)", level)
        return rollout_pb2.SleepResponse(state=_SLEEP_STATES[self.engine.sleep_state], level=self.engine.sleep_level)

    async def WakeUp(self, request, context):
        tags = list(dict.fromkeys(request.tags))
        for i, tag in enumerate(tags):
            if tag not in WAKE_TAGS:
                raise invalid(f"tags[{i}]", f"unknown tag {tag!r}: use {' or '.join(WAKE_TAGS)}")
        if self.engine.sleep_state == SleepState.ASLEEP and tags == ["kv_cache"]:
            raise precondition(
                "wake up in two steps: tags [weights] first, then [kv_cache] (or empty tags for both)",
                "WAKE_ORDER",
                "tags",
            )
        await self.engine.wake_up(tags)
        log.info("wake-up %s -> %s", tags or "all", self.engine.sleep_state)
        return rollout_pb2.WakeUpResponse(state=_SLEEP_STATES[self.engine.sleep_state])

    # ---- Info ----

    async def GetServerInfo(self, request, context):
        import json

        engine = self.engine
        # issue 13 (GPU): accelerator memory as the engine reads it, so a client sees what sleep freed
        free, total = engine.device_memory() if hasattr(engine, "device_memory") else (0, 0)
        return rollout_pb2.RolloutServiceGetServerInfoResponse(
            model=engine.model_dir,
            engine_config_json=engine.engine_config_json(),
            weight_version=engine.weight_version,
            queue_depth=len(self.pending),
            running_requests=self.running,
            sleep_state=_SLEEP_STATES[engine.sleep_state],
            sleep_level=engine.sleep_level,
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            infer_batch_size=self.config.infer_batch_size,
            generating_args_json=json.dumps(self.config.generating_args, sort_keys=True),
            server=self.server_name,
            engine_version=engine.engine_version,
            device_memory_free_bytes=free,
            device_memory_total_bytes=total,
        )

    # ---- Weights: fabric.weights.receiver does the work ----

    @property
    def receiver(self):
        if self._receiver is None:
            from fabric.weights.receiver import WeightReceiver

            self._receiver = WeightReceiver(self.engine, self.server_name)
        return self._receiver

    async def UpdateWeights(self, request_iterator, context):
        return await self.receiver.update_weights(request_iterator, context.time_remaining())

    async def GetWeightsStatus(self, request, context):
        return self.receiver.status()

    def close(self) -> None:
        """The server has stopped: delete the weight staging files (RAM-backed shared memory)."""
        if self._receiver is not None:
            self._receiver.close()

    # ---- Shutdown ----

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
            await self._abort_all()
            settle = loop.time() + 5.0
            while self.running and loop.time() < settle:
                await asyncio.sleep(0.05)
        for stream in list(self.streams):
            stream.out.put_nowait(_END)
