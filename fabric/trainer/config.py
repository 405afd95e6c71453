"""The trainer's view of the YAML: ROLL's pipeline keys, `actor_train`, `reference`, plus the fabric's own
`cluster`, `weight_sync`, `timeouts` and `sft_warmup` sections. Unknown top-level keys are errors with a
did-you-mean; so are unknown keys inside the sections the fabric owns.

```yaml
exp_name: demo
output_dir: ./runs/${exp_name}
seed: 42
max_steps: 40
rollout_batch_size: 16              # prompts per step
num_return_sequences_in_group: 8    # samples per prompt (the GRPO group)
prompt_length: 64
response_length: 16
ppo_epochs: 1
pg_clip: 0.2
adv_estimator: grpo                 # the algorithm keys: ROLL's (trainer/algorithm_config.py, the README's table)
use_kl_loss: false                  # KL to the frozen reference in the loss: kl_loss_coef x k3 (ROLL's)
actor_train:
  pretrain: /models/tiny
  data_args: {file_name: data/train.jsonl}      # JSONL rows: prompt, ground_truth (and optional tag)
  training_args: {learning_rate: 1.0e-5, weight_decay: 0.0, max_grad_norm: 1.0, per_device_train_batch_size: 64}
  strategy_args: {strategy_name: megatron_train}
cluster:                            # where the other processes are (fabric run fills these in)
  rollout: [10.0.0.2:50051, 10.0.0.3:50051]
  reward: [10.0.0.4:50052]
  num_rollout_servers: 2            # how many `fabric run` starts on this node when `rollout` is empty
  num_reward_servers: 1
  trainer_port: 0
  trainer_start: auto               # fabric run: with_servers, after_servers, or auto (see fabric/run/launcher.py)
```
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from fabric.config.loader import ConfigError, check_keys, number, parse_device_mapping
from fabric.config.roll_keys import top_level
from fabric.config.sampling import TRAINER_SAMPLING_KEYS
from fabric.trainer.algorithm_config import ALGORITHM_KEYS, AlgorithmConfig, algorithm_config, check_batch_sizes
from fabric.weights.transports import CHOICES

TOP_LEVEL_KEYS = {
    # ROLL's pipeline keys (accepted; the ones the fabric uses are read below)
    "exp_name", "seed", "logging_dir", "output_dir", "max_steps", "save_steps", "logging_steps", "eval_steps",
    "resume_from_checkpoint", "rollout_batch_size", "val_batch_size", "num_return_sequences_in_group",
    "prompt_length", "response_length", "ppo_epochs", "pg_clip", "pg_clip_high", "init_kl_coef", "target_kl",
    "kl_horizon", "add_token_level_kl", "use_kl_loss", "kl_loss_coef", "loss_agg_mode", "whiten_advantages",
    "adv_estimator", "reward_clip", "advantage_clip", "dual_clip_loss", "max_len_mask", "difficulty_mask",
    "checkpoint_config", "track_with", "tracker_kwargs", "num_gpus_per_node", "system_envs", "defaults", "hydra",
    "pretrain", "reward_pretrain", "validation", "max_running_requests", "is_num_return_sequences_expand",
    "async_generation_ratio", "generate_opt_level", "is_use_additional_prompts", "max_additional_running_prompts",
    "response_length_penalty_coef", "lambd", "gamma", "value_clip", "norm_mean_type", "norm_std_type",
    # sections
    "actor_train", "actor_infer", "reference", "critic", "rewards",
    # the fabric's own
    "cluster", "weight_sync", "timeouts", "sft_warmup", "security", "dataset", "stale_samples", "task",
    "async_training",
}  # fmt: skip
CLUSTER_KEYS = {
    "rollout",
    "reward",
    "num_rollout_servers",
    "num_reward_servers",
    "trainer_port",
    "host",
    "trainer_start",
}
TRAINER_STARTS = ("auto", "with_servers", "after_servers")
WEIGHT_SYNC_KEYS = {"mode", "transport", "chunk_mib"}
TIMEOUT_KEYS = {"generate_s", "score_s", "push_s", "rpc_s", "server_start_s"}
SFT_KEYS = {"steps", "learning_rate", "batch_size", "skip"}
# ---- asynchronous RL (fabric/trainer/loop.py): the `async_training` section ----
ASYNC_KEYS = {"max_staleness", "partial_rollout", "off_policy_correction", "importance_cap"}
PARTIAL_ROLLOUTS = ("keep", "regenerate")
OFF_POLICY_CORRECTIONS = ("tis", "decoupled", "none")
# ---- torch.compile of the trainer's model (fabric/trainer/model.py), the environment variable FABRIC_TRAINER_COMPILE:
# off; fusions (torch.compile'd SwiGLU, bias-dropout-add and logprob passes, CUDA only); layers (each decoder layer one
# compiled graph forward and backward, plus the logprob passes on CUDA); auto, the default: layers on CUDA for a model
# of AUTO_COMPILE_MIN_PARAMS or more (an H200, the 1.5B layout: 0.366 s a step against 0.470 eager, after about a
# minute of compiling), off otherwise (a tiny model would spend longer compiling than training).
COMPILE_ENV = "FABRIC_TRAINER_COMPILE"
COMPILE_MODES = {"0": "off", "off": "off", "1": "fusions", "fusions": "fusions", "layers": "layers", "auto": "auto"}
AUTO_COMPILE_MIN_PARAMS = 100_000_000

# ---- the trainer's algorithm keys: read by fabric/trainer/algorithm_config.py (ROLL's meaning and defaults) ----
TOP_LEVEL_KEYS = TOP_LEVEL_KEYS | ALGORITHM_KEYS

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    exp_name: str = "fabric"
    output_dir: str = "./runs/fabric"
    seed: int = 42
    max_steps: int = 10
    rollout_batch_size: int = 16
    group_size: int = 8
    prompt_length: int = 64
    response_length: int = 32
    # ROLL's sequence_length (prompt + response, unless set): seq-mean-token-sum-norm divides by it minus 1, the
    # padded width of ROLL's loss mask
    sequence_length: int = 96
    save_steps: int = 0
    pretrain: str = ""
    dataset: str = ""
    dtype: str = "float32"
    sampling: dict[str, Any] = field(default_factory=dict)  # generating_args for rollouts
    rewards: dict[str, dict[str, Any]] = field(default_factory=dict)
    rollout_addresses: list[str] = field(default_factory=list)
    reward_addresses: list[str] = field(default_factory=list)
    num_rollout_servers: int = 1
    num_reward_servers: int = 1
    trainer_port: int = 0
    host: str = "127.0.0.1"
    trainer_start: str = "auto"  # fabric run: the trainer loads beside its servers or after them
    sync_mode: str | None = None
    sync_transport: str = "auto"
    chunk_mib: float = 4.0
    stale_policy: str = "drop"
    generate_timeout_s: float = 600.0
    score_timeout_s: float = 300.0
    push_timeout_s: float = 600.0
    rpc_timeout_s: float = 30.0
    server_start_timeout_s: float = 600.0
    sft_steps: int = 0
    sft_learning_rate: float | None = None
    sft_batch_size: int = 64
    # async_training: rollouts of the next steps run while the trainer trains (0: strictly in turn)
    max_staleness: int = 0  # k: no sample trained on is more than k versions older than the policy
    partial_rollout: str = "keep"  # a sample that spans an update: keep it, or drop it and generate it again
    off_policy_correction: str = "tis"  # weights of samples from older versions: tis, decoupled or none
    importance_cap: float = 2.0  # tis: the weight is min(w, cap); decoupled: tokens with w > cap leave the loss
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)  # ROLL's algorithm keys
    # actor_train and actor_infer share a device (ROLL's colocation): the rollout servers sleep while the trainer
    # trains and wake for the new version (weights first, the push, then the KV cache)
    colocate: bool = False
    sleep_level: int = 1  # actor_infer's strategy_config.sleep_level
    # actor_train's micro-batches and activation recompute, as ROLL's keys say (train_speed_config)
    use_dynamic_batching_in_train: bool = False
    max_tokens_per_microbatch_in_train: int = 0
    sequence_length_round_in_train: int = 128
    recompute_granularity: str | None = None  # these three: actor_train.strategy_args.strategy_config's
    recompute_method: str | None = None
    recompute_num_layers: int | None = None

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    def rewards_for(self, tag: Any) -> list[str]:
        """The rewards that score a sample of this dataset tag: those whose tag_included names it or is empty."""
        return [name for name, spec in self.rewards.items() if not spec["tags"] or tag in spec["tags"]]

    def domain_of(self, tag: Any) -> str:
        """A sample's reward domain, as ROLL's tag_2_domain: the reward whose tag_included names its tag (the last
        one, as ROLL's dict); a tag that none names falls to the first reward without tag_included (ROLL: to
        "math_rule"), else it is its own domain."""
        named = [name for name, spec in self.rewards.items() if tag in spec["tags"]]
        if named:
            return named[-1]
        return next((name for name, spec in self.rewards.items() if not spec["tags"]), str(tag))


def compile_mode(value: str | None = None) -> str:
    """off, fusions, layers or auto: `value`, else the FABRIC_TRAINER_COMPILE environment variable (default auto,
    which build_gpt_model resolves by device and model size)."""
    raw = os.environ.get(COMPILE_ENV, "auto") if value is None else value
    mode = COMPILE_MODES.get(str(raw).strip().lower())
    if mode is None:
        raise ConfigError(COMPILE_ENV, f"{raw!r} is unknown; use auto, off, fusions or layers")
    return mode


def resolve_compile_mode(mode: str, device_type: str, params: int) -> str:
    """auto -> layers on CUDA for a model of AUTO_COMPILE_MIN_PARAMS or more, else off; other modes as they are."""
    if mode != "auto":
        return mode
    return "layers" if device_type == "cuda" and params >= AUTO_COMPILE_MIN_PARAMS else "off"


def _get(cfg: DictConfig, path: str, default=None):
    value = OmegaConf.select(cfg, path, default=default)
    return default if value is None else value


def _positive(value, key: str, kind=int):
    return number(value, key, kind, above=0)


def _response_length(cfg: DictConfig):
    """ROLL's rule: `sequence_length` (prompt + response) gives the response length when response_length is unset."""
    if _get(cfg, "response_length") is None and _get(cfg, "sequence_length") is not None:
        prompt = _positive(_get(cfg, "prompt_length", 64), "prompt_length")
        response = _positive(_get(cfg, "sequence_length"), "sequence_length") - prompt
        if response < 1:
            raise ConfigError("sequence_length", f"must exceed prompt_length ({prompt}): it is prompt + response")
        return response
    return _get(cfg, "response_length", 32)


