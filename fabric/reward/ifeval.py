"""`ifeval`: ROLL's GeneralRuleRewardWorker, the instruction-following checks of its RLVR ifeval domain.

Each item's `ground_truth` is ROLL's ifeval data field: a JSON object naming the check (`func_name`) and its
arguments, e.g. `{"func_name": "validate_word_constraint", "N": 50, "quantifier": "at most"}`; keys the check does
not take are ignored, as in ROLL. The reward is ROLL's: 1.0 when the check passes, else 0.0 (the correctness score),
plus ROLL's 3-gram repetition penalty (down to -0.5) of the response. The check reads the response after its last
</think>, special tokens removed; the penalty reads the whole response.

The checks are open-instruct's `if_functions` as ROLL runs them, with one fix: ROLL's `verify_keyword_frequency`
counts every word of the response (`word == word`), so "use the word X N times" checked the response's length;
here it counts the word.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from typing import Any

from fabric.errors import FabricError, did_you_mean, invalid, precondition
from fabric.reward.rules import _SPECIAL_TOKENS, _repetition_penalty
from fabric.reward.scorer import RuleScorer, ScoreItem, ScoreResult


def verify_keywords(text: str, keyword_list: list[str]) -> bool:
    lower = text.lower()
    return all(keyword.lower() in lower for keyword in keyword_list)


def verify_keyword_frequency(text: str, word: str, N: int) -> bool:
    words = re.findall(r"\b\w+\b", text.lower())
    return sum(1 for w in words if w == word.lower()) == N


def validate_forbidden_words(text: str, forbidden_words: list[str]) -> bool:
    lower = text.lower()
    return not any(word.lower() in lower for word in forbidden_words)


def verify_letter_frequency(text: str, letter: str, N: int) -> bool:
    if len(letter) != 1:
        raise ValueError("letter must be a single character")
    return text.count(letter) == N


def validate_response_language(text: str, language: str) -> bool:
    try:
        from langdetect import detect
    except ImportError:
        raise precondition(
            "validate_response_language needs the langdetect package on the reward server (pip install langdetect)",
            "MISSING_DEPENDENCY",
        ) from None
    return detect(text) == language


def verify_paragraph_count(text: str, N: int) -> bool:
    text = "\n".join(line.strip() for line in text.splitlines()).strip()
    paragraphs = text.split("* * *")
    return all(p.strip() for p in paragraphs) and len(paragraphs) == N


def validate_word_constraint(text: str, N: int, quantifier: str) -> bool:
    count = len(text.strip().split())
    if quantifier == "at least":
        return count >= N
    if quantifier == "at most":
        return count <= N
    if quantifier == "around":
        return abs(count - N) <= max(round(N * 0.1), 1)
    return False


def verify_sentence_constraint(text: str, N: int, quantifier: str) -> bool:
    count = len(re.split(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?)\s", text))
    if quantifier == "at least":
        return count >= N
    if quantifier == "around":
        return abs(count - N) <= 1
    if quantifier == "at most":
        return count <= N
    return False


def validate_paragraphs(text: str, N: int, first_word: str, i: int) -> bool:
    paragraphs = text.split("\n\n")
    return len(paragraphs) == N and paragraphs[i - 1].strip().startswith(first_word)


def verify_postscript(text: str, postscript_marker: str) -> bool:
    if postscript_marker not in text:
        return False
    return len(text[text.find(postscript_marker) :].strip()) > len(postscript_marker)


def validate_placeholders(text: str, N: int) -> bool:
    return len(re.findall(r"\[(.*?)\]", text)) >= N


def verify_bullet_points(text: str, N: int) -> bool:
    return sum(1 for line in text.split("\n") if line.strip().startswith(("*", "-"))) == N


def validate_title(text: str) -> bool:
    return bool(re.findall(r"<<(.*?)>>", text))


def validate_choice(text: str, options: list[str]) -> bool:
    return any(text in option for option in options)


def validate_highlighted_sections(text: str, N: int) -> bool:
    return len(re.findall(r"\*(.*?)\*", text)) >= N


def validate_sections(text: str, N: int, section_splitter: str) -> bool:
    sections = text.split(section_splitter)
    if sections[0] == "":  # the first section may start with the splitter
        sections.pop(0)
    return len(sections) == N


def validate_json_format(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def validate_repeat_prompt(text: str, original_prompt: str) -> bool:
    return text.startswith(original_prompt)


def validate_two_responses(text: str) -> bool:
    if text.count("******") != 1:
        return False
    first, second = (part.strip() for part in text.split("******"))
    return first != second


def validate_uppercase(text: str) -> bool:
    return text == text.upper()


def validate_lowercase(text: str) -> bool:
    return text == text.lower()


def validate_frequency_capital_words(text: str, N: int, quantifier: str) -> bool:
    count = len(re.findall(r"\b[A-Z]+\b", text))
    if quantifier == "at least":
        return count >= N
    if quantifier == "around":
        return count == N
    if quantifier == "at most":
        return count <= N
    return False


def validate_end(text: str, end_phrase: str) -> bool:
    return text.endswith(end_phrase)


def validate_quotation(text: str) -> bool:
    return text.startswith('"') and text.endswith('"')


def validate_no_commas(text: str) -> bool:
    return "," not in text


# ROLL's IF_FUNCTIONS_MAP: the `func_name` values its ifeval data uses.
CHECKS: dict[str, Callable[..., bool]] = {
    f.__name__: f
    for f in (
        verify_keywords, verify_keyword_frequency, validate_forbidden_words, verify_letter_frequency,
        validate_response_language, verify_paragraph_count, validate_word_constraint, verify_sentence_constraint,
        validate_paragraphs, verify_postscript, validate_placeholders, verify_bullet_points, validate_title,
        validate_choice, validate_highlighted_sections, validate_sections, validate_json_format,
        validate_repeat_prompt, validate_two_responses, validate_uppercase, validate_lowercase,
        validate_frequency_capital_words, validate_end, validate_quotation, validate_no_commas,
    )
}  # fmt: skip


def after_last_think(text: str) -> str:
    """ROLL's extract_after_last_think: the text after the last </think>, leading newlines removed (else all)."""
    at = text.rfind("</think>")
    return text if at == -1 else text[at + len("</think>") :].lstrip("\n")


