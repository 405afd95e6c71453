"""The trainer's algorithm keys, read with ROLL's meaning and defaults (roll/configs/base_config.py PPOConfig,
roll/pipeline/rlvr/rlvr_config.py, roll/configs/training_args.py).

Every ROLL algorithm key is either implemented as ROLL implements it or refused, in one line naming the key, when
set to anything but ROLL's default. The README's "Algorithm keys" table lists what the fabric does with each.
Pure Python (no torch): the launcher reads the config too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fabric.config.loader import ConfigError
from fabric.config.loader import number as _number

log = logging.getLogger(__name__)

# Top-level ROLL keys this module reads (fabric.trainer.config adds them to the accepted keys).
ALGORITHM_KEYS = {
    "ppo_epochs", "adv_estimator", "gamma", "lambd", "norm_mean_type", "norm_std_type", "whiten_advantages",
    "whiten_rewards", "advantage_clip", "reward_clip", "pg_clip", "use_pg_clip_range", "pg_clip_low", "pg_clip_high",
    "dual_clip_loss", "loss_agg_mode", "use_kl_loss", "kl_loss_coef", "add_token_level_kl", "init_kl_coef",
    "target_kl", "kl_horizon", "kl_penalty", "max_len_mask", "difficulty_mask", "difficulty_low_threshold",
    "difficulty_high_threshold", "entropy_loss_coef", "value_clip", "error_max_len_clip", "difficulty_loss_weight",
    "length_loss_weight", "rl_loss_coef",
}  # fmt: skip
ADV_ESTIMATORS = ("grpo", "reinforce")
NORM_TYPES = ("batch", "group", None)
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_PENALTIES = ("kl", "abs", "mse", "k3")
LR_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


@dataclass
class AlgorithmConfig:
    # advantages (roll/utils/functionals.py: reward_postprocess, compute_token_reward, compute_advantage)
    adv_estimator: str = "grpo"  # ROLL's default is gae (needs a critic, which the fabric has not): see below
    gamma: float = 1.0
    norm_mean_type: str | None = None  # forced to group by grpo, as in ROLL
    norm_std_type: str | None = None
    whiten_rewards: bool = False
    whiten_advantages: bool = False
    advantage_clip: float | None = None
    reward_clip: float | None = None
    max_len_mask: bool = False
    difficulty_mask: bool = False
    difficulty_low_threshold: float = 0.0
    difficulty_high_threshold: float = 1.0
    # KL: in the reward (k1 by default, adaptive with target_kl) and/or in the loss (k3, clamped)
    add_token_level_kl: bool = False
    init_kl_coef: float = 0.2
    target_kl: float | None = None
    kl_horizon: int = 10000
    kl_penalty: str = "kl"
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.0
    # the policy loss (roll/pipeline/rlvr/actor_worker.py loss_func)
    pg_clip: float = 0.2
    use_pg_clip_range: bool = False
    pg_clip_low: float = 0.2
    pg_clip_high: float = 0.2
    dual_clip_loss: bool = False
    loss_agg_mode: str = "seq-mean-token-mean"
    ppo_epochs: int = 1
    # the optimizer (actor_train.training_args; megatron's AdamW with fp32 main params, its LR scheduler)
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0

    @property
    def clip_low(self) -> float:
        return self.pg_clip_low if self.use_pg_clip_range else self.pg_clip

    @property
    def clip_high(self) -> float:
        return self.pg_clip_high if self.use_pg_clip_range else self.pg_clip

    @property
    def mini_batch_size(self) -> int:
        """Samples per optimizer step on one data-parallel rank; ROLL's backward_batch_size is this times DP
        (fabric.trainer.distributed multiplies it in)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def kl_loss_coef_in_use(self) -> float:
        return self.kl_loss_coef if self.use_kl_loss else 0.0

    def optimizer_steps(self, samples_per_step: int, max_steps: int) -> int:
        """Optimizer steps of the whole run (ROLL's set_max_steps): the LR schedule's length."""
        return max(1, max_steps * samples_per_step * self.ppo_epochs // self.mini_batch_size)

    def lr_warmup_steps(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(total_steps * self.warmup_ratio)


def _select(cfg: DictConfig, path: str, default=None):
    value = OmegaConf.select(cfg, path, default=default)
    return default if value is None else value


def _flag(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _choice(value, key: str, allowed, refused: dict[str, str] | None = None):
    if refused and value in refused:
        raise ConfigError(key, f"{value!r} is not supported by the fabric: {refused[value]}")
    if value not in allowed:
        shown = ", ".join("~ (null)" if a is None else str(a) for a in allowed)
        raise ConfigError(key, f"{value!r} is not one of {shown}")
    return value


def _refuse_unless_default(cfg: DictConfig, key: str, default: Any, why: str) -> None:
    value = _select(cfg, key)
    if value is not None and value != default:
        raise ConfigError(key, f"{value!r} is not supported by the fabric ({why}); leave it at ROLL's {default!r}")


def algorithm_config(cfg: DictConfig) -> AlgorithmConfig:
    """The algorithm keys of a loaded config, checked; ConfigError names the first bad key."""
    a = AlgorithmConfig()
    train = "actor_train.training_args"

    estimator = _select(cfg, "adv_estimator")
    if estimator is None:
        log.info("adv_estimator not set: ROLL's default (gae) needs a critic, the fabric runs grpo")
    else:
        a.adv_estimator = _choice(
            str(estimator),
            "adv_estimator",
            ADV_ESTIMATORS,
            {
                "gae": "it needs a critic (value model); use grpo or reinforce",
                "gigpo": "agentic pipelines only",
                "step_reinforce": "agentic pipelines only",
                "agentic_reinforce": "agentic pipelines only",
            },
        )
    a.gamma = _number(_select(cfg, "gamma", 1.0), "gamma", minimum=0.0)
    for key in ("norm_mean_type", "norm_std_type"):
        value = _select(cfg, key)
        setattr(a, key, _choice(value, key, NORM_TYPES, {"running": "running statistics are not implemented"}))
    if a.adv_estimator == "grpo":  # as ROLL's reward_postprocess
        a.norm_mean_type = a.norm_std_type = "group"
    a.whiten_rewards = _flag(_select(cfg, "whiten_rewards", False), "whiten_rewards")
    a.whiten_advantages = _flag(_select(cfg, "whiten_advantages", False), "whiten_advantages")
    for key in ("advantage_clip", "reward_clip"):
        value = _select(cfg, key)
        setattr(a, key, None if value is None else _number(value, key, above=0.0))
    a.max_len_mask = _flag(_select(cfg, "max_len_mask", False), "max_len_mask")
    a.difficulty_mask = _flag(_select(cfg, "difficulty_mask", False), "difficulty_mask")
    a.difficulty_low_threshold = _number(_select(cfg, "difficulty_low_threshold", 0.0), "difficulty_low_threshold")
    a.difficulty_high_threshold = _number(_select(cfg, "difficulty_high_threshold", 1.0), "difficulty_high_threshold")

    a.add_token_level_kl = _flag(_select(cfg, "add_token_level_kl", False), "add_token_level_kl")
    a.init_kl_coef = _number(_select(cfg, "init_kl_coef", 0.2), "init_kl_coef", minimum=0.0)
    target = _select(cfg, "target_kl")
    a.target_kl = None if target is None else _number(target, "target_kl", above=0.0)
    a.kl_horizon = _number(_select(cfg, "kl_horizon", 10000), "kl_horizon", int, above=0)
    a.kl_penalty = _choice(
        str(_select(cfg, "kl_penalty", "kl")), "kl_penalty", KL_PENALTIES, {"full": "it needs full-vocabulary logprobs"}
    )
    a.use_kl_loss = _flag(_select(cfg, "use_kl_loss", False), "use_kl_loss")
    a.kl_loss_coef = _number(_select(cfg, "kl_loss_coef", 0.0), "kl_loss_coef", minimum=0.0)

    a.pg_clip = _number(_select(cfg, "pg_clip", 0.2), "pg_clip", above=0.0)
    a.use_pg_clip_range = _flag(_select(cfg, "use_pg_clip_range", False), "use_pg_clip_range")
    a.pg_clip_low = _number(_select(cfg, "pg_clip_low", 0.2), "pg_clip_low", above=0.0)
    a.pg_clip_high = _number(_select(cfg, "pg_clip_high", 0.2), "pg_clip_high", above=0.0)
    bounds_given = _select(cfg, "pg_clip_low") is not None or _select(cfg, "pg_clip_high") is not None
    if bounds_given and not a.use_pg_clip_range:
        log.warning("pg_clip_low / pg_clip_high take effect only with use_pg_clip_range: true (as in ROLL)")
    a.dual_clip_loss = _flag(_select(cfg, "dual_clip_loss", False), "dual_clip_loss")
    a.loss_agg_mode = _choice(str(_select(cfg, "loss_agg_mode", a.loss_agg_mode)), "loss_agg_mode", LOSS_AGG_MODES)
    a.ppo_epochs = _number(_select(cfg, "ppo_epochs", 1), "ppo_epochs", int, above=0)

    _refuse_unless_default(cfg, "entropy_loss_coef", 0, "no entropy bonus")
    _refuse_unless_default(cfg, "error_max_len_clip", False, "not implemented")
    _refuse_unless_default(cfg, "difficulty_loss_weight", False, "not implemented")
    _refuse_unless_default(cfg, "length_loss_weight", False, "not implemented")
    _refuse_unless_default(cfg, "rl_loss_coef", 1.0, "not implemented")
    # value_clip, lambd: the critic's (gae), which the fabric refuses; accepted without effect. importance_sampling
    # and the keys ROLL's code never reads (use_reward_scaling, ...) are fabric/config/roll_keys.py's.

    a.learning_rate = _number(_select(cfg, f"{train}.learning_rate", 5e-5), f"{train}.learning_rate", above=0.0)
    a.weight_decay = _number(_select(cfg, f"{train}.weight_decay", 0.0), f"{train}.weight_decay", minimum=0.0)
    a.adam_beta1 = _number(_select(cfg, f"{train}.adam_beta1", 0.9), f"{train}.adam_beta1", minimum=0.0)
    a.adam_beta2 = _number(_select(cfg, f"{train}.adam_beta2", 0.999), f"{train}.adam_beta2", minimum=0.0)
    max_grad_norm = _select(cfg, f"{train}.max_grad_norm", _select(cfg, "max_grad_norm", 1.0))  # or ROLL's top level
    a.max_grad_norm = _number(max_grad_norm, f"{train}.max_grad_norm", above=0.0)
    a.per_device_train_batch_size = _number(
        _select(cfg, f"{train}.per_device_train_batch_size", 8), f"{train}.per_device_train_batch_size", int, above=0
    )
    a.gradient_accumulation_steps = _number(
        _select(cfg, f"{train}.gradient_accumulation_steps", 1), f"{train}.gradient_accumulation_steps", int, above=0
    )
    scheduler = str(_select(cfg, f"{train}.lr_scheduler_type", "linear"))
    a.lr_scheduler_type = LR_SCHEDULERS[_choice(scheduler, f"{train}.lr_scheduler_type", tuple(LR_SCHEDULERS))]
    a.warmup_steps = _number(_select(cfg, f"{train}.warmup_steps", 0), f"{train}.warmup_steps", int, minimum=0)
    a.warmup_ratio = _number(_select(cfg, f"{train}.warmup_ratio", 0.0), f"{train}.warmup_ratio", minimum=0.0)
    if _select(cfg, f"{train}.lr_scheduler_kwargs"):
        raise ConfigError(f"{train}.lr_scheduler_kwargs", "not supported by the fabric (min_lr 0: ROLL's default)")
    return a


def check_batch_sizes(a: AlgorithmConfig, samples_per_step: int, max_steps: int) -> None:
    """Each step's samples split into whole mini-batches; the warm-up fits in the schedule (megatron asserts it)."""
    key = "actor_train.training_args.gradient_accumulation_steps"
    if samples_per_step % a.mini_batch_size:
        raise ConfigError(
            key,
            f"a step's {samples_per_step} samples (rollout_batch_size x num_return_sequences_in_group) do not split "
            f"into mini-batches of per_device_train_batch_size x gradient_accumulation_steps = {a.mini_batch_size}",
        )
    total = a.optimizer_steps(samples_per_step, max_steps)
    if a.lr_warmup_steps(total) >= total:
        raise ConfigError(
            "actor_train.training_args.warmup_steps",
            f"{a.lr_warmup_steps(total)} warm-up steps leave none of the run's {total} optimizer steps to decay over",
        )
