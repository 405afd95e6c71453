"""ROLL's config vocabulary, key by key: what the fabric uses, what it accepts and ignores with one warning line
(training knobs and bookkeeping the fabric lacks: the run is the same algorithm without them), and what it refuses
(ignoring it would silently change what the user gets: another kind of pipeline, another model, other rewards).

The field lists are ROLL's dataclasses (roll/configs/*.py, roll/pipeline/rlvr/rlvr_config.py) plus keys ROLL's own
example configs carry that its loader (dacite, non-strict) drops. A key in none of these tables is a typo: refused
with the closest known key. The README's "ROLL configs" section is this module as a table.

To make the fabric implement a key listed here as ignored, read it where it belongs and delete its line here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from fabric.config.loader import ConfigError, did_you_mean, resolved


@dataclass(frozen=True)
class Refused:
    """Refused unless the value is one of `accepted` (the values that mean what the fabric does anyway)."""

    why: str
    accepted: tuple = (None,)

    def allows(self, value: Any) -> bool:
        if isinstance(value, dict) and value.get("type") == "no_filter":  # ROLL's RewardFilterConfig, switched off
            value = None
        if isinstance(value, dict | list) and not value:
            value = None
        return any(value is ok or (value == ok and type(value) is type(ok)) for ok in self.accepted)


OFF = (None, False, 0, 0.0, "")

# ---- top level -------------------------------------------------------------------------------------------------

# Read by the fabric (fabric.trainer.config and each section's reader); `pretrain` fills every role's model as in ROLL.
TOP_LEVEL_USED = {
    "exp_name", "seed", "output_dir", "max_steps", "save_steps", "rollout_batch_size", "num_return_sequences_in_group",
    "prompt_length", "response_length", "sequence_length", "ppo_epochs", "pretrain", "reward_pretrain",
    "max_grad_norm", "actor_train", "actor_infer", "reference", "rewards",
    "async_generation_ratio",  # -> async_training.max_staleness = ceil(ratio) (fabric/trainer/config.py)
}  # fmt: skip

# The trainer's algorithm keys (fabric/trainer/config.py and fabric/trainer decide about these, not this module).
TOP_LEVEL_TRAINER = {
    "adv_estimator", "whiten_advantages", "whiten_rewards", "norm_mean_type", "norm_std_type", "reward_clip",
    "advantage_clip", "value_clip", "dual_clip_loss", "pg_clip", "pg_clip_low", "pg_clip_high", "use_pg_clip_range",
    "kl_penalty", "target_kl", "init_kl_coef", "kl_horizon", "use_kl_loss", "kl_loss_coef", "add_token_level_kl",
    "loss_agg_mode", "lambd", "gamma", "difficulty_mask", "difficulty_low_threshold", "difficulty_high_threshold",
    "max_len_mask", "entropy_loss_coef", "error_max_len_clip", "difficulty_loss_weight", "length_loss_weight",
    "rl_loss_coef",
}  # fmt: skip

# Accepted; listed in one warning line.
TOP_LEVEL_IGNORED = {
    # bookkeeping, logging, tracking, profiling
    "logging_dir": "logs go to output_dir/logs", "logging_steps": "every step is logged",
    "track_with": "metrics go to output_dir/metrics.jsonl and TrainerService.WatchMetrics",
    "tracker_kwargs": "no tracker", "checkpoint_config": "checkpoints go to output_dir/checkpoints",
    "max_ckpt_to_keep": "", "save_logging_board_dir": "", "report_length_and_rewards": "", "profiler_timeline": "",
    "profiler_memory": "", "profiler_output_dir": "", "length_profiler_dir": "", "otlp_output_dir": "",
    "rollout_dump_dir": "", "base_dir": "", "local_rank": "", "rpc_timeout": "see `timeouts`",
    "system_envs": "set environment variables on each node", "num_gpus_per_node": "", "num_nodes": "",
    "model_download_type": "models are local directories", "transfer_backend": "weights go over gRPC / raw TCP",
    "model_update_buffer_size_mb": "see weight_sync.chunk_mib", "offload_nccl": "", "is_offload_states": "",
    "is_offload_optimizer_states_in_train_step": "",
    # validation
    "validation": "no validation pass", "eval_steps": "", "val_batch_size": "", "val_prompt_length": "",
    "val_sequence_length": "", "val_greedy": "", "val_n_sample": "",
    # scheduling (ROLL's generate scheduler; the fabric routes least-loaded over its rollout servers)
    "max_running_requests": "see actor_infer.infer_batch_size", "is_num_return_sequences_expand": "",
    "generate_opt_level": "", "max_additional_running_prompts": "", "router_args": "",
    "minibatch_data_iter_num": "",
    # training knobs the fabric's trainer does not have
    "l2": "", "use_reward_scaling": "", "use_reward_norm": "", "add_len_reward": "",
    "critic_warmup": "", "enable_reference": "the reference is used when a KL needs it",
    "enable_old_logprobs_recompute": "", "force_disable_old_logprobs_recompute": "", "train_infer_correction": "",
    "mask_type": "", "balance_length": "", "error_max_len_threshold": "",
    "postive_loss_coef": "", "positive_loss_coef": "",
    "use_topr_neg_loss_coef": "", "response_length_penalty_coef": "",
    "global_template": "prompts are used as the dataset writes them", "tag_to_template": "",
    # keys of older ROLL configs that ROLL's own loader drops
    "reward_normalization": "", "reward_norm": "", "reward_shift": "", "reward_scale": "",
    "reward_filter_mean_threshold": "",
    # Hydra `defaults:` fragments of ROLL's examples (DeepSpeed settings other roles interpolate)
    "deepspeed_zero": "", "deepspeed_zero2": "", "deepspeed_zero3": "", "deepspeed_zero3_cpuoffload": "",
    # a role the fabric does not run (only adv_estimator: gae would need it; the trainer refuses that)
    "critic": "no critic",
}  # fmt: skip

# Refused (unless at the value that means what the fabric does).
TOP_LEVEL_REFUSED = {
    "resume_from_checkpoint": Refused("resuming is not supported: remove it (or set false) to start fresh", OFF),
    "rollout_mock": Refused("mock rollouts are not supported: remove it"),
    "user_defined_rollout_loop_cls": Refused("custom rollout loops are not supported: remove it"),
    "dataset_filter": Refused("dataset filtering is not supported: filter the JSONL file instead"),
    "is_use_additional_prompts": Refused("dynamic sampling is not supported: set it to false", OFF),
    "use_additional_prompts": Refused("dynamic sampling is not supported: set it to false", OFF),
    "use_topr_loss": Refused("the TOPR loss is not supported: set it to false", OFF),
    "use_policy_loss_type": Refused("only the PPO policy loss is supported: remove it"),
    "importance_sampling": Refused("only token-level importance sampling is supported: set it to token",
                                   (None, "token")),
    "reward_model": Refused("a reward model goes in `rewards` (worker_cls: hf_reward_model)"),
    "reward": Refused("a reward model goes in `rewards` (worker_cls: hf_reward_model)"),
    "teacher": Refused("on-policy distillation is not supported: remove it"),
    "student_train": Refused("on-policy distillation is not supported: remove it"),
    "student_infer": Refused("on-policy distillation is not supported: remove it"),
    "is_pure_opd": Refused("on-policy distillation is not supported: set it to false", OFF),
    "use_opd": Refused("on-policy distillation is not supported: set it to false", OFF),
    "pure_opd_pipeline_type": Refused("on-policy distillation is not supported: remove it", (None, "rlvr")),
    "pg_variant": Refused("policy-gradient variants are not supported: remove it"),
    "lora_rank": Refused("LoRA training is not supported: remove the lora_* keys to train every weight"),
    "lora_alpha": Refused("LoRA training is not supported: remove the lora_* keys to train every weight"),
    "lora_target": Refused("LoRA training is not supported: remove the lora_* keys to train every weight"),
}  # fmt: skip

# ROLL's other pipelines: the keys of their config dataclasses (roll/pipeline/*/..._config.py) and of ROLL's example
# configs for them. Known keys, never called typos; any of them makes `fabric run` / `fabric train` refuse the config
# in one line naming the pipeline. A role reads only its own sections, so `fabric serve rollout` still serves such a
# config's actor_infer (agentic users want rollout servers too).
AGENTIC_KEYS = {
    "train_env_manager", "val_env_manager", "custom_envs", "env_manager_cls", "agent_config_common",
    "agent_runner_cls", "agent_system_template", "agent_template", "max_actions_per_traj", "max_tokens_per_step",
    "default_history_length", "render_save_dir", "step_reward_gamma", "step_reward_weight", "episode_reward_weight",
    "use_turn_scores", "enable_response_mask", "action_pattern", "action_sep", "math_agent_system_template",
    "math_agent_template", "parse_tool_call_parameter_to_dict", "partial_gpu_mode", "reward_system_config",
    "enable_think", "skip_mock_system_prompt", "batch_adjust_mode", "generate_redundancy_num", "model_name",
    # AgenticConfig's other fields
    "env_monitor", "dirty_data_mask", "open_feedback_turn", "use_token_reward", "ratio_type", "exp_mode",
    # ROLL's agentic example configs (environment templates and settings their env managers interpolate)
    "custom_env", "single_prompt_agent_template", "single_prompt_agent_system_template", "next_step_template",
    "pre_step_template", "all_response_pattern", "think_action_pattern", "frozen_format_penalty",
    "sokoban_format_penalty", "code_agent_system_template", "code_agent_template", "game_agent_system_template",
    "game_agent_template", "qa_agent_system_template", "qa_agent_template", "rg_agent_system_template",
    "rg_agent_template", "gem_code", "gem_games", "gem_math", "gem_qa", "gem_rg", "world_size",
}  # fmt: skip
OTHER_PIPELINE_KEYS = {
    "distillation": {
        "student_pretrain", "teacher_pretrain", "student", "question_key", "answer_key", "logits_topk",
        "distill_loss_weight", "kd_temperature", "teacher_temperature", "kd_objective", "adaptive_kl_alpha",
        "skew_lambda", "distill_on_prompt", "logits_transfer_backend",
    },
    "DPO": {"ipo", "beta", "label_smoothing", "chosen_key", "rejected_key"},
    "SFT": {"sft_train", "system_key", "prompt_key", "query_key", "response_key"},
}  # fmt: skip
PIPELINE_KEYS = {key: "agentic" for key in AGENTIC_KEYS} | {
    key: name for name, keys in OTHER_PIPELINE_KEYS.items() for key in keys
}
# The keys that best name each pipeline, reported first.
PIPELINE_MARKERS = ("train_env_manager", "custom_envs", "sft_train", "student_pretrain", "chosen_key")
AGENTIC_WHY = "agentic pipelines are not supported"  # the start of the agentic refusal (tests and callers match it)


def other_pipeline(key: str) -> ConfigError:
    """The one-line refusal of another ROLL pipeline's config by `fabric run` / `fabric train`."""
    name = PIPELINE_KEYS[key]
    return ConfigError(
        key,
        f"a key of ROLL's {name} pipeline: {name} pipelines are not supported by fabric run / train (the fabric trains "
        "RLVR: actor_infer generates, rewards score); `fabric serve rollout` serves this config's actor_infer",
    )


