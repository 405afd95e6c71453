"""fabric.v1.RewardService: validates each ScoreRequest, hands it to its scorer's batcher, streams results back.

Path of a Score item: Score() -> _validate() -> Batcher.submit() -> Scorer.score_batch() (rules.py / hf.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os

import grpc

from fabric.errors import FabricError, internal, invalid
from fabric.reward.batcher import Batcher
from fabric.reward.scorer import ScoreItem, Scorer, ScoreResult
from fabric.v1 import reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, scorers: dict[str, Scorer]):
        self.scorers = scorers
        self.label = f"fabric reward server (pid {os.getpid()})"  # GetServerInfo.server; the server adds its address
        self.batchers = {
            name: Batcher(s, s.config.infer_batch_size, s.config.batch_wait_ms / 1000) for name, s in scorers.items()
        }

    async def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    async def stop(self) -> None:
        await asyncio.gather(*(b.stop() for b in self.batchers.values()))

    async def drain(self, grace: float) -> None:
        """On SIGTERM: give accepted items up to `grace` seconds to be answered."""
        try:
            await asyncio.wait_for(asyncio.gather(*(b.wait_idle() for b in self.batchers.values())), grace)
        except TimeoutError:
            log.warning("drain: %d items still unscored after %.0f s", self.queue_depth, grace)

    @property
    def queue_depth(self) -> int:
        return sum(b.depth for b in self.batchers.values())

    def _validate(self, req: reward_pb2.ScoreRequest, live_ids) -> Scorer:
        if not req.request_id:
            raise invalid("request_id", "required: give each item a unique id to match its response")
        if req.request_id in live_ids:
            raise invalid(
                "request_id",
                f"{req.request_id!r} is already being scored on this stream; use unique ids",
                "DUPLICATE_REQUEST_ID",
            )
        scorer = self.scorers.get(req.reward_name)
        if scorer is None:
            raise invalid(
                "reward_name",
                f"unknown reward {req.reward_name!r}; loaded: {', '.join(self.scorers)}",
                "UNKNOWN_REWARD",
            )
        if not req.response.strip():
            raise invalid("response", "empty: send the generated text to score", "EMPTY_RESPONSE")
        limit = scorer.config.max_input_chars
        for field in ("prompt", "response", "ground_truth"):
            size = len(getattr(req, field))
            if size > limit:
                raise invalid(
                    field,
                    f"{size} characters, over the limit of {limit} "
                    f"({scorer.config.key('max_input_chars')}); shorten it",
                    "INPUT_TOO_LONG",
                )
        if scorer.needs_ground_truth and not req.ground_truth.strip():
            raise invalid(
                "ground_truth",
                f"required by reward {req.reward_name!r} ({scorer.config.worker_cls})",
                "MISSING_GROUND_TRUTH",
            )
        return scorer

    @staticmethod
    def _response(req: reward_pb2.ScoreRequest, result: ScoreResult) -> reward_pb2.ScoreResponse:
        tokens = result.token_level_rewards
        if tokens is None and req.response_token_ids:
            # ROLL's convention: the response-level reward sits on the last response token.
            tokens = [0.0] * len(req.response_token_ids)
            tokens[-1] = result.score
        return reward_pb2.ScoreResponse(
            request_id=req.request_id,
            reward_name=req.reward_name,
            score=result.score,
            token_level_rewards=tokens or [],
            info=result.info,
            correct=result.correct,
        )

    async def Score(self, request_iterator, context: grpc.aio.ServicerContext):
        answers: asyncio.Queue = asyncio.Queue()
        live: dict[str, asyncio.Future] = {}  # request_id -> its result, while in flight
        reading_done = False

        def answer(req: reward_pb2.ScoreRequest, future: asyncio.Future) -> None:
            # A done-callback rather than a task per item: the event loop's per-item cost bounds throughput.
            del live[req.request_id]
            if not future.cancelled():
                err = future.exception()
                if err is None:
                    answers.put_nowait(self._response(req, future.result()))
                else:
                    fabric_err = err if isinstance(err, FabricError) else internal(f"{type(err).__name__}: {err}")
                    answers.put_nowait(self._error(req, fabric_err))
            if reading_done and not live:
                answers.put_nowait(None)

        async def read() -> None:
            nonlocal reading_done
            async for req in request_iterator:
                try:
                    scorer = self._validate(req, live)
                except FabricError as err:
                    answers.put_nowait(self._error(req, err))
                    continue
                future = self.batchers[scorer.name].submit(
                    ScoreItem(req.request_id, req.prompt, req.response, req.ground_truth, list(req.response_token_ids))
                )
                live[req.request_id] = future
                future.add_done_callback(functools.partial(answer, req))
            reading_done = True
            if not live:
                answers.put_nowait(None)

        def reader_done(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                answers.put_nowait(None)  # ends the loop below, which reports the failure

        reader = asyncio.create_task(read())
        reader.add_done_callback(reader_done)
        try:
            while (response := await answers.get()) is not None:
                yield response
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                exc = reader.exception()
                log.error("Score stream failed: %r", exc)
                raise internal(f"Score stream failed: {type(exc).__name__}: {exc}") from exc
        finally:
            reader.cancel()
            for future in list(live.values()):
                future.cancel()

    @staticmethod
    def _error(req: reward_pb2.ScoreRequest, err: FabricError) -> reward_pb2.ScoreResponse:
        return reward_pb2.ScoreResponse(request_id=req.request_id, reward_name=req.reward_name, error=err.to_proto())

    async def GetServerInfo(self, request, context) -> reward_pb2.RewardServiceGetServerInfoResponse:
        infos = [
            reward_pb2.ScorerInfo(
                reward_name=name,
                worker_cls=s.config.worker_cls,
                infer_batch_size=s.config.infer_batch_size,
                model=s.model,
                device=s.device,
                items_scored=self.batchers[name].items_scored,
                batches_scored=self.batchers[name].batches_scored,
                tag_included=s.config.tag_included,
            )
            for name, s in self.scorers.items()
        ]
        return reward_pb2.RewardServiceGetServerInfoResponse(
            scorers=infos, queue_depth=self.queue_depth, server=self.label
        )
