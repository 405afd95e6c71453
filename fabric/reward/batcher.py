"""One batcher per scorer: items from every stream gather into batches of up to `infer_batch_size`, or whatever came
within `batch_wait_ms` of the first; each item's future resolves when its batch is scored."""

from __future__ import annotations

import asyncio
import logging

from fabric.errors import FabricError, internal
from fabric.reward.scorer import ScoreItem, Scorer, ScoreResult

log = logging.getLogger(__name__)


class Batcher:
    def __init__(self, scorer: Scorer, batch_size: int, wait_s: float):
        self.scorer = scorer
        self.batch_size = batch_size
        self.wait_s = wait_s
        self.queue: asyncio.Queue[tuple[ScoreItem, asyncio.Future]] = asyncio.Queue()
        self.items_scored = 0
        self.batches_scored = 0
        self.in_batch = 0  # items taken from the queue whose batch is being scored
        self._task: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def depth(self) -> int:
        """Items accepted and not yet answered (waiting or being scored)."""
        return self.queue.qsize() + self.in_batch

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.scorer.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def submit(self, item: ScoreItem) -> asyncio.Future:
        """Queues one item for the next batch; the future holds its ScoreResult or a FabricError.
        Cancelling the future (its stream went away) makes the batcher skip the item."""
        future = asyncio.get_running_loop().create_future()
        self._idle.clear()
        self.queue.put_nowait((item, future))
        return future

    async def _collect(self) -> list[tuple[ScoreItem, asyncio.Future]]:
        batch = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(batch) < self.batch_size:
            if self.queue.empty():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            else:
                batch.append(self.queue.get_nowait())
        return [(item, fut) for item, fut in batch if not fut.done()]

    async def _score(self, items: list[ScoreItem]) -> list[ScoreResult | BaseException]:
        try:
            results = await self.scorer.score_batch(items)
            if len(results) != len(items):
                raise RuntimeError(f"scorer returned {len(results)} results for {len(items)} items")
            return results
        except Exception as exc:  # noqa: BLE001
            if len(items) == 1:
                return [exc]
            # The batch as a whole failed: score items alone so only the item at fault fails.
            log.warning("%s: batch of %d failed (%r); scoring its items one by one", self.scorer.name, len(items), exc)
            return [(await self._score([item]))[0] for item in items]

    async def _run(self) -> None:
        while True:
            if self.queue.empty():
                self._idle.set()
            batch = await self._collect()
            if not batch:
                continue
            self.in_batch = len(batch)
            try:
                results = await self._score([item for item, _ in batch])
            finally:
                self.in_batch = 0
            self.items_scored += len(batch)
            self.batches_scored += 1
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, ScoreResult):
                    future.set_result(result)
                elif isinstance(result, FabricError):
                    future.set_exception(result)
                else:
                    future.set_exception(
                        internal(
                            f"{self.scorer.name} failed on this item: {type(result).__name__}: {result}",
                            "SCORER_FAILED",
                        )
                    )
