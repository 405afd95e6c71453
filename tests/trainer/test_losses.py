"""The loss functions against small hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from fabric.trainer import losses


def test_masked_mean_all_and_per_row():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert losses.masked_mean(values, mask).item() == pytest.approx((1 + 2 + 6) / 3)
    assert losses.masked_mean(values, mask, dim=-1).tolist() == pytest.approx([1.5, 6.0])
    assert losses.masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_logprobs_from_logits_aligns_to_the_predicted_token():
    # vocab 2; logits at step t predict token t+1
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]])
    ids = torch.tensor([[1, 1, 0]])
    got = losses.logprobs_from_logits(logits, ids)
    assert got.tolist()[0] == pytest.approx([0.0, math.log(0.5), math.log(3 / 4)])
    hot = losses.logprobs_from_logits(logits, ids, temperature=0.5)  # logits doubled: odds 9 to 1 at step 1
    assert hot[0, 2].item() == pytest.approx(math.log(9 / 10))


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    adv = losses.grpo_advantages(rewards, group_size=3, eps=0.0)
    # group 1: mean 1/3, unbiased std sqrt(1/3); group 2: mean 5/3, std sqrt(1/3)
    std = math.sqrt(1 / 3)
    expected = [2 / 3 / std, -1 / 3 / std, -1 / 3 / std, -2 / 3 / std, 1 / 3 / std, 1 / 3 / std]
    assert adv.tolist() == pytest.approx(expected)
    assert losses.grpo_advantages(rewards, 3, normalize_std=False).tolist() == pytest.approx(
        [2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]
    )
    assert losses.grpo_advantages(torch.tensor([1.0, 1.0]), 2).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        losses.grpo_advantages(rewards, 4)


def test_kl_estimators_by_hand():
    logprobs = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])  # log ratio log p - log p_ref = log 2
    assert losses.kl_penalty(logprobs, ref, "k1").item() == pytest.approx(math.log(2))
    assert losses.kl_penalty(logprobs, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert losses.kl_penalty(logprobs, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    assert losses.kl_penalty(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="use one of kl, abs, mse, k3"):
        losses.kl_penalty(logprobs, ref, "k4")


def test_policy_loss_clipping_by_hand():
    # ratios exp(log r): 1.5 (A=+1: clipped to 1.2), 0.5 (A=+1: unclipped 0.5), 0.5 (A=-1: clipped to 0.8),
    # and a masked-out token that must not count.
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5, 9.0]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = losses.policy_loss(new, old, advantages, mask, pg_clip=0.2)
    # per token: max(-1.5, -1.2) = -1.2; max(-0.5, -0.8) = -0.5; max(0.5, 0.8) = 0.8
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8) / 3)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 3)
    assert metrics["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 0.5) / 3)
    higher, _ = losses.policy_loss(new, old, advantages, mask, pg_clip=0.2, pg_clip_high=0.6)
    assert higher.item() == pytest.approx((-1.5 - 0.5 + 0.8) / 3)  # 1.5 is inside [0.8, 1.6]


def test_policy_loss_gradient_only_through_unclipped_tokens():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    loss, _ = losses.policy_loss(new, old, torch.tensor([1.0]), torch.ones(1, 2), pg_clip=0.2)
    loss.backward()
    # token 0 clipped: no gradient; token 1: d(-A r / 2)/d log r = -r / 2
    assert new.grad.tolist()[0] == pytest.approx([0.0, -1.1 / 2])


def test_policy_loss_with_kl_and_sequence_aggregation():
    old = torch.zeros(2, 3)
    new = torch.zeros(2, 3)
    ref = torch.log(torch.tensor([[0.5, 0.5, 1.0], [1.0, 1.0, 1.0]]))  # k3 with r = p_ref/p: 0.5 - 1 - log 0.5
    advantages = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    k3 = 0.5 - 1 - math.log(0.5)
    loss, metrics = losses.policy_loss(new, old, advantages, mask, ref_logprobs=ref, kl_coef=0.1)
    pg = (2 * -2.0 + 3 * 1.0) / 5
    assert metrics["pg_loss"].item() == pytest.approx(pg)
    assert metrics["kl"].item() == pytest.approx(2 * k3 / 5)
    assert loss.item() == pytest.approx(pg + 0.1 * 2 * k3 / 5)
    seq_loss, seq_metrics = losses.policy_loss(
        new, old, advantages, mask, ref_logprobs=ref, kl_coef=0.1, loss_agg="seq-mean-token-mean"
    )
    assert seq_metrics["pg_loss"].item() == pytest.approx((-2.0 + 1.0) / 2)
    assert seq_metrics["kl"].item() == pytest.approx((k3 + 0.0) / 2)
    with pytest.raises(ValueError, match="ref_logprobs is None"):
        losses.policy_loss(new, old, advantages, mask, kl_coef=0.1)


def test_sft_loss_and_right_padding_check():
    logprobs = torch.tensor([[0.0, -1.0, -3.0], [0.0, -2.0, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    assert losses.sft_loss(logprobs, mask).item() == pytest.approx(2.0)
    assert losses.sft_loss(logprobs, mask, "seq-mean-token-mean").item() == pytest.approx((2.0 + 2.0) / 2)
    losses.check_right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="not right-padded"):
        losses.check_right_padded(torch.tensor([[0, 1, 1]]))
