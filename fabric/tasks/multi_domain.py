"""The small offline dataset of examples/multi_domain.yaml: ROLL's multi-domain RLVR shape on toy prompts.

Four domains, each row tagged as ROLL's RLVR data tags it, so that each reward's `tag_included` picks its rows:
`math` (a sum, answered in \\boxed{}; math_rule), `ifeval` (an instruction with a checkable constraint; ground truth
in ROLL's ifeval format), `KodCode` (a Python function with assert tests; ground truth as code_sandbox reads it)
and `RLVR` (a short factual question with its reference answer; llm_judge). Rows carry a gold `response` for the
supervised warm-up, like the arithmetic task's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

# ROLL's ifeval data writes every constraint key, null where the check does not use it.
IFEVAL_KEYS = ("N", "quantifier", "end_phrase", "keyword_list", "word", "forbidden_words", "letter", "i",
               "first_word", "postscript_marker", "options", "section_splitter", "original_prompt")  # fmt: skip
IFEVAL: list[tuple[str, str, dict, str]] = [  # (prompt, check, its arguments, a response that follows it)
    ("Say hi in lowercase only.", "validate_lowercase", {}, "hi there"),
    ("Reply in capital letters.", "validate_uppercase", {}, "OK THEN"),
    ("Answer with no commas.", "validate_no_commas", {}, "yes indeed"),
    ("Wrap your reply in double quotes.", "validate_quotation", {}, '"done"'),
    ("Give a title in <<double angle brackets>>.", "validate_title", {}, "<<Sea>>"),
    ("Use at most 5 words.", "validate_word_constraint", {"N": 5, "quantifier": "at most"}, "Short and sweet."),
    ("End your reply with Bye.", "validate_end", {"end_phrase": "Bye."}, "See you. Bye."),
    ("Mention the sun.", "verify_keywords", {"keyword_list": ["sun"]}, "The sun rose."),
]
CODE = [  # (function, what it returns, its body, assert tests)
    ("add", "x + y", "x + y", "assert add(2, 3) == 5\nassert add(-1, 1) == 0"),
    ("sub", "x - y", "x - y", "assert sub(5, 3) == 2\nassert sub(0, 4) == -4"),
    ("mul", "x * y", "x * y", "assert mul(2, 3) == 6\nassert mul(-2, 4) == -8"),
    ("big", "the larger of x and y", "max(x, y)", "assert big(2, 9) == 9\nassert big(7, -1) == 7"),
    ("small", "the smaller of x and y", "min(x, y)", "assert small(2, 9) == 2\nassert small(7, -1) == -1"),
    ("same", "whether x equals y", "x == y", "assert same(2, 2)\nassert not same(1, 2)"),
]
FACTS = [  # (question, reference answer)
    ("Name the capital of France.", "Paris"),
    ("Name the capital of Japan.", "Tokyo"),
    ("What color is the sky on a clear day?", "blue"),
    ("How many legs does a spider have?", "8"),
    ("What is frozen water called?", "ice"),
    ("Which planet do we live on?", "Earth"),
]


def ifeval_truth(check: str, args: dict) -> str:
    return json.dumps({"func_name": check, **{key: None for key in IFEVAL_KEYS}, **args})


def _row(prompt: str, ground_truth: str, response: str, tag: str) -> dict:
    return {"prompt": prompt + "\n", "ground_truth": ground_truth, "response": response, "tag": tag}


def examples(seed: int = 0, per_domain: int = 8) -> Iterator[dict]:
    """{prompt, ground_truth, response, tag} rows, `per_domain` of each domain, shuffled together."""
    rng = random.Random(seed)
    rows = []
    for _ in range(per_domain):
        a, b = rng.randint(0, 19), rng.randint(0, 19)
        rows.append(_row(f"What is {a} plus {b}? Answer in \\boxed{{}}.", str(a + b), f"\\boxed{{{a + b}}}", "math"))
    for prompt, check, args, response in (IFEVAL * per_domain)[:per_domain]:
        rows.append(_row(prompt, ifeval_truth(check, args), response, "ifeval"))
    for name, what, body, tests in (CODE * per_domain)[:per_domain]:
        truth = json.dumps({"case_type": "assert", "test_cases": [{"assert_code": tests}]})
        code = f"```python\ndef {name}(x, y):\n    return {body}\n```"
        rows.append(_row(f"Write Python def {name}(x, y) returning {what}.", truth, code, "KodCode"))
    for question, answer in (FACTS * per_domain)[:per_domain]:
        rows.append(_row(question, answer, f"Therefore, the answer is {answer}", "RLVR"))
    rng.shuffle(rows)
    yield from rows


def write_dataset(path: str | Path, seed: int = 0, per_domain: int = 8) -> Path:
    """The rows above as the trainer's JSONL dataset."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in examples(seed, per_domain):
            f.write(json.dumps(row) + "\n")
    return path