# ---- actor_infer (ROLL's WorkerConfig) ----------------------------------------------------------------------------

INFER_USED = {"model_args", "generating_args", "strategy_args", "device_mapping", "infer_batch_size"}
INFER_FABRIC = {"pretrain", "max_queue_length", "drain_grace_s", "admission_window_s"}
INFER_IGNORED = {
    "name", "world_size", "num_gpus_per_worker", "model_update_frequency", "backend_timeout", "system_envs",
    "max_concurrency", "offload_nccl", "data_args", "training_args", "topr_positive_weight", "topr_negative_weight",
    "use_dynamic_batching_in_train", "max_tokens_per_microbatch_in_train", "sequence_length_round_in_train",
    "use_dynamic_batching_in_infer", "max_tokens_per_microbatch_in_infer", "sequence_length_round_in_infer",
    "use_sequence_packing", "sequence_packing_args", "logits_in_fp32", "router_replay", "apply_loss_scale",
    "mtp_training_mode", "opd_kl_coef", "tag_included",
}  # fmt: skip
INFER_REFUSED = {
    "worker_cls": Refused("custom inference workers are not supported: remove it",
                          (None, "roll.pipeline.base_worker.InferWorker")),
    "pg_variant": Refused("policy-gradient variants are not supported: remove it"),
}  # fmt: skip

