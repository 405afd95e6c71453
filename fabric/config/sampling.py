"""The one table of sampling keys: ROLL's `generating_args` names, the fabric.v1.SamplingParams field each sets,
whether the trainer sends it, and the default the trainer's logprobs assume. The rollout server
(fabric.rollout.config), the pipeline config (fabric.trainer.config) and the trainer (fabric.trainer.loop) read it
from here. A leaf: it imports nothing from the fabric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingKey:
    field: str  # the fabric.v1.SamplingParams field (`stop_strings` is ROLL's name for `stop`)
    trainer: bool = False  # the trainer passes it on in every Generate request it sends
    default: Any = None  # set explicitly in the trainer's requests: its logprobs assume it (None: not sent unless set)


SAMPLING_KEYS: dict[str, SamplingKey] = {
    "max_new_tokens": SamplingKey("max_new_tokens", trainer=True),
    "temperature": SamplingKey("temperature", trainer=True, default=1.0),
    "top_p": SamplingKey("top_p", trainer=True, default=1.0),
    "top_k": SamplingKey("top_k", trainer=True, default=-1),
    "num_beams": SamplingKey("num_beams"),
    "num_return_sequences": SamplingKey("num_return_sequences", trainer=True),
    "seed": SamplingKey("seed", trainer=True),
    "logprobs": SamplingKey("logprobs"),
    "stop": SamplingKey("stop"),
    "stop_strings": SamplingKey("stop"),
    "repetition_penalty": SamplingKey("repetition_penalty", trainer=True),
}
# ROLL GeneratingArguments keys that mean nothing to vLLM sampling: accepted so ROLL configs load, then ignored.
# (ROLL's vllm strategy does not pass them to vLLM either.)
IGNORED_SAMPLING_KEYS = frozenset({"do_sample", "length_penalty", "early_stopping", "max_length", "min_new_tokens"})
TRAINER_SAMPLING_KEYS = frozenset(name for name, key in SAMPLING_KEYS.items() if key.trainer)
SAMPLING_DEFAULTS = {name: key.default for name, key in SAMPLING_KEYS.items() if key.default is not None}


def sampling_settings(generating: dict) -> dict:
    """The config's sampling settings with the ones the trainer's logprobs depend on made explicit, so that every
    request carries them and no server default can differ from what the trainer computes with."""
    return {**SAMPLING_DEFAULTS, **generating}
