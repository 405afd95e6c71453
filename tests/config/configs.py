"""ROLL-shaped configs written for these tests (tests/config/roll/), and helpers to load them."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
MEGATRON = HERE / "roll" / "rlvr_megatron" / "rlvr_config.yaml"
# ROLL's shared fragments, which its example configs load as `../config/...`: outside the config's folder, so
# allowed explicitly (--config-search-path).
ROLL_CONFIG = HERE / "roll" / "config"
SEARCH = ["--config-search-path", str(ROLL_CONFIG)]


def load_roll(*args, **kwargs):
    """load_config with ROLL's shared fragments allowed."""
    from fabric.config import load_config

    return load_config(*args, search_paths=[ROLL_CONFIG], **kwargs)


# A second file in another ROLL shape: fsdp2 trainer, a VL model's actor_infer, a reward mix.
FSDP2_VL = """
exp_name: vl-fsdp2
pretrain: {model}
rollout_batch_size: 4
prompt_length: 64
sequence_length: 96            # ROLL's newer form: response_length = sequence_length - prompt_length
num_return_sequences_in_group: 2
actor_train:
  model_args: {{dtype: bf16}}
  data_args: {{file_name: [data/vl.jsonl], image_max_pixels: 1003520}}
  strategy_args: {{strategy_name: fsdp2_train, strategy_config: {{fsdp_size: 1}}}}
  device_mapping: list(range(0,1))
actor_infer:
  model_args:
    flash_attn: fa2
    attn_implementation: fa2
    dtype: fp32
  generating_args: {{max_new_tokens: 32, top_p: 0.99, temperature: 0.99, num_return_sequences: 2,
                     stop_strings: ["</answer>"], include_stop_str_in_output: true}}
  strategy_args:
    strategy_name: vllm
    strategy_config: {{gpu_memory_utilization: 0.3, block_size: 32, max_model_len: 256, enforce_eager: true,
                       enable_prefix_caching: false}}
  num_gpus_per_worker: 1
  device_mapping: list([4,5,12,13])
  infer_batch_size: 4
rewards:
  math:
    worker_cls: roll.pipeline.rlvr.rewards.math_rule_reward_worker.MathRuleRewardWorker
    model_args: {{model_name_or_path: "${{pretrain}}"}}
    tag_included: [mm_math]
    world_size: 8
    infer_batch_size: 1
"""

# An agentic config: Hydra defaults bringing in environment definitions, env managers, `${now:...}`.
AGENTIC = """
defaults:
  - ../config/envs@_here_
exp_name: agentic
model_name: ${exp_name}-${now:%Y%m%d_%H%M%S}
pretrain: /models/Qwen2.5-0.5B-Instruct
rollout_batch_size: 8
sequence_length: 512
actor_infer:
  generating_args: {max_new_tokens: 64, num_return_sequences: 1}
  strategy_args: {strategy_name: vllm, strategy_config: {gpu_memory_utilization: 0.3}}
  device_mapping: list(range(0,1))
train_env_manager:
  max_env_num_per_worker: 16
  tags: [FrozenLake]
val_env_manager:
  tags: [FrozenLake]
"""
ENVS_FRAGMENT = """
custom_envs:
  FrozenLake:
    env_type: frozen_lake
    max_steps: 10
"""


def write(tmp_path: Path, name: str, text: str, **fmt) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.format(**fmt) if fmt else text)
    return path


def dataset(tmp_path: Path) -> str:
    path = tmp_path / "math.jsonl"
    path.write_text('{"prompt": "1+1=", "ground_truth": "2", "tag": "deepmath_103k"}\n')
    return str(path)
