"""A small engine behind the RolloutEngine protocol, for fast tests of everything above the engine: the servicer
(validation, completion order, abort, sleep states, drain), the routing pools' failover and the weight receiver's
version state machine. It stands in for vLLM only where vLLM is not what the test is about.

Generation is deterministic and timed: sample `index` of a prompt yields `max_new_tokens` tokens, one every
`token_seconds`, each token id (sum(prompt) + index + position) % vocab_size, logprob -1.0. Weight commits read
the staged tensors through the same contract vLLM's worker uses (fabric.weights.staging) and keep a fingerprint of
them; `fail_next_commits` makes the next commits raise, as an engine that refuses a load would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import torch

from fabric.rollout.engine import FinishReason, Sample, Sampling, SleepState
from fabric.weights.staging import UpdateInfo, tensors_from_update_info

VOCAB_SIZE = 64
MAX_MODEL_LEN = 8192


def tiny_hf_config():
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=MAX_MODEL_LEN,
        tie_word_embeddings=True,
    )


def fingerprint(named) -> dict[str, float]:
    """name -> sum of the tensor in float64: equal for equal weights, cheap to compare."""
    return {name: float(tensor.double().sum()) for name, tensor in named}


class FakeEngine:
    def __init__(self, config=None, token_seconds: float = 0.001):
        self.config = config
        self.token_seconds = token_seconds
        self.model_dir = "fake"
        self.hf_config = tiny_hf_config()
        self.dtype = torch.float32
        self.max_model_len = MAX_MODEL_LEN
        self.vocab_size = VOCAB_SIZE
        self.weight_version = 0
        self.sleep_state = SleepState.AWAKE
        self.sleep_level = 0
        self.weights: dict[str, float] = {}  # fingerprint of the loaded version
        self.commits: list[int] = []  # versions loaded, in order (rollbacks too)
        self.fail_next_commits = 0
        self.started = False
        self._aborted: set[str] = set()
        self._running: set[str] = set()

    @classmethod
    def check_config(cls, config) -> None:
        pass

    @property
    def engine_version(self) -> str:
        return "fake 1"

    def engine_config_json(self) -> str:
        return json.dumps({"token_seconds": self.token_seconds})

    async def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.started = False

    def tokenize(self, text: str) -> list[int]:
        return [(ord(c) % (VOCAB_SIZE - 1)) + 1 for c in text]

    async def generate(self, engine_id: str, prompt_token_ids: Sequence[int], sampling: Sampling, index: int) -> Sample:
        tokens: list[int] = []
        self._running.add(engine_id)
        try:
            base = sum(prompt_token_ids) + index
            for position in range(sampling.max_new_tokens):
                if engine_id in self._aborted:
                    self._aborted.discard(engine_id)
                    return self._sample(tokens, FinishReason.ABORT, sampling)
                await asyncio.sleep(self.token_seconds)
                tokens.append((base + position) % VOCAB_SIZE)
            return self._sample(tokens, FinishReason.LENGTH, sampling)
        finally:
            self._running.discard(engine_id)

    @staticmethod
    def _sample(tokens: list[int], reason: FinishReason, sampling: Sampling) -> Sample:
        logprobs = [-1.0] * len(tokens) if sampling.logprobs else []
        return Sample(token_ids=tokens, text=" ".join(map(str, tokens)), logprobs=logprobs, finish_reason=reason)

    async def abort(self, engine_ids: Sequence[str]) -> None:
        self._aborted.update(e for e in engine_ids if e in self._running)

    def num_unfinished_requests(self) -> int:
        return len(self._running)

    async def sleep(self, level: int) -> None:
        self.sleep_state, self.sleep_level = SleepState.ASLEEP, level

    async def wake_up(self, tags: Sequence[str]) -> None:
        if self.sleep_state == SleepState.AWAKE:
            return
        tags = list(tags) or ["weights", "kv_cache"]
        if "kv_cache" in tags:
            self.sleep_state, self.sleep_level = SleepState.AWAKE, 0
        else:
            self.sleep_state = SleepState.WEIGHTS_ONLY

    async def commit_weights(self, update_info: UpdateInfo, version: int) -> None:
        new = fingerprint(tensors_from_update_info(update_info))
        if self.fail_next_commits:  # as a load that fails half way: the first half of the layers hold new weights
            self.fail_next_commits -= 1
            self.weights.update(dict(list(new.items())[: len(new) // 2]))
            raise RuntimeError("the engine refused the load (fake fault)")
        self.weights = new
        self.commits.append(version)
        self.weight_version = version
