"""The scorer interface: what the servicer and the batcher see of a reward (rule or model).

A scorer takes a batch of ScoreItems and answers one ScoreResult or one exception per item, so one bad item never
fails its neighbours. Scorers named by a dotted path in `worker_cls` subclass Scorer (or RuleScorer for a plain
per-item function).
"""

from __future__ import annotations

import asyncio
import importlib
from dataclasses import dataclass, field

from fabric.config import ConfigError
from fabric.reward.config import RewardConfig


@dataclass
class ScoreItem:
    request_id: str
    prompt: str
    response: str
    ground_truth: str = ""
    response_token_ids: list[int] = field(default_factory=list)


@dataclass
class ScoreResult:
    score: float
    info: str = ""
    # Per-token rewards over response_token_ids; None lets the servicer place `score` on the last token (ROLL's way).
    token_level_rewards: list[float] | None = None
    # The 0/1 correctness score beside the reward (ROLL's difficulty mask filters on it); None: no notion of it.
    correct: float | None = None


class Scorer:
    """Base class. Subclasses set `needs_ground_truth`, and implement `score_batch` (and `start` if they load)."""

    needs_ground_truth = False

    def __init__(self, config: RewardConfig):
        self.config = config
        self.name = config.name
        self.model = ""  # shown in GetServerInfo
        self.device = "cpu"

    async def start(self) -> None:
        """Loads what the scorer needs (models, worker processes); called once before serving."""

    async def close(self) -> None:
        """Frees what start() took."""

    def validate(self, item: ScoreItem) -> None:
        """Raises FabricError (INVALID_ARGUMENT) for input this scorer cannot take; runs on the event loop, so cheap."""

    async def score_batch(self, items: list[ScoreItem]) -> list[ScoreResult | BaseException]:
        raise NotImplementedError


class RuleScorer(Scorer):
    """A scorer from a per-item function; the batch runs in a worker thread so the event loop stays free."""

    def score_one(self, item: ScoreItem) -> ScoreResult | float:
        raise NotImplementedError

    def _score_all(self, items: list[ScoreItem]) -> list[ScoreResult | BaseException]:
        results: list[ScoreResult | BaseException] = []
        for item in items:
            try:
                result = self.score_one(item)
                results.append(result if isinstance(result, ScoreResult) else ScoreResult(float(result)))
            except Exception as exc:  # noqa: BLE001 - a crash fails this item only
                results.append(exc)
        return results

    async def score_batch(self, items: list[ScoreItem]) -> list[ScoreResult | BaseException]:
        return await asyncio.to_thread(self._score_all, items)


def build_scorer(config: RewardConfig) -> Scorer:
    """Imports the scorer class `config.target` ("module:Class") and instantiates it."""
    module_name, _, class_name = config.target.partition(":")
    key = config.key("worker_cls")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            key,
            f"cannot load {config.worker_cls!r} ({exc}); use math_rule, answer_tag, "
            "hf_reward_model or a dotted path to a fabric.reward.scorer.Scorer subclass",
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise ConfigError(key, f"{config.worker_cls!r} is not a subclass of fabric.reward.scorer.Scorer")
    return cls(config)
