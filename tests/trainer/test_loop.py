"""The Trainer's step without servers or a model (fakes for the pools and the policy): empty responses never beat a
wrong answer, stale samples are left out of the loss and of their group's statistics, the samples split into ROLL's
mini-batches, every request carries the sampling settings the trainer's logprobs assume, and the config's KL keys
reach the loss as ROLL routes them."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from fabric.config import load_config
from fabric.config.sampling import sampling_settings
from fabric.trainer.algorithm_config import AlgorithmConfig
from fabric.trainer.config import PipelineConfig, pipeline_config
from fabric.trainer.loop import Trainer
from fabric.trainer.rollout_stream import Sample
from fabric.v1 import reward_pb2, rollout_pb2
from tests.test_examples import EXAMPLES


class FakeRewards:
    """Scores "right" 1.0 and anything else -1.0 (a reward that can be negative), or as `rule` says: (item) ->
    (score, correct or None). Answers real ScoreResponses."""

    def __init__(self, rule=None):
        self.items = []
        self.rule = rule or (lambda item: (1.0, 1.0) if item["response"] == "right" else (-1.0, 0.0))

    async def score(self, items):
        self.items += items
        answers = []
        for item in items:
            score, correct = self.rule(item)
            answers.append(reward_pb2.ScoreResponse(request_id=item["request_id"], score=score, correct=correct))
        return answers


class FakePolicy:
    def __init__(self):
        self.batches = []

    def logprobs(self, batch):
        return torch.zeros(batch.input_ids.shape)

    def train_step(self, batch):
        self.batches.append(batch)
        return {"loss": 0.0, "grad_norm": 1.0, "lr": 1e-3, "clip_frac": 0.0}


def sample(prompt_index: int, text: str, version: int = 1, tokens=(5, 6)) -> Sample:
    response = rollout_pb2.GenerateResponse(
        text=text,
        token_ids=list(tokens) if text else [],
        logprobs=[0.0] * (len(tokens) if text else 0),
        prompt_token_ids=[1, 2],
        weight_version=version,
        finish_reason=rollout_pb2.FINISH_REASON_STOP,
    )
    return Sample(prompt_index, response)


def make_trainer(tmp_path, rewards=None, dataset=None, group_size=4, **algorithm) -> Trainer:
    pc = PipelineConfig(output_dir=str(tmp_path), group_size=group_size, rollout_batch_size=2)
    pc.rewards = rewards or {"rule": {"weight": 1.0, "tags": []}}
    pc.algorithm = AlgorithmConfig(**algorithm)
    dataset = dataset or [{"prompt": "p0", "ground_truth": "1"}, {"prompt": "p1", "ground_truth": "2"}]
    policy = FakePolicy()
    trainer = Trainer(pc, policy, FakePolicy(), SimpleNamespace(pad_token_id=0), dataset)
    trainer.rewards = FakeRewards()
    trainer.version = 1
    return trainer


def test_an_empty_response_never_scores_above_a_wrong_one(tmp_path):
    trainer = make_trainer(tmp_path)
    samples = [sample(0, "right"), sample(0, "wrong"), sample(0, ""), sample(0, "  ")]
    asyncio.run(trainer.score(samples, step=1))
    assert [s.reward for s in samples] == [1.0, -1.0, -1.0, -1.0]
    assert [item["response"] for item in trainer.rewards.items] == ["right", "wrong"]  # empty ones never sent


def test_an_empty_response_never_scores_above_a_wrong_one_with_a_negative_weight(tmp_path):
    """{r: 1.0, pen: -0.5}: a wrong answer with a penalty score of 0.8 totals -0.4; an empty one must not total 0."""
    rewards = {"r": {"weight": 1.0, "tags": []}, "pen": {"weight": -0.5, "tags": []}}
    trainer = make_trainer(tmp_path, rewards)
    trainer.rewards = FakeRewards(lambda item: (0.8, None) if item["reward_name"] == "pen" else (0.0, 0.0))
    samples = [sample(0, "wrong"), sample(0, "")]
    asyncio.run(trainer.score(samples, step=1))
    assert [s.reward for s in samples] == pytest.approx([-0.4, -0.4])


def two_domains(tmp_path, rule, **algorithm) -> tuple[Trainer, list[Sample]]:
    """Prompt 0 is math, prompt 1 code; each reward names its tag, so each is its own domain."""
    rewards = {"math": {"weight": 1.0, "tags": ["math"]}, "code": {"weight": 1.0, "tags": ["code"]}}
    dataset = [{"prompt": "p0", "ground_truth": "1", "tag": t} for t in ("math", "code")]
    trainer = make_trainer(tmp_path, rewards, dataset, per_device_train_batch_size=8, **algorithm)
    trainer.rewards = FakeRewards(rule)
    samples = [sample(0, t) for t in ("1", "0", "1", "0")] + [sample(1, t) for t in ("3", "5", "3", "5")]
    asyncio.run(trainer.score(samples, step=1))
    return trainer, samples


def test_advantages_are_whitened_per_domain_and_each_domains_reward_is_reported(tmp_path):
    """Issue 23's example through the trainer: reinforce + whiten_advantages, math [1, 0, 1, 0] and code
    [3, 5, 3, 5] (2 tokens each): the right math answers get a positive advantage (pooled they got a negative one)."""
    rule = lambda item: (float(item["response"]), None)  # noqa: E731
    trainer, samples = two_domains(tmp_path, rule, adv_estimator="reinforce", whiten_advantages=True)
    assert [s.domain for s in samples] == ["math"] * 4 + ["code"] * 4
    assert {item["reward_name"] for item in trainer.rewards.items[:4]} == {"math"}
    metrics = trainer.train(samples)
    adv = trainer.policy.batches[0].advantages[:, 2]  # the first response token
    s = (8 * 0.25 / 7 + 1e-8) ** 0.5  # 8 tokens per domain, half one value half the other: var 2/7 (x 4 for code)
    assert adv.tolist() == pytest.approx([0.5 / s, -0.5 / s] * 2 + [-0.5 / s, 0.5 / s] * 2, rel=1e-5)
    assert metrics["extra"]["reward/math"] == 0.5 and metrics["extra"]["reward/code"] == 4.0
    assert metrics["extra"]["math/samples_used"] == 4.0
    # each domain's reward reaches WatchMetrics (the live table), the summary table and the plot
    from fabric.trainer import report

    row = {"step": 1, "reward_mean": 2.25, "extra": dict(report.to_proto(metrics).extra)}
    assert sorted(report.domains([row])) == ["code", "math"]
    assert report.domain_cell(row) == "code 4.00 math 0.50"
    assert report.write_plot([row, {**row, "step": 2}], tmp_path / "metrics.png").stat().st_size > 0


def test_a_samples_domain_is_the_reward_whose_tag_included_names_its_tag():
    pc = PipelineConfig()
    pc.rewards = {"math": {"weight": 1.0, "tags": ["math", "gsm"]}, "format": {"weight": 0.5, "tags": []},
                  "gsm_strict": {"weight": 1.0, "tags": ["gsm"]}}  # fmt: skip
    assert pc.domain_of("math") == "math" and pc.rewards_for("math") == ["math", "format"]
    assert pc.domain_of("gsm") == "gsm_strict"  # named twice: the last, as ROLL's tag_2_domain dict
    assert pc.domain_of("code") == "format" and pc.rewards_for("code") == ["format"]  # named by none
    del pc.rewards["format"]
    assert pc.domain_of("code") == "code" and pc.rewards_for("code") == []


def test_the_difficulty_mask_uses_the_reward_workers_correctness(tmp_path):
    """+-1 with a -0.1 penalty, thresholds (0.1, 0.95): math 2 of 4 right (rewards 0.9, -1.1: mean -0.1) is kept,
    code 4 of 4 right (0.9 each) is dropped, as ROLL does; on the reward it would be the other way round."""
    rule = lambda item: (0.9, 1.0) if item["response"] in ("1", "3", "5") else (-1.1, 0.0)  # noqa: E731
    trainer, samples = two_domains(tmp_path, rule, difficulty_mask=True, difficulty_low_threshold=0.1,
                                   difficulty_high_threshold=0.95)  # fmt: skip
    assert [s.correct for s in samples] == [1.0, 0.0, 1.0, 0.0] + [1.0] * 4
    trainer.train(samples)
    mask = trainer.policy.batches[0].response_mask
    assert mask.sum(1).tolist() == [2.0] * 4 + [0.0] * 4


def test_stale_samples_leave_the_loss_and_their_groups_statistics(tmp_path):
    trainer = make_trainer(tmp_path, per_device_train_batch_size=8)
    samples = [sample(0, "a"), sample(0, "b"), sample(0, "c"), sample(0, "d", version=0)]
    samples += [sample(1, "e"), sample(1, "f"), sample(1, "g"), sample(1, "h")]
    for s, reward in zip(samples, [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], strict=True):
        s.reward = reward
    metrics = trainer.train(samples)
    (batch,) = trainer.policy.batches
    assert batch.response_mask[3].sum() == 0 and metrics["stale_samples"] == 1
    adv = batch.advantages[:, 2]  # the first response token
    std = (1 / 3) ** 0.5  # of 1, 0, 0 (the stale 1 left out)
    assert adv[:3].tolist() == pytest.approx([2 / 3 / std, -1 / 3 / std, -1 / 3 / std], rel=1e-5)
    assert adv[3:].abs().sum() == 0  # the stale sample, and the group of equal rewards: exactly 0


def test_samples_split_into_mini_batches_per_epoch(tmp_path):
    trainer = make_trainer(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, ppo_epochs=3)
    samples = [sample(k // 4, "x") for k in range(8)]
    for k, s in enumerate(samples):
        s.reward = float(k % 2)
    metrics = trainer.train(samples)
    assert [len(b) for b in trainer.policy.batches] == [2] * 12  # 8 / (1 x 2) mini-batches x 3 epochs
    assert metrics["extra"]["optimizer_steps"] == 12.0
    seen = torch.cat([b.input_ids[:, 0] for b in trainer.policy.batches[:4]])
    assert len(seen) == 8  # an epoch covers every sample once


def test_seq_mean_token_sum_norm_divides_by_rolls_padded_width():
    from fabric.trainer.server import loss_config

    config = load_config(EXAMPLES / "roll_qwen2.5-7b_rlvr.yaml", ["loss_agg_mode=seq-mean-token-sum-norm"])
    # ROLL's 7B example: sequence_length - 1 = 2048 + 4096 - 1, not response_length 4096 (a loss 1.5x ROLL's)
    assert loss_config(pipeline_config(config)).norm_length == 6143


def test_every_request_carries_the_sampling_settings_the_trainer_assumes():
    assert sampling_settings({"max_new_tokens": 8}) == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "max_new_tokens": 8,
    }
    assert sampling_settings({"temperature": 0.7})["temperature"] == 0.7


@pytest.mark.parametrize(
    "overrides, kl_loss, in_reward",
    [
        ([], 0.0, False),  # ROLL's default init_kl_coef 0.2 is the in-reward KL's, off without add_token_level_kl
        (["init_kl_coef=0.2"], 0.0, False),
        (["use_kl_loss=true", "kl_loss_coef=0.001"], 0.001, False),
        (["kl_loss_coef=0.001"], 0.0, False),  # without use_kl_loss: no KL loss, as in ROLL
        (["add_token_level_kl=true", "init_kl_coef=0.05"], 0.0, True),
    ],
)
def test_kl_coefficients_are_routed_as_roll_routes_them(overrides, kl_loss, in_reward):
    from fabric.trainer.server import loss_config

    pc = pipeline_config(load_config(EXAMPLES / "default.yaml", overrides))
    assert loss_config(pc).kl_coef == kl_loss
    assert pc.algorithm.add_token_level_kl == in_reward
    if in_reward:
        assert pc.algorithm.init_kl_coef == 0.05


def test_the_shipped_configs_algorithm_keys():
    from fabric.trainer.server import loss_config, optim_config

    demo = pipeline_config(load_config(EXAMPLES / "default.yaml"))
    assert demo.algorithm.mini_batch_size == demo.rollout_batch_size * demo.group_size  # one step per RL step
    assert optim_config(demo).micro_batch_size == 64 and loss_config(demo).loss_agg_mode == "token-mean"
    roll = pipeline_config(load_config(EXAMPLES / "roll_qwen2.5-7b_rlvr.yaml"))
    a = roll.algorithm
    assert (a.adv_estimator, a.norm_mean_type, a.whiten_advantages, a.advantage_clip) == ("reinforce", None, True, 2.0)
    assert loss_config(roll).dual_clip == pytest.approx(1.4) and roll.dtype == "bfloat16"
    assert a.lr_warmup_steps(a.optimizer_steps(512, roll.max_steps)) == 20