def pipeline_config(cfg: DictConfig) -> PipelineConfig:
    errors = top_level(cfg, TOP_LEVEL_KEYS)[1]
    if errors:
        raise errors[0]
    check_keys(cfg.get("cluster"), CLUSTER_KEYS, "cluster")
    check_keys(cfg.get("weight_sync"), WEIGHT_SYNC_KEYS, "weight_sync")
    check_keys(cfg.get("timeouts"), TIMEOUT_KEYS, "timeouts")
    check_keys(cfg.get("sft_warmup"), SFT_KEYS, "sft_warmup")
    check_keys(cfg.get("async_training"), ASYNC_KEYS, "async_training")
    if "actor_train" not in cfg:
        raise ConfigError("actor_train", "section missing: the trainer needs the policy's model (pretrain)")
    train = cfg.actor_train
    strategy = _get(train, "strategy_args.strategy_name", "megatron_train")
    if strategy != "megatron_train":
        raise ConfigError(
            "actor_train.strategy_args.strategy_name",
            f"'{strategy}' is not supported: the fabric's trainer is megatron_train",
        )
    pretrain = _get(train, "pretrain") or _get(train, "model_args.model_name_or_path") or _get(cfg, "pretrain")
    if not pretrain:
        raise ConfigError("actor_train.pretrain", "no model: set actor_train.pretrain (an HF model directory)")
    dataset = _get(train, "data_args.file_name") or _get(cfg, "dataset")
    if isinstance(dataset, list | tuple) or (dataset is not None and not isinstance(dataset, str)):
        if len(dataset) > 1:
            raise ConfigError("actor_train.data_args.file_name", "the fabric reads one JSONL file: concatenate them")
        dataset = list(dataset)[0] if len(dataset) else None
    if not dataset:
        raise ConfigError("actor_train.data_args.file_name", "no dataset: a JSONL file of {prompt, ground_truth}")
    pc = PipelineConfig(
        exp_name=str(_get(cfg, "exp_name", "fabric")),
        seed=number(_get(cfg, "seed", 42), "seed", int),
        max_steps=_positive(_get(cfg, "max_steps", 10), "max_steps"),
        rollout_batch_size=_positive(_get(cfg, "rollout_batch_size", 16), "rollout_batch_size"),
        group_size=_positive(_get(cfg, "num_return_sequences_in_group", 8), "num_return_sequences_in_group"),
        prompt_length=_positive(_get(cfg, "prompt_length", 64), "prompt_length"),
        response_length=_positive(_response_length(cfg), "response_length"),
        save_steps=number(_get(cfg, "save_steps", 0) or 0, "save_steps", int),
        pretrain=str(pretrain),
        dataset=str(dataset),
        dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(
            str(_get(train, "model_args.dtype", "fp32")), str(_get(train, "model_args.dtype", "float32"))
        ),
        output_dir=str(_get(cfg, "output_dir", f"./runs/{_get(cfg, 'exp_name', 'fabric')}")),
    )
    pc.sequence_length = _positive(_get(cfg, "sequence_length", pc.prompt_length + pc.response_length),
                                   "sequence_length")  # fmt: skip
    infer = cfg.get("actor_infer") or {}
    generating = dict(
        cast(dict, OmegaConf.to_container(infer.get("generating_args") or OmegaConf.create({}), resolve=True))
    )
    generating.setdefault("max_new_tokens", pc.response_length)
    generating["num_return_sequences"] = pc.group_size
    pc.sampling = {k: v for k, v in generating.items() if k in TRAINER_SAMPLING_KEYS}
    max_new_tokens_key = "actor_infer.generating_args.max_new_tokens"
    pc.sampling["max_new_tokens"] = number(pc.sampling["max_new_tokens"], max_new_tokens_key, int, minimum=1)
    if pc.sampling["max_new_tokens"] > pc.response_length:
        raise ConfigError(
            "actor_infer.generating_args.max_new_tokens",
            f"{pc.sampling['max_new_tokens']} exceeds response_length {pc.response_length}",
        )
    rewards = cfg.get("rewards")
    if not rewards:
        raise ConfigError(
            "rewards", "section missing: name at least one reward (e.g. answer_tag: {worker_cls: answer_tag})"
        )
    for name, spec in rewards.items():
        spec = spec or {}
        tags = spec.get("tag_included") or []
        pc.rewards[str(name)] = {
            "weight": number(spec.get("weight", 1.0), f"rewards.{name}.weight"),
            "tags": [str(t) for t in tags],
        }
    cluster = cfg.get("cluster") or {}
    pc.rollout_addresses = [str(a) for a in cluster.get("rollout") or []]
    pc.reward_addresses = [str(a) for a in cluster.get("reward") or []]
    pc.num_rollout_servers = number(cluster.get("num_rollout_servers", 1), "cluster.num_rollout_servers", int)
    pc.num_reward_servers = number(cluster.get("num_reward_servers", 1), "cluster.num_reward_servers", int)
    pc.trainer_port = number(cluster.get("trainer_port", 0), "cluster.trainer_port", int)
    pc.host = str(cluster.get("host", "127.0.0.1"))
    pc.trainer_start = str(cluster.get("trainer_start", "auto"))
    if pc.trainer_start not in TRAINER_STARTS:
        raise ConfigError("cluster.trainer_start", f"'{pc.trainer_start}': use {', '.join(TRAINER_STARTS)}")
    sync = cfg.get("weight_sync") or {}
    pc.sync_mode = sync.get("mode")
    if pc.sync_mode not in (None, "relay", "direct"):
        raise ConfigError("weight_sync.mode", f"'{pc.sync_mode}': use relay or direct")
    pc.sync_transport = str(sync.get("transport", "auto"))
    if pc.sync_transport not in CHOICES:
        raise ConfigError("weight_sync.transport", f"'{pc.sync_transport}': use one of {', '.join(CHOICES)}")
    pc.chunk_mib = number(sync.get("chunk_mib", 4.0), "weight_sync.chunk_mib")
    timeouts = cfg.get("timeouts") or {}
    pc.generate_timeout_s = number(timeouts.get("generate_s", pc.generate_timeout_s), "timeouts.generate_s")
    pc.score_timeout_s = number(timeouts.get("score_s", pc.score_timeout_s), "timeouts.score_s")
    pc.push_timeout_s = number(timeouts.get("push_s", pc.push_timeout_s), "timeouts.push_s")
    pc.rpc_timeout_s = number(timeouts.get("rpc_s", pc.rpc_timeout_s), "timeouts.rpc_s")
    pc.server_start_timeout_s = number(
        timeouts.get("server_start_s", pc.server_start_timeout_s), "timeouts.server_start_s"
    )
    pc.stale_policy = str(cfg.get("stale_samples", "drop"))
    if pc.stale_policy not in ("drop", "use"):
        raise ConfigError("stale_samples", f"'{pc.stale_policy}': use drop (leave them out of the loss) or use")
    sft = cfg.get("sft_warmup") or {}
    pc.sft_steps = 0 if sft.get("skip") else number(sft.get("steps", 0), "sft_warmup.steps", int)
    pc.sft_learning_rate = sft.get("learning_rate")
    pc.sft_batch_size = number(sft.get("batch_size", 64), "sft_warmup.batch_size", int)
    async_config(cfg, pc)
    colocation_config(cfg, pc)
    train_speed_config(train, pc)
    compile_mode()  # a bad FABRIC_TRAINER_COMPILE fails here, before any process starts
    # ---- the trainer's algorithm keys (fabric/trainer/algorithm_config.py) ----
    pc.algorithm = algorithm_config(cfg)
    check_batch_sizes(pc.algorithm, pc.rollout_batch_size * pc.group_size, pc.max_steps)
    return pc


