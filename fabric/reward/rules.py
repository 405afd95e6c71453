"""Rule rewards: `math_rule` (math-verify against the ground truth) and `answer_tag` (the toy task's format rule)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from fabric.errors import invalid
from fabric.reward.scorer import RuleScorer, ScoreItem, Scorer, ScoreResult
from fabric.tasks.arithmetic import extract_answer

log = logging.getLogger(__name__)


# ---- math_rule: runs in worker processes -------------------------------------------------------------------------
# math-verify's own timeout uses signal.alarm, which works only in a main thread (in a thread it raises ValueError),
# and it swallows its timeout into a silent 0. So each item runs in the main thread of a pool process, with
# math-verify's timeouts off and our own interval timer, which raises an exception math-verify does not catch.


class _ItemTimeout(BaseException):
    """Not an Exception: math-verify's `except Exception` must not swallow it."""


def _on_alarm(signum, frame):
    raise _ItemTimeout


def _worker_init() -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" warnings: we time out ourselves
    signal.signal(signal.SIGALRM, _on_alarm)
    import math_verify  # noqa: F401 - imported once per worker, not on the first item


def as_latex(ground_truth: str) -> str:
    """Datasets write "0.5" or "\\frac{1}{2}"; math-verify parses bare LaTeX only inside $...$ (or \\boxed{})."""
    text = ground_truth.strip()
    return text if ("$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text) else f"${text}$"


def verify_math(response: str, ground_truth: str, timeout_s: float) -> tuple[float, str, bool]:
    """(score, info, ground truth parsed). Runs in a pool process's main thread."""
    from math_verify import parse, verify

    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        gold = parse(as_latex(ground_truth), parsing_timeout=None)
        if all(isinstance(g, str) for g in gold):  # only the raw-text fallback: not math (e.g. "\frac{")
            return 0.0, "", False
        answer = parse(response, parsing_timeout=None)
        return (1.0 if verify(gold, answer, timeout_seconds=None) else 0.0), "", True
    except _ItemTimeout:
        return 0.0, f"timeout after {timeout_s:g} s: scored 0", True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class MathRuleScorer(Scorer):
    """1.0 when math-verify finds the response's answer equal to `ground_truth`, else 0.0.

    Config keys: `timeout_s` (per item, default 5), `num_workers` (processes, default: CPU count, at most 4).
    """

    needs_ground_truth = True

    def __init__(self, config):
        super().__init__(config)
        self.timeout_s = config.get_float("timeout_s", 5.0, minimum=0.01)
        self.num_workers = config.get_int("num_workers", min(4, os.cpu_count() or 1))
        self.device = f"cpu ({self.num_workers} processes)"
        self.model = "math-verify"
        self._pool: ProcessPoolExecutor | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: forking a process that runs gRPC threads is unsafe.
        return ProcessPoolExecutor(self.num_workers, multiprocessing.get_context("spawn"), initializer=_worker_init)

    async def start(self) -> None:
        self._pool = self._new_pool()
        loop = asyncio.get_running_loop()
        warmup = [loop.run_in_executor(self._pool, verify_math, "1", "1", 30.0) for _ in range(self.num_workers)]
        await asyncio.gather(*warmup)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _recycle_pool(self, pool: ProcessPoolExecutor) -> None:
        """A worker stuck where no signal reaches (inside C code) is killed with its pool; a fresh pool serves on."""
        if self._pool is not pool:
            return  # already replaced by another item's timeout
        log.warning("%s: a math-verify worker ignored its timeout; restarting the worker processes", self.name)
        self._pool = self._new_pool()
        for process in list(getattr(pool, "_processes", {}).values()):  # no public API to kill a worker (3.11)
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    async def _score_one(self, item: ScoreItem, retry: bool = True) -> ScoreResult | BaseException:
        pool = self._pool
        if pool is None:
            return RuntimeError(f"{self.name}: not started, or closed")
        future = asyncio.get_running_loop().run_in_executor(
            pool, verify_math, item.response, item.ground_truth, self.timeout_s
        )
        try:
            score, info, gold_ok = await asyncio.wait_for(future, self.timeout_s + 5.0)
        except TimeoutError:
            self._recycle_pool(pool)
            return ScoreResult(0.0, f"timeout after {self.timeout_s:g} s (worker killed): scored 0")
        except BrokenProcessPool:
            # Its pool was recycled under it because of another item: run it again on the new one.
            return await self._score_one(item, retry=False) if retry else ScoreResult(0.0, "worker restarted: scored 0")
        except Exception as exc:  # noqa: BLE001
            return exc
        if not gold_ok:
            return invalid(
                "ground_truth",
                f"{item.ground_truth[:80]!r} does not parse as math; write a number or LaTeX such as \\frac{{1}}{{2}}",
                "GROUND_TRUTH_UNPARSABLE",
            )
        return ScoreResult(score, info)

    async def score_batch(self, items: list[ScoreItem]) -> list[ScoreResult | BaseException]:
        return list(await asyncio.gather(*(self._score_one(item) for item in items)))


# ---- answer_tag: the toy task's rule ------------------------------------------------------------------------------


class AnswerTagScorer(RuleScorer):
    """The arithmetic task's rule: `correct_score` (1.0) when <answer>...</answer> holds the ground truth exactly,
    `format_score` (0.1) for a well-formed tag with a wrong answer, `wrong_score` (0.0) without the tag."""

    needs_ground_truth = True

    def __init__(self, config):
        super().__init__(config)
        self.correct_score = config.get_float("correct_score", 1.0)
        self.format_score = config.get_float("format_score", 0.1)
        self.wrong_score = config.get_float("wrong_score", 0.0)
        self.model = "<answer> tag rule"

    def score_one(self, item: ScoreItem) -> ScoreResult:
        answer = extract_answer(item.response)
        if answer is None:
            return ScoreResult(self.wrong_score, "no <answer>...</answer> tag")
        if answer == item.ground_truth.strip():
            return ScoreResult(self.correct_score)
        return ScoreResult(self.format_score, "tag present, answer wrong")
