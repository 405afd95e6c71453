"""Rule rewards: `math_rule` (math-verify against the ground truth), `answer_tag` (the toy task's format rule) and
`crossthinkqa_rule` (ROLL's CrossThinkQA multiple-choice rule)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import re
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from fabric.config import ConfigError
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
            return ScoreResult(0.0, f"timeout after {self.timeout_s:g} s (worker killed): scored 0", correct=0.0)
        except BrokenProcessPool:
            # Its pool was recycled under it because of another item: run it again on the new one.
            if retry:
                return await self._score_one(item, retry=False)
            return ScoreResult(0.0, "worker restarted: scored 0", correct=0.0)
        except Exception as exc:  # noqa: BLE001
            return exc
        if not gold_ok:
            return invalid(
                "ground_truth",
                f"{item.ground_truth[:80]!r} does not parse as math; write a number or LaTeX such as \\frac{{1}}{{2}}",
                "GROUND_TRUTH_UNPARSABLE",
            )
        return ScoreResult(score, info, correct=score)  # math-verify: 1 or 0

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
            return ScoreResult(self.wrong_score, "no <answer>...</answer> tag", correct=0.0)
        if answer == item.ground_truth.strip():
            return ScoreResult(self.correct_score, correct=1.0)
        return ScoreResult(self.format_score, "tag present, answer wrong", correct=0.0)


# ---- crossthinkqa_rule: ROLL's CrossThinkQARuleRewardWorker -------------------------------------------------------

CROSSTHINKQA_REWARDS = {  # (correct, boxed) -> reward, per reward_type, as ROLL's worker scores them
    "loose": {(True, True): 1.0, (True, False): 1.0, (False, True): -1.0, (False, False): -1.0},
    "soft": {(True, True): 1.0, (True, False): 0.5, (False, True): -0.5, (False, False): -1.0},
    "strict": {(True, True): 1.0, (True, False): -1.0, (False, True): -1.0, (False, False): -1.0},
}
_BOXED = re.compile(r"\\boxed\{([^}]+)\}")
_SPECIAL_TOKENS = ("<|endoftext|>", "<pad>", "<|im_end|>")


def _repetition_penalty(text: str, ngram_size: int = 3, max_penalty: float = -0.5) -> float:
    """ROLL's n-gram repetition penalty: max_penalty times the share of repeated word 3-grams."""
    words = text.lower().split()
    if len(words) < ngram_size:
        return 0.0
    grams = list(zip(*[words[i:] for i in range(ngram_size)], strict=False))
    return (1 - len(set(grams)) / len(grams)) * max_penalty


def _length_reward(length: int, min_len: int = 100, max_len: int = 400) -> float:
    if length < min_len:
        return -0.5
    if length > max_len:
        return 0.0
    return -0.5 * (max_len - length) / (max_len - min_len)


def crossthinkqa_reward(response: str, ground_truth: str, reward_type: str) -> tuple[float, bool, bool]:
    """The multiple-choice rule of ROLL's CrossThinkQA worker: the answer is the last \\boxed{...} after the last
    </think> (else the text after the last "answer is"); it is correct when its first capital letter is the ground
    truth's first character. Returns (reward, correct, boxed)."""
    end = response.rfind("</think>")
    text = response if end == -1 else response[end + len("</think>") :].lstrip("\n")
    boxed = _BOXED.findall(text)
    if boxed:
        answer = boxed[-1]
    else:
        at = text.lower().rfind("answer is")
        answer = text if at == -1 else text[at + len("answer is") :]
    first_capital = next((c for c in answer if c.isupper()), None)
    correct = bool(ground_truth) and first_capital == ground_truth[0]
    return CROSSTHINKQA_REWARDS[reward_type][(correct, bool(boxed))], correct, bool(boxed)


class CrossThinkQAScorer(RuleScorer):
    """ROLL's CrossThinkQARuleRewardWorker: the multiple-choice reward (`reward_type`: loose, soft or strict) plus
    ROLL's 3-gram repetition penalty (down to -0.5) plus `response_length_penalty_coef` times a length reward
    (-0.5 under 100 response tokens, rising to 0 at 400). ROLL measures the padded response row; this measures the
    response's own tokens (`response_token_ids`, else its characters)."""

    needs_ground_truth = True

    def __init__(self, config):
        super().__init__(config)
        self.reward_type = config.get_str("reward_type", "")
        if self.reward_type not in CROSSTHINKQA_REWARDS:
            raise ConfigError(
                config.key("reward_type"), f"{self.reward_type or 'missing'}: use loose, soft or strict (ROLL's names)"
            )
        self.length_coef = config.get_float("response_length_penalty_coef", 0.0)
        self.model = f"CrossThinkQA rule ({self.reward_type})"

    def score_one(self, item: ScoreItem) -> ScoreResult:
        text = item.response
        for token in _SPECIAL_TOKENS:
            text = text.replace(token, "")
        reward, correct, boxed = crossthinkqa_reward(text, item.ground_truth.strip(), self.reward_type)
        length = len(item.response_token_ids) or len(item.response)
        total = reward + _repetition_penalty(text) + self.length_coef * _length_reward(length)
        return ScoreResult(total, f"correct={correct} boxed={boxed}", correct=float(correct))