def parse_constraint(ground_truth: str) -> tuple[Callable[..., bool], dict[str, Any]]:
    """ROLL's ifeval ground truth -> (check, its arguments); FabricError (INVALID_ARGUMENT) says what is wrong."""
    try:
        constraint = json.loads(ground_truth)
    except ValueError:
        constraint = None
    if not isinstance(constraint, dict):
        raise invalid("ground_truth", 'expected a JSON object such as {"func_name": "validate_title"}')
    name = constraint.get("func_name")
    if name not in CHECKS:
        hint = did_you_mean(str(name), CHECKS) or f"use one of ROLL's checks: {', '.join(CHECKS)}"
        raise invalid("ground_truth", f"func_name {name!r} is not an ifeval check; {hint}", "UNKNOWN_CHECK")
    check = CHECKS[name]
    params = inspect.signature(check).parameters
    args = {key: value for key, value in constraint.items() if key in params and key != "text"}
    missing = [key for key in params if key != "text" and key not in args]
    if missing:
        raise invalid("ground_truth", f"{name} needs {', '.join(missing)}", "MISSING_ARGUMENT")
    return check, args


def ifeval_reward(response: str, ground_truth: str) -> tuple[float, float, str]:
    """(reward, correctness 0/1, info) as ROLL's GeneralRuleRewardWorker scores one response."""
    check, args = parse_constraint(ground_truth)
    for token in _SPECIAL_TOKENS:
        response = response.replace(token, "")
    info = ""
    try:
        passed = bool(check(after_last_think(response), **args))
    except FabricError:
        raise
    except Exception as exc:  # noqa: BLE001 - ROLL scores a check that raises as failed
        passed, info = False, f"{check.__name__} raised {type(exc).__name__}: {exc}"
    correct = 1.0 if passed else 0.0
    return correct + _repetition_penalty(response), correct, info or f"{check.__name__}: {passed}"


class IFEvalScorer(RuleScorer):
    """ROLL's GeneralRuleRewardWorker (see the module doc); no keys of its own."""

    needs_ground_truth = True

    def __init__(self, config):
        super().__init__(config)
        self.model = f"ifeval rules ({len(CHECKS)} checks)"

    def score_one(self, item: ScoreItem) -> ScoreResult:
        reward, correct, info = ifeval_reward(item.response, item.ground_truth)
        return ScoreResult(reward, info, correct=correct)