# model_args (ROLL's ModelArguments + LoraArguments): training and HF-loading settings mean nothing to vLLM.
MODEL_ARGS_USED = {"model_name_or_path", "dtype"}
MODEL_ARGS_QUIET = {
    "attn_implementation", "moe_aux_loss_coef", "disable_gradient_checkpointing",
    "gradient_checkpointing_use_reentrant",
    "device_map", "model_type", "num_labels", "freeze_module_prefix", "ulysses_size", "autocast_adapter_dtype",
    "lora_dropout", "additional_target", "flash_attn",
}  # fmt: skip
MODEL_ARGS_REFUSED = {
    "adapter_name_or_path": Refused("LoRA adapters are not supported: merge the adapter into the model"),
    "lora_rank": Refused("LoRA is not supported: remove the lora_* keys"),
    "lora_alpha": Refused("LoRA is not supported: remove the lora_* keys"),
    "lora_target": Refused("LoRA is not supported: remove the lora_* keys"),
    "model_config_kwargs": Refused("model config overrides are not supported: edit the model's config.json"),
}  # fmt: skip

# vLLM engine arguments the fabric cannot honour.
STRATEGY_CONFIG_REFUSED = {
    "distributed_executor_backend": Refused(
        "Ray executors are not supported: remove it (vLLM runs in the rollout server's process; start one server "
        "per node)", (None, "mp", "uni")),
}  # fmt: skip

# ---- rewards (ROLL's RewardConfig, a WorkerConfig) ------------------------------------------------------------------

