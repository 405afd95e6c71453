"""fabric.v1.RolloutService over a RolloutEngine: validates requests, maps proto <-> engine types, streams samples
back. The queue, dispatch and drain are the scheduler's (fabric.rollout.scheduler).

Path of a Generate request (GenerateBatch: the same, many per message): `Generate` -> `_generate` -> `_read`
(validate: fabric.rollout.validation) -> `Scheduler.admit` -> `pending` queue -> dispatch (at most infer_batch_size
requests in the engine) -> one engine `generate` per num_return_sequences -> an `Answer` on the stream's queue as
soon as that sample finishes -> `_response` -> a GenerateResponse on the call (GenerateBatch: the answers finished
meanwhile in one GenerateBatchResponse).
"""

from __future__ import annotations

import asyncio
import json
import logging

from fabric.errors import FabricError, invalid, precondition, unavailable
from fabric.rollout.config import RolloutConfig
from fabric.rollout.engine import WAKE_TAGS, FinishReason, RolloutEngine, SleepState
from fabric.rollout.scheduler import END, Answer, Scheduler, Stream
from fabric.rollout.validation import resolve_request
from fabric.v1 import rollout_pb2, rollout_pb2_grpc

log = logging.getLogger(__name__)

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


# A GenerateBatchResponse takes the samples finished meanwhile up to about this size (the channels allow 64 MiB).
MAX_BATCH_RESPONSE_BYTES = 4 << 20


def _approximate_bytes(item) -> int:
    """An Answer's size on the wire, roughly: token ids, logprobs and text (an END or an error: nothing)."""
    sample = getattr(item, "sample", None)
    if sample is None:
        return 0
    return 8 * len(sample.token_ids) + len(sample.text) + 4 * len(getattr(item, "prompt_ids", ()))


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, engine: RolloutEngine, config: RolloutConfig, server_name: str = ""):
        self.engine = engine
        self.config = config
        self.server_name = server_name
        self.scheduler = Scheduler(engine, config.infer_batch_size, config.max_queue_length, config.admission_window_s)
        self.going_to_sleep = False
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
        async for answers in self._generate(request_iterator, batched=False):
            for response in answers:
                yield response

    async def GenerateBatch(self, request_iterator, context):
        async for answers in self._generate(request_iterator, batched=True):
            yield rollout_pb2.GenerateBatchResponse(responses=answers)

    async def _generate(self, request_iterator, batched: bool):
        """One stream either way; yields the responses ready together (Generate sends them one by one)."""
        refusal = self._asleep() or (
            self.scheduler.draining and unavailable("the rollout server is shutting down", "DRAINING")
        )
        if refusal:
            # Take the first request before refusing: a status sent while the client is still writing its first
            # message can reach it as INTERNAL ("Internal error from Core") instead of this code.
            try:
                await asyncio.wait_for(request_iterator.__anext__(), timeout=1.0)
            except Exception:  # end of stream, no request within the second, a broken stream: refuse all the same
                pass
            raise refusal
        stream = self.scheduler.open_stream()
        reader = asyncio.create_task(self._read(stream, request_iterator, batched))
        try:
            while True:
                items = [await stream.out.get()]
                size = 0
                while not stream.out.empty() and size < MAX_BATCH_RESPONSE_BYTES:  # what finished meanwhile
                    items.append(stream.out.get_nowait())
                    size += _approximate_bytes(items[-1])
                stream.taken.set()
                answers, end = [], None
                for item in items:
                    if item is END or isinstance(item, FabricError):
                        end = item
                        break
                    answers.append(self._response(item))
                if answers:
                    yield answers
                if isinstance(end, FabricError):
                    raise end
                if end is END:
                    return
        finally:
            reader.cancel()
            self.scheduler.close_stream(stream)

    async def _read(self, stream: Stream, request_iterator, batched: bool) -> None:
        try:
            async for message in request_iterator:
                for request in message.requests if batched else (message,):
                    await stream.room()
                    refusal = self._asleep()
                    if refusal:  # stream-level: the whole call ends UNAVAILABLE
                        stream.out.put_nowait(refusal)
                        return
                    try:
                        self._admit(stream, request)
                    except FabricError as err:  # per item: this request is refused, the stream goes on
                        stream.out.put_nowait(Answer(request.request_id, error=err))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client's side of the stream broke; the handler cleans up
            log.debug("stream %d: reading requests failed: %r", stream.id, exc)
        finally:
            stream.reading = False
            stream.end_if_done()

    def _admit(self, stream: Stream, request: rollout_pb2.GenerateRequest) -> None:
        self.scheduler.check_open(stream, request.request_id)
        engine = self.engine
        prompt_ids, sampling = resolve_request(
            request, self.config.generating_args, engine.tokenize, engine.vocab_size, engine.max_model_len
        )
        self.scheduler.admit(stream, request.request_id, prompt_ids, sampling)

    def _response(self, answer: Answer) -> rollout_pb2.GenerateResponse:
        if answer.error is not None:
            return rollout_pb2.GenerateResponse(
                request_id=answer.request_id,
                sample_index=answer.index,
                error=answer.error.to_proto(),
                server=self.server_name,
            )
        sample = answer.sample
        assert sample is not None  # an Answer holds a sample or an error
        return rollout_pb2.GenerateResponse(
            request_id=answer.request_id,
            sample_index=answer.index,
            token_ids=sample.token_ids,
            text=sample.text,
            logprobs=sample.logprobs,
            finish_reason=_FINISH_REASONS[sample.finish_reason],
            weight_version=answer.version,
            first_weight_version=answer.version,
            last_weight_version=answer.last_version,
            prompt_token_ids=answer.prompt_ids,
            server=self.server_name,
        )

    # ---- Abort ----

    async def Abort(self, request, context):
        if not request.request_ids:
            raise invalid("request_ids", "empty: name at least one request id to abort")
        aborted = await self.scheduler.abort(list(request.request_ids))
        return rollout_pb2.AbortResponse(aborted_request_ids=aborted)

    # ---- Sleep / wake-up ----

    async def Sleep(self, request, context):
        level = request.level or self.config.sleep_level
        if level not in (1, 2):
            raise invalid("level", f"must be 1 or 2 (0: the server's sleep_level), got {request.level}")
        if self.engine.sleep_state == SleepState.AWAKE and not self.going_to_sleep:
            self.going_to_sleep = True  # refuse new requests from here on
            try:
                await self.scheduler.abort_all()
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
        engine = self.engine
        # issue 13 (GPU): accelerator memory as the engine reads it, so a client sees what sleep freed
        free, total = engine.device_memory() if hasattr(engine, "device_memory") else (0, 0)
        return rollout_pb2.RolloutServiceGetServerInfoResponse(
            model=engine.model_dir,
            engine_config_json=engine.engine_config_json(),
            weight_version=engine.weight_version,
            queue_depth=len(self.scheduler.pending),
            running_requests=self.scheduler.running,
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
        """SIGTERM: the scheduler takes no new requests, lets live ones finish for `grace` seconds, aborts the rest."""
        await self.scheduler.drain(grace)
