"""The trainer's dataset: JSONL rows of {prompt, ground_truth} (and optional tag, response), prompts too long for
`prompt_length` left out."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fabric.config import ConfigError

log = logging.getLogger(__name__)


def load_dataset(path: str, tokenizer, prompt_length: int) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError("actor_train.data_args.file_name", f"dataset not found: {file}")
    rows, skipped = [], 0
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError("actor_train.data_args.file_name", f"{file}:{number}: not JSON ({exc})") from None
        if "prompt" not in row or "ground_truth" not in row:
            raise ConfigError("actor_train.data_args.file_name", f"{file}:{number}: needs prompt and ground_truth")
        if len(tokenizer.encode(row["prompt"], add_special_tokens=False)) > prompt_length:
            skipped += 1
            continue
        rows.append(row)
    if skipped:
        log.warning("%d prompts longer than prompt_length=%d left out", skipped, prompt_length)
    if not rows:
        raise ConfigError("actor_train.data_args.file_name", f"{file}: no usable rows")
    return rows