def train_speed_config(train: DictConfig, pc: PipelineConfig) -> None:
    """actor_train's ROLL keys for micro-batches (dynamic batching: rows sorted by length, as many per micro-batch as
    fit max_tokens_per_microbatch_in_train counted as rows x longest row rounded up to sequence_length_round_in_train)
    and megatron's activation recompute (strategy_config.recompute_granularity: full or selective)."""
    pc.use_dynamic_batching_in_train = bool(_get(train, "use_dynamic_batching_in_train", False))
    pc.max_tokens_per_microbatch_in_train = number(
        _get(train, "max_tokens_per_microbatch_in_train", 0), "actor_train.max_tokens_per_microbatch_in_train", int
    )
    round_to = _get(train, "sequence_length_round_in_train", 128)
    pc.sequence_length_round_in_train = _positive(round_to, "actor_train.sequence_length_round_in_train")
    if pc.use_dynamic_batching_in_train and pc.max_tokens_per_microbatch_in_train <= 0:
        raise ConfigError(
            "actor_train.max_tokens_per_microbatch_in_train",
            "must be > 0 with use_dynamic_batching_in_train: the token budget of a micro-batch",
        )
    key = "actor_train.strategy_args.strategy_config"
    granularity = _get(train, "strategy_args.strategy_config.recompute_granularity")
    method = _get(train, "strategy_args.strategy_config.recompute_method")
    layers = _get(train, "strategy_args.strategy_config.recompute_num_layers")
    if granularity not in (None, "full", "selective"):
        raise ConfigError(f"{key}.recompute_granularity", f"'{granularity}': use full or selective")
    if method not in (None, "uniform", "block"):
        raise ConfigError(f"{key}.recompute_method", f"'{method}': use uniform or block")
    if granularity != "full" and (method is not None or layers is not None):
        raise ConfigError(f"{key}.recompute_method", "recompute_method / recompute_num_layers need granularity full")
    pc.recompute_granularity, pc.recompute_method = granularity, method
    pc.recompute_num_layers = None if layers is None else _positive(layers, f"{key}.recompute_num_layers")


