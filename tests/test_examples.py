"""The shipped configs load through every process's config reader: the embedded default and ROLL's 7B example."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.config import load_config
from fabric.reward.config import load_reward_configs
from fabric.rollout.config import load_rollout_config
from fabric.trainer.config import pipeline_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_configs_load_in_every_process(name):
    cfg = load_config(EXAMPLES / name)
    pc = pipeline_config(cfg)
    rollout = load_rollout_config(cfg, "actor_infer")
    rewards = load_reward_configs(cfg, "rewards")
    assert pc.group_size == pc.sampling["num_return_sequences"]
    assert pc.sampling["max_new_tokens"] <= pc.response_length
    assert rollout.model and rewards


def test_roll_actor_infer_block_loads_as_written():
    cfg = load_config(EXAMPLES / "roll_qwen2.5-7b_rlvr.yaml")
    rollout = load_rollout_config(cfg, "actor_infer")
    assert rollout.device_mapping == list(range(12))
    assert rollout.infer_batch_size == 1
    assert rollout.generating_args["max_new_tokens"] == 4096 and rollout.generating_args["top_k"] == 100
    rewards = load_reward_configs(cfg, "rewards")
    assert rewards["math_rule"].target.endswith("MathRuleScorer")  # ROLL's worker class maps to math_rule


def test_overrides_apply_as_a_dotlist():
    cfg = load_config(EXAMPLES / "default.yaml", ["max_steps=3", "output_dir=/tmp/x", "response_length=10"])
    pc = pipeline_config(cfg)
    assert (pc.max_steps, pc.output_dir, pc.sampling["max_new_tokens"]) == (3, "/tmp/x", 10)  # ${} follows


def test_multi_domain_rewards_each_take_one_domain_of_its_dataset():
    from fabric.tasks.multi_domain import examples

    rewards = load_reward_configs(load_config(EXAMPLES / "multi_domain.yaml"), "rewards")
    assert {name: r.tag_included for name, r in rewards.items()} == {
        "math": ["math"], "ifeval": ["ifeval"], "code": ["KodCode"], "judge": ["RLVR"]
    }  # fmt: skip
    assert {row["tag"] for row in examples()} == {"math", "ifeval", "KodCode", "RLVR"}
