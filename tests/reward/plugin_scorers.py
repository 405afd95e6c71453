"""A scorer loaded by dotted path (`worker_cls: tests.reward.plugin_scorers.CrashOnMarkerScorer`): it isolates the
failure under test, a scorer that crashes on one item of a batch."""

from __future__ import annotations

from fabric.reward.scorer import ScoreItem, Scorer, ScoreResult

MARKER = "CRASH"


class CrashOnMarkerScorer(Scorer):
    """Scores len(response) per batch, but the whole batch call raises when any item holds MARKER, as a model
    call does when one input breaks it."""

    async def score_batch(self, items: list[ScoreItem]) -> list[ScoreResult | BaseException]:
        for item in items:
            if MARKER in item.response:
                raise ValueError(f"cannot score {item.response!r}")
        return [ScoreResult(float(len(item.response))) for item in items]


class FailsFirstTimeScorer(Scorer):
    """Scores len(response), but fails each response the first time this server sees it: a transient fault (the
    model call broke once), for the retry of failed items."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: set[str] = set()

    async def score_batch(self, items: list[ScoreItem]) -> list[ScoreResult | BaseException]:
        results: list[ScoreResult | BaseException] = []
        for item in items:
            if item.response in self.seen:
                results.append(ScoreResult(float(len(item.response))))
            else:
                self.seen.add(item.response)
                results.append(RuntimeError(f"transient failure on {item.response!r}"))
        return results
