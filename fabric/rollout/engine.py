"""What a rollout server needs from an inference engine: the `RolloutEngine` protocol, its plain types, and the
registry of engines by ROLL's `strategy_args.strategy_name`.

The servicer (fabric.rollout.servicer) speaks protobuf to clients and these types to the engine; nothing below the
servicer knows protobuf. An engine is one module: add a class that satisfies `RolloutEngine` and a line in
`ENGINES` (imported lazily, so a CPU host never imports a GPU engine it does not use). docs/architecture.md walks
through it.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from fabric.rollout.config import RolloutConfig
    from fabric.weights.staging import UpdateInfo

WAKE_TAGS = ("weights", "kv_cache")

# strategy_name -> "module:Class". Only names listed here are accepted by the config.
ENGINES: dict[str, str] = {
    "vllm": "fabric.rollout.vllm.engine:VLLMEngine",
}


def engine_names() -> list[str]:
    return sorted(ENGINES)


def engine_class(strategy_name: str) -> Any:  # a class satisfying RolloutEngine
    module, _, cls = ENGINES[strategy_name].partition(":")
    return getattr(importlib.import_module(module), cls)


def check_engine_config(config: RolloutConfig) -> None:
    """Checks the engine arguments the way the engine would, without starting it (ConfigError naming the key)."""
    engine_class(config.strategy_name).check_config(config)


def create_engine(config: RolloutConfig) -> RolloutEngine:
    """The engine the config names; its constructor checks the engine arguments (ConfigError, before the start)."""
    return engine_class(config.strategy_name)(config)


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    UNSPECIFIED = "unspecified"


class SleepState(enum.StrEnum):
    AWAKE = "awake"
    ASLEEP = "asleep"
    WEIGHTS_ONLY = "weights_only"  # two-step wake-up: weights up (and updatable), KV cache not yet


@dataclass
class Sampling:
    """Sampling settings of one request, resolved (request overrides on top of generating_args) and checked."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    num_return_sequences: int = 1
    seed: int | None = None
    logprobs: bool = True
    stop: list[str] = dataclasses.field(default_factory=list)
    repetition_penalty: float = 1.0


@dataclass
class Sample:
    """One finished sample as the engine produced it."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason


@runtime_checkable
class RolloutEngine(Protocol):
    """An inference engine behind a rollout server. All methods run on the server's event loop."""

    model_dir: str
    hf_config: Any  # transformers PretrainedConfig of the served model (the weight receiver checks manifests by it)
    dtype: Any  # torch.dtype the weights are served in
    max_model_len: int
    vocab_size: int
    weight_version: int
    sleep_state: SleepState
    sleep_level: int

    @classmethod
    def check_config(cls, config: RolloutConfig) -> None:
        """Raises ConfigError naming the key for anything the engine would refuse; starts nothing."""

    @property
    def engine_version(self) -> str: ...

    def engine_config_json(self) -> str: ...

    async def start(self) -> None:
        """Loads the model; the server answers only once this returns."""

    def shutdown(self) -> None:
        """Stops the engine and frees what it holds (processes, shared memory)."""

    def tokenize(self, text: str) -> list[int]: ...

    async def generate(self, engine_id: str, prompt_token_ids: Sequence[int], sampling: Sampling, index: int) -> Sample:
        """One sample (index `index` of the request); cancelling the caller aborts it in the engine."""
        ...

    async def abort(self, engine_ids: Sequence[str]) -> None:
        """Each aborted generate() returns what it has with FinishReason.ABORT."""

    def num_unfinished_requests(self) -> int: ...

    async def sleep(self, level: int) -> None: ...

    async def wake_up(self, tags: Sequence[str]) -> None:
        """ROLL's two-step wake-up: ["weights"], then ["kv_cache"]; [] wakes all."""

    async def commit_weights(self, update_info: UpdateInfo, version: int) -> None:
        """Loads a staged version (fabric.weights.staging.UpdateInfo) atomically; on failure the engine must
        be left serving the previous version, ready for the next commit."""
