"""The toy task of the embedded default: add two small numbers, answer inside <answer>...</answer>.

Small enough for a 2-layer model to learn on two CPU cores, hard enough that GRPO has something to improve
after a short supervised warm-up. Its text also trains the tiny model's tokenizer.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
MAX_OPERAND = 49


def make_prompt(a: int, b: int) -> str:
    return f"Add {a} and {b}.\n"


def make_response(a: int, b: int) -> str:
    return f"<answer>{a + b}</answer>"


def examples(seed: int = 0, count: int | None = None, max_operand: int | None = None) -> Iterator[dict]:
    """Yields {"prompt", "ground_truth", "response"} rows; all pairs shuffled when count is None."""
    top = MAX_OPERAND if max_operand is None else int(max_operand)
    pairs = [(a, b) for a in range(top + 1) for b in range(top + 1)]
    random.Random(seed).shuffle(pairs)
    for a, b in pairs[:count]:
        yield {"prompt": make_prompt(a, b), "ground_truth": str(a + b), "response": make_response(a, b)}


def extract_answer(response: str) -> str | None:
    match = ANSWER_RE.search(response)
    return match.group(1).strip() if match else None


def write_dataset(path: str | Path, seed: int = 0, count: int | None = None, max_operand: int | None = None) -> Path:
    """A JSONL file of {"prompt", "ground_truth", "response", "tag"}: the trainer's dataset format (the gold
    response serves the supervised warm-up; the tag picks the rewards whose tag_included lists it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in examples(seed, count, max_operand):
            f.write(json.dumps({**row, "tag": "arithmetic"}) + "\n")
    return path


def corpus() -> Iterator[str]:
    """Text the tokenizer is trained on: every prompt and response of the task."""
    for row in examples(seed=0):
        yield row["prompt"] + row["response"]
