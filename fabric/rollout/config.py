"""The rollout server's section (`actor_infer` by default): ROLL's shape, checked key by key.

```yaml
actor_infer:
  model_args: {model_name_or_path: /models/qwen, dtype: bf16}    # or `pretrain: /models/qwen`
  generating_args: {max_new_tokens: 512, top_p: 0.99, top_k: 100, num_beams: 1, temperature: 0.99,
                    num_return_sequences: 8}
  strategy_args:
    strategy_name: vllm
    strategy_config: {gpu_memory_utilization: 0.8, block_size: 16, max_model_len: 8000, sleep_level: 1}
  device_mapping: list(range(0,8))
  infer_batch_size: 64           # requests in the engine at once; more wait in the server's queue
  max_queue_length: 4096         # fabric: requests waiting beyond that are refused (RESOURCE_EXHAUSTED)
  drain_grace_s: 30              # fabric: on SIGTERM, running requests get this long before they are aborted
  admission_window_s: 0.002      # fabric: an idle engine waits until no request came for this long (0: off)
```

The model is `model_args.model_name_or_path`, else the section's `pretrain`, else the top-level `pretrain` (ROLL
writes the model once there and copies it into every role). Keys are sorted by fabric.config.roll_keys: ROLL's
other WorkerConfig keys are accepted and listed in `ignored` (one warning line at start), ROLL keys whose loss
would change the result are refused, and anything else is a typo, refused with the closest key. Engine arguments
(`strategy_config`) are checked against vLLM itself (fabric.rollout.engine.check_engine_config), not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from fabric.config import roll_keys
from fabric.config.loader import ConfigError, did_you_mean, parse_device_mapping, resolved, role_section
from fabric.config.sampling import IGNORED_SAMPLING_KEYS, SAMPLING_KEYS
from fabric.rollout.engine import ENGINES, engine_names

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "float32": "float32", "auto": "auto"}  # fmt: skip
DEFAULT_INFER_BATCH_SIZE = 256
DEFAULT_MAX_QUEUE_LENGTH = 4096
DEFAULT_DRAIN_GRACE_S = 30.0
# An idle engine takes a burst of requests in one pass: it waits until none has come for this long (fabric.rollout.
# scheduler: at most 25 windows). A Generate stream read back to back delivers its messages well within that.
DEFAULT_ADMISSION_WINDOW_S = 0.002


@dataclass
class RolloutConfig:
    """What the rollout server needs from its section; `key()` names a setting for error messages."""

    role: str
    model: str
    model_key: str  # where the model path came from, e.g. "actor_infer.model_args.model_name_or_path"
    dtype: str | None  # vLLM dtype from model_args.dtype, None when unset
    strategy_config: dict[str, Any]  # passed to vLLM unchanged (sleep_level removed)
    sleep_level: int = 1
    generating_args: dict[str, Any] = field(default_factory=dict)  # SamplingParams field -> default value
    infer_batch_size: int = DEFAULT_INFER_BATCH_SIZE
    max_queue_length: int = DEFAULT_MAX_QUEUE_LENGTH
    drain_grace_s: float = DEFAULT_DRAIN_GRACE_S
    admission_window_s: float = DEFAULT_ADMISSION_WINDOW_S
    device_mapping: list[int] = field(default_factory=list)
    strategy_name: str = "vllm"  # the engine (fabric.rollout.engine.ENGINES)
    include_stop_str_in_output: bool = False  # generating_args: a stop string ends the text (vLLM's default: not)
    ignored: list[str] = field(default_factory=list)  # ROLL keys set here that the fabric does not implement

    def key(self, *parts: str) -> str:
        return ".".join([self.role, *parts])

    def strategy_key(self, name: str) -> str:
        return self.key("strategy_args", "strategy_config", name)


def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {value!r}")
    return value


def _positive_int(section: dict, name: str, default: int, role: str) -> int:
    key = f"{role}.{name}"
    value = section.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"expected an integer >= 1, got {value!r}")
    return value


def load_rollout_config(cfg: DictConfig, role: str = "actor_infer") -> RolloutConfig:
    """The `role` section of a loaded config, checked; ConfigError names the bad key."""
    section_cfg = role_section(cfg, role)
    if not isinstance(section_cfg, DictConfig):
        raise ConfigError(role, "expected a mapping with model_args, strategy_args, generating_args")
    section = resolved(cfg, role)
    ignored = roll_keys.sort_keys(
        section,
        role,
        roll_keys.INFER_USED | roll_keys.INFER_FABRIC,
        roll_keys.INFER_IGNORED,
        roll_keys.INFER_REFUSED,
    )

    model_args = _mapping(section.get("model_args"), f"{role}.model_args")
    ignored += roll_keys.sort_keys(
        model_args,
        f"{role}.model_args",
        roll_keys.MODEL_ARGS_USED | roll_keys.MODEL_ARGS_QUIET,
        refused=roll_keys.MODEL_ARGS_REFUSED,
    )
    model, model_key = model_args.get("model_name_or_path"), f"{role}.model_args.model_name_or_path"
    if not model:
        model, model_key = section.get("pretrain"), f"{role}.pretrain"
    if not model:
        model, model_key = resolved(cfg, "pretrain"), "pretrain"
    if not model:
        raise ConfigError(
            f"{role}.model_args.model_name_or_path", "missing: set it, or the top-level `pretrain`, to a model dir"
        )

    dtype = model_args.get("dtype")
    if dtype is not None:
        if str(dtype) not in DTYPES:
            raise ConfigError(f"{role}.model_args.dtype", f"unknown dtype {dtype!r}: use bf16, fp16 or fp32")
        dtype = DTYPES[str(dtype)]

    strategy_args = _mapping(section.get("strategy_args"), f"{role}.strategy_args")
    roll_keys.sort_keys(strategy_args, f"{role}.strategy_args", {"strategy_name", "strategy_config"})
    name = strategy_args.get("strategy_name")
    if name not in ENGINES:
        raise ConfigError(
            f"{role}.strategy_args.strategy_name",
            f"no rollout engine named {name!r}: use one of {', '.join(engine_names())}",
        )
    strategy_config = dict(_mapping(strategy_args.get("strategy_config"), f"{role}.strategy_args.strategy_config"))
    for key, rule in roll_keys.STRATEGY_CONFIG_REFUSED.items():
        if key in strategy_config and not rule.allows(strategy_config[key]):
            raise ConfigError(f"{role}.strategy_args.strategy_config.{key}", rule.why)
    # ROLL pops these too: they are ROLL's settings, not vLLM engine arguments (VLLM_USE_V1: vLLM 0.32 is V1 only).
    sleep_level = strategy_config.pop("sleep_level", 1)
    if sleep_level not in (1, 2):
        raise ConfigError(f"{role}.strategy_args.strategy_config.sleep_level", f"must be 1 or 2, got {sleep_level!r}")
    use_v1 = strategy_config.pop("VLLM_USE_V1", 1)
    if str(use_v1) not in ("1", "True", "true"):
        raise ConfigError(
            f"{role}.strategy_args.strategy_config.VLLM_USE_V1", "vLLM's V0 engine is gone: remove it (or set 1)"
        )

    generating_raw = dict(_mapping(section.get("generating_args"), f"{role}.generating_args"))
    include_stop = generating_raw.pop("include_stop_str_in_output", None)
    if include_stop is not None and not isinstance(include_stop, bool):
        raise ConfigError(
            f"{role}.generating_args.include_stop_str_in_output", f"expected true or false, got {include_stop!r}"
        )
    rc = RolloutConfig(
        role=role,
        model=str(model),
        model_key=model_key,
        dtype=dtype,
        strategy_config=strategy_config,
        sleep_level=sleep_level,
        generating_args=_generating_args(generating_raw, role),
        infer_batch_size=_positive_int(section, "infer_batch_size", DEFAULT_INFER_BATCH_SIZE, role),
        max_queue_length=_positive_int(section, "max_queue_length", DEFAULT_MAX_QUEUE_LENGTH, role),
        device_mapping=parse_device_mapping(section.get("device_mapping"), f"{role}.device_mapping"),
        strategy_name=name,
        include_stop_str_in_output=bool(include_stop),
        ignored=ignored,
    )
    rc.drain_grace_s = _seconds(section, "drain_grace_s", DEFAULT_DRAIN_GRACE_S, role)
    rc.admission_window_s = _seconds(section, "admission_window_s", DEFAULT_ADMISSION_WINDOW_S, role, most=1.0)
    return rc


def _seconds(section: dict, name: str, default: float, role: str, most: float | None = None) -> float:
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (most and value > most):
        bound = f"between 0 and {most}" if most else ">= 0"
        raise ConfigError(f"{role}.{name}", f"expected a number of seconds {bound}, got {value!r}")
    return float(value)


def _generating_args(raw: dict, role: str) -> dict[str, Any]:
    """ROLL's generating_args as SamplingParams field -> value. Values are checked by the rollout server's
    request validation (the same rules a request's `sampling` meets), at start."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name in IGNORED_SAMPLING_KEYS or value is None:
            continue
        if name not in SAMPLING_KEYS:
            known = set(SAMPLING_KEYS) | IGNORED_SAMPLING_KEYS | {"include_stop_str_in_output"}
            hint = did_you_mean(name, known) or f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{role}.generating_args.{name}", f"unknown generating argument; {hint}")
        target = SAMPLING_KEYS[name].field
        if target == "stop":
            value = [value] if isinstance(value, str) else list(value)
        out[target] = value
    return out