def async_config(cfg: DictConfig, pc: PipelineConfig) -> None:
    """The `async_training` section; ROLL's `async_generation_ratio` r (rollouts of the next r batches may run ahead
    of training) maps onto max_staleness = ceil(r): a sample of a batch generated r steps ahead is at most that many
    versions old when it is trained on. Setting both to different bounds is an error."""
    import math

    section = cfg.get("async_training") or {}
    k = section.get("max_staleness")
    ratio = _get(cfg, "async_generation_ratio")
    if ratio is not None:
        try:
            ratio = float(ratio)
        except (TypeError, ValueError):
            raise ConfigError("async_generation_ratio", f"must be a number >= 0, got {ratio!r}") from None
        if ratio < 0:
            raise ConfigError("async_generation_ratio", f"must be >= 0, got {ratio}")
        mapped = math.ceil(ratio)
        if k is not None and number(k, "async_training.max_staleness", int) != mapped:
            raise ConfigError(
                "async_training.max_staleness",
                f"{k} contradicts async_generation_ratio {ratio:g} (= max_staleness {mapped}): set one of them",
            )
        k = mapped
    try:
        pc.max_staleness = int(0 if k is None else k)
    except (TypeError, ValueError):
        raise ConfigError("async_training.max_staleness", f"must be an integer >= 0, got {k!r}") from None
    if pc.max_staleness < 0:
        raise ConfigError("async_training.max_staleness", f"must be >= 0, got {pc.max_staleness}")
    pc.partial_rollout = str(section.get("partial_rollout", pc.partial_rollout))
    if pc.partial_rollout not in PARTIAL_ROLLOUTS:
        raise ConfigError(
            "async_training.partial_rollout",
            f"'{pc.partial_rollout}': use keep (a sample that spans a weight update is trained on) or regenerate",
        )
    pc.off_policy_correction = str(section.get("off_policy_correction", pc.off_policy_correction))
    if pc.off_policy_correction not in OFF_POLICY_CORRECTIONS:
        raise ConfigError(
            "async_training.off_policy_correction",
            f"'{pc.off_policy_correction}': use one of {', '.join(OFF_POLICY_CORRECTIONS)}",
        )
    pc.importance_cap = number(section.get("importance_cap", pc.importance_cap), "async_training.importance_cap")
    if pc.importance_cap < 1.0:
        raise ConfigError("async_training.importance_cap", f"must be >= 1, got {pc.importance_cap}")


