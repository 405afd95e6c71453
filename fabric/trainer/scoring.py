"""Scoring a step's samples on the reward servers (RewardPool: retries elsewhere), each as it streams out of Generate.

Each sample is scored by the rewards its dataset tag names (weighted, summed) and gets its reward domain (ROLL's
tag_2_domain), whose reward's correctness the difficulty mask filters on. An empty response (EOS at once) is never
sent to the reward servers (they refuse it) and scores each reward's lowest weighted score of the step, or 0 if
that is lower: it never beats a wrong answer, whatever the sign of a reward's weight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fabric.routing import RewardPool
from fabric.trainer.rollout_stream import Sample, StepBatch


@dataclass(frozen=True)
class RewardSettings:
    weights: dict[str, float]  # each reward's weight
    rewards_for: Callable[[Any], list[str]]  # a dataset tag -> the rewards that score its samples
    domain_of: Callable[[Any], str]  # a dataset tag -> its reward domain


class Scorer:
    def __init__(self, settings: RewardSettings, dataset: list[dict]):
        self.settings = settings
        self.dataset = dataset
        self._pool: RewardPool | None = None

    @property
    def pool(self) -> RewardPool:
        if self._pool is None:
            raise RuntimeError("no reward servers: the run has not started")
        return self._pool

    @pool.setter
    def pool(self, pool: RewardPool) -> None:
        self._pool = pool

    async def score(self, samples: list[Sample], step: int) -> None:
        lowest: dict[str, float] = {}
        self.score_empty(await self.score_items(samples, step, lowest), lowest)

    async def score_stream(self, batch: StepBatch) -> None:
        """Scores the batch's samples as they arrive: whatever came in while the previous call ran goes in the next
        one. Ends when every sample is scored (empty responses last: they need the step's lowest score)."""
        lowest: dict[str, float] = {}
        empty: list = []
        scored = 0
        while True:
            await batch.arrived.wait()
            batch.arrived.clear()
            todo, batch.unscored = batch.unscored, []
            if todo:
                empty += await self.score_items(todo, batch.step, lowest, start=scored)
                scored += len(todo)
            if scored == batch.expected:
                break
        self.score_empty(empty, lowest)
        batch.scored = time.perf_counter()

    async def score_items(self, samples: list[Sample], step: int, lowest: dict[str, float], start: int = 0) -> list:
        """Scores the non-empty samples (adding to each reward and to `lowest`, each reward's lowest weighted score);
        returns the empty ones with their reward names, for score_empty once the step's lowest scores are known."""
        items, owners, empty = [], [], []
        for n, sample in enumerate(samples, start):
            row = self.dataset[sample.prompt_index]
            names = self.settings.rewards_for(row.get("tag"))
            sample.domain = self.settings.domain_of(row.get("tag"))
            if not sample.response.text.strip():
                empty.append((sample, names))  # reward servers refuse empty responses: scored below
                continue
            for name in names:
                items.append(
                    dict(
                        request_id=f"s{step}-{n}-{name}",
                        prompt=row["prompt"],
                        response=sample.response.text,
                        ground_truth=str(row["ground_truth"]),
                        reward_name=name,
                        response_token_ids=list(sample.response.token_ids),
                    )
                )
                owners.append((sample, name))
        responses = await self.pool.score(items) if items else []
        for (sample, name), response in zip(owners, responses, strict=True):
            weighted = self.settings.weights[name] * response.score
            sample.reward += weighted
            lowest[name] = min(lowest.get(name, 0.0), weighted)  # the worst weighted value, whatever the weight's sign
            if name == sample.domain:
                sample.correct = response.correct if response.HasField("correct") else response.score
        return empty

    def score_empty(self, empty: list, lowest: dict[str, float]) -> None:
        for sample, names in empty:  # never above a wrong answer: each reward's lowest weighted score, 0 at most
            sample.reward += sum(lowest.get(name, 0.0) for name in names)
            sample.correct = 0.0