REWARD_ROLL_IGNORED = {
    "name", "world_size", "num_gpus_per_worker", "model_update_frequency", "backend_timeout", "system_envs",
    "max_concurrency", "offload_nccl", "data_args", "training_args", "generating_args", "topr_positive_weight",
    "topr_negative_weight", "use_dynamic_batching_in_train", "max_tokens_per_microbatch_in_train",
    "sequence_length_round_in_train", "use_dynamic_batching_in_infer", "max_tokens_per_microbatch_in_infer",
    "sequence_length_round_in_infer", "use_sequence_packing", "sequence_packing_args", "logits_in_fp32",
    "router_replay", "apply_loss_scale", "mtp_training_mode", "opd_kl_coef", "code_url", "use_local",
    "judge_prompt", "judge_model_type", "judge_model_name", "judge_api_url", "judge_api_key", "format_pattern",
    "reward_manager_config",
}  # fmt: skip
REWARD_REFUSED = {
    "query_filter_config": Refused("reward filtering is not supported: remove it (or type: no_filter)"),
    "response_filter_config": Refused("reward filtering is not supported: remove it (or type: no_filter)"),
    "pg_variant": Refused("policy-gradient variants are not supported: remove it"),
}  # fmt: skip

# ROLL's reward worker classes -> the fabric's scorer (short name), or None: refused with the reason.
ROLL_REWARD_WORKERS = {
    "MathRuleRewardWorker": "math_rule",
    "CrossThinkQARuleRewardWorker": "crossthinkqa_rule",
    "CodeSandboxRewardWorker": "code_sandbox",
    "GeneralRuleRewardWorker": "ifeval",
    "GeneralValRuleRewardWorker": None,
    "LLMJudgeRewardWorker": "llm_judge",
    "DetectionRewardWorker": None,
    "VideoR1RewardWorker": None,
    "MultipleChoiceBoxedRuleRewardWorker": None,
    "RemoteRewardSystemWorker": None,
}


def sort_keys(
    section: Mapping,
    where: str,
    known: Iterable[str],
    ignored: Iterable[str] = (),
    refused: Mapping[str, Refused] | None = None,
    what: str = "key",
) -> list[str]:
    """Sorts a section's keys: returns the dotted names of the ignored ones that are set (not null); raises a
    ConfigError for a refused one (naming why) or an unknown one (with the closest known key)."""
    refused = refused or {}
    known, ignored = set(known), set(ignored)
    out = []
    for key in section:
        name = str(key)
        path = f"{where}.{name}" if where else name
        value = section[key]
        if name in refused:
            if not refused[name].allows(value):
                raise ConfigError(path, refused[name].why)
        elif name in ignored:
            if value is not None:
                out.append(path)
        elif name not in known:
            hint = did_you_mean(name, known | ignored | set(refused))
            raise ConfigError(path, f"unknown {what}; {hint or 'see the README, section ROLL configs'}")
    return out


def top_level(cfg: DictConfig, known: set[str], role: str = "all") -> tuple[list[str], list[ConfigError]]:
    """The top-level keys sorted: (ignored keys that are set, problems). `known`: the keys the trainer's config
    accepts (fabric.trainer.config.TOP_LEVEL_KEYS).
    Another ROLL pipeline's keys and the refused keys concern the trainer: checked for the train and all roles only;
    a typo is one for every role."""
    errors: list[ConfigError] = []
    ignored: list[str] = []
    keys = [str(k) for k in cfg.keys()]
    raw = cast(dict, OmegaConf.to_container(cfg, resolve=False))
    trains = role in ("train", "all")
    markers = PIPELINE_MARKERS
    pipeline = sorted((k for k in keys if k in PIPELINE_KEYS), key=lambda k: markers.index(k) if k in markers else 99)
    if pipeline and trains:
        errors.append(other_pipeline(pipeline[0]))
    everything = known | TOP_LEVEL_USED | TOP_LEVEL_TRAINER
    for key in keys:
        if key in PIPELINE_KEYS:
            continue
        try:
            if key in TOP_LEVEL_REFUSED:
                if not trains:
                    continue
                rule = TOP_LEVEL_REFUSED[key]
                if not rule.allows(resolved(cfg, key)):
                    errors.append(ConfigError(key, rule.why))
            elif key in TOP_LEVEL_IGNORED:
                if raw[key] is not None:
                    ignored.append(key)
            elif key not in everything:
                pool = everything | set(TOP_LEVEL_IGNORED) | set(TOP_LEVEL_REFUSED)
                hint = did_you_mean(key, pool)
                errors.append(
                    ConfigError(
                        key,
                        f"unknown key; {hint or 'not a ROLL pipeline key nor a fabric one (README: ROLL configs)'}",
                    )
                )
        except ConfigError as exc:
            errors.append(exc)
    return ignored, errors