def colocation_config(cfg: DictConfig, pc: PipelineConfig) -> None:
    """ROLL colocates actor_train and actor_infer when their device_mappings share a device: generation and training
    then take turns on it, the rollout servers asleep (actor_infer's sleep_level) while the trainer trains. With
    async_training overlapping them (max_staleness > 0) nothing sleeps: both stay on the devices they share."""
    train = parse_device_mapping(_get(cfg, "actor_train.device_mapping"), "actor_train.device_mapping")
    infer = parse_device_mapping(_get(cfg, "actor_infer.device_mapping"), "actor_infer.device_mapping")
    shared = sorted(set(train) & set(infer))
    level = _get(cfg, "actor_infer.strategy_args.strategy_config.sleep_level", 1)
    if level not in (1, 2):
        raise ConfigError("actor_infer.strategy_args.strategy_config.sleep_level", f"must be 1 or 2, got {level!r}")
    pc.sleep_level = int(level)
    pc.colocate = bool(shared) and pc.max_staleness == 0
    if shared and pc.max_staleness > 0:
        log.warning(
            "actor_train and actor_infer share devices %s but async_training.max_staleness is %d: generation overlaps "
            "training, so the rollout servers stay awake (no sleep); both must fit in the devices' memory",
            shared,
            pc.max_staleness,
        )
