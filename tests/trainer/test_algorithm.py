"""ROLL's algorithm against hand-computed values: reward normalization, advantages (grpo, reinforce, masks, clips,
whitening, the in-reward KL), loss aggregations, dual clip, the KL estimators, the LR schedule; in fp32 and bf16.
Pure torch (no model): fast."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from fabric.trainer import losses
from fabric.trainer.algorithm import KLController, compute_advantages, lr_scheduler
from fabric.trainer.algorithm_config import AlgorithmConfig, algorithm_config

DTYPES = [torch.float32, torch.bfloat16]


def tol(dtype):
    return dict(rel=1e-2, abs=1e-2) if dtype == torch.bfloat16 else dict(rel=1e-6, abs=1e-6)


# ---- reward normalization -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [8, 12])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(group_size):
    rewards = torch.full((2 * group_size,), 0.7)
    rewards[group_size:] = torch.linspace(0, 1, group_size)  # a second group with spread, to see it is not all 0
    adv = losses.grpo_advantages(rewards, group_size)
    assert torch.equal(adv[:group_size], torch.zeros(group_size))  # float32 rounding would give 7e-3 .. 0.1
    assert adv[group_size:].abs().min() > 0
    # the same for batch normalization and for scaling without centering
    assert torch.equal(losses.reward_norm(torch.full((6,), 0.7), 3, "batch", "batch"), torch.zeros(6))
    assert losses.reward_norm(torch.full((3,), 0.7), 3, None, "group").tolist() == pytest.approx([0.7] * 3)


def test_stale_samples_do_not_shape_their_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 5.0])
    valid = torch.tensor([True, True, True, False])
    adv = losses.grpo_advantages(rewards, 4, eps=0.0, valid=valid)
    std = math.sqrt(1 / 3)  # of 1, 0, 0: mean 1/3
    assert adv.tolist() == pytest.approx([2 / 3 / std, -1 / 3 / std, -1 / 3 / std, 0.0])


def test_batch_normalization_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    got = losses.reward_norm(rewards, 2, "batch", "batch", eps=0.0)
    mean, std = 3.0, math.sqrt((4 + 1 + 0 + 9) / 3)
    assert got.tolist() == pytest.approx([(r - mean) / std for r in rewards.tolist()])
    assert losses.reward_norm(rewards, 2, "group", None).tolist() == [-0.5, 0.5, -1.5, 1.5]


# ---- KL -----------------------------------------------------------------------------------------------------------


def test_kl_estimators_by_roll_names_and_k3_clamp():
    logprobs, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert losses.kl_penalty(logprobs, ref, "kl").item() == pytest.approx(math.log(2))
    assert losses.kl_penalty(ref, logprobs, "abs").item() == pytest.approx(math.log(2))
    assert losses.kl_penalty(logprobs, ref, "mse").item() == pytest.approx(0.5 * math.log(2) ** 2)
    far = losses.kl_penalty(torch.tensor([0.0]), torch.tensor([20.0]), "k3")  # e^20 - 21 unclamped
    assert far.item() == 10.0


def test_adaptive_kl_coefficient_by_hand():
    ctrl = KLController(0.2, target_kl=0.1, horizon=100)
    ctrl.update(current=0.15, n_steps=10)  # error clip(0.15 / 0.1 - 1, +-0.2) = 0.2: x (1 + 0.2 x 10 / 100)
    assert ctrl.value == pytest.approx(0.2 * 1.02)
    fixed = KLController(0.2)
    fixed.update(current=5.0, n_steps=10)
    assert fixed.value == 0.2


# ---- loss aggregation and the policy loss -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_loss_aggregation_mode_by_hand(dtype):
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=dtype)
    mask = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0]])  # the third row has no token: not a sequence
    expected = {
        "token-mean": (1 + 5 + 6) / 3,
        "seq-mean-token-mean": (1 + (5 + 6) / 2) / 2,
        "seq-mean-token-sum": (1 + 11) / 2,
        "seq-mean-token-sum-norm": 12 / 4,
    }
    for mode, value in expected.items():
        got = losses.aggregate(values, mask, mode, norm_length=4)
        assert got.item() == pytest.approx(value, **tol(dtype)), mode
        # micro-batches aggregated with the whole batch's counts add up to the whole
        counts = dict(num_tokens=mask.sum(), num_seqs=2, norm_length=4)
        parts = [losses.aggregate(values[i : i + 1], mask[i : i + 1], mode, **counts) for i in range(3)]
        assert sum(p.item() for p in parts) == pytest.approx(value, **tol(dtype)), mode
    with pytest.raises(ValueError, match="unknown"):
        losses.aggregate(values, mask, "seq-sum")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dual_clip_bounds_negative_advantages_by_hand(dtype):
    old = torch.zeros(1, 3, dtype=dtype)
    new = torch.log(torch.tensor([[5.0, 5.0, 0.5]])).to(dtype)
    advantages = torch.tensor([[-1.0, 1.0, -1.0]], dtype=dtype)
    mask = torch.ones(1, 3)
    plain, _ = losses.policy_loss(new, old, advantages, mask, pg_clip=0.2)
    # -min(rA, clip(r)A): A=-1, r=5: 5; A=+1, r=5: -1.2; A=-1, r=0.5: -min(-0.5, -0.8) = 0.8
    assert plain.item() == pytest.approx((5 - 1.2 + 0.8) / 3, **tol(dtype))
    dual, _ = losses.policy_loss(new, old, advantages, mask, pg_clip=0.2, dual_clip=1.4)
    assert dual.item() == pytest.approx((1.4 - 1.2 + 0.8) / 3, **tol(dtype))  # 5 bounded by 1.4 x |A|


@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_with_kl_loss_by_hand(dtype):
    old = new = torch.zeros(1, 2, dtype=dtype)
    ref = torch.log(torch.tensor([[0.5, 1.0]])).to(dtype)
    k3 = 0.5 - 1 - math.log(0.5)
    loss, metrics = losses.policy_loss(
        new, old, torch.tensor([2.0], dtype=dtype), torch.ones(1, 2), ref_logprobs=ref, kl_coef=0.01
    )
    assert metrics["kl"].item() == pytest.approx(k3 / 2, **tol(dtype))
    assert loss.item() == pytest.approx(-2.0 + 0.01 * k3 / 2, **tol(dtype))


# ---- advantages ---------------------------------------------------------------------------------------------------


def masks(*lengths: int, width: int = 5, prompt: int = 1) -> torch.Tensor:
    mask = torch.zeros(len(lengths), width)
    for row, n in enumerate(lengths):
        mask[row, prompt : prompt + n] = 1
    return mask


def test_grpo_gives_every_response_token_its_group_normalized_reward():
    mask = masks(2, 2, 3, 1)
    adv = compute_advantages(AlgorithmConfig(), torch.tensor([1.0, 0.0, 0.0, 1.0]), mask, group_size=2)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    expected = torch.tensor([[0, a, a, 0, 0], [0, -a, -a, 0, 0], [0, -a, -a, -a, 0], [0, a, 0, 0, 0]])
    torch.testing.assert_close(adv.advantages, expected)
    assert torch.equal(adv.mask, mask)


def test_reinforce_with_whitening_and_advantage_clip_by_hand():
    cfg = AlgorithmConfig(adv_estimator="reinforce", whiten_advantages=True, advantage_clip=1.0)
    adv = compute_advantages(cfg, torch.tensor([1.0, 0.0]), masks(2, 1), group_size=2)
    # raw rewards at every token: 1, 1 | 0; whitened over the 3 tokens: mean 2/3, unbiased var 1/3
    s = math.sqrt(1 / 3 + 1e-8)
    assert adv.advantages[0, 1:3].tolist() == pytest.approx([(1 / 3) / s] * 2)
    assert adv.advantages[1, 1].item() == -1.0  # -(2/3)/s = -1.15, clipped
    assert adv.metrics["advantage_clip_frac"] == pytest.approx(1 / 3)


def test_reward_clip_and_gamma_by_hand():
    cfg = AlgorithmConfig(adv_estimator="reinforce", reward_clip=10.0, gamma=0.5)
    adv = compute_advantages(cfg, torch.tensor([5.0, -20.0]), masks(2, 2), group_size=1)
    assert adv.advantages[0, 1:3].tolist() == pytest.approx([2.5, 5.0])  # reward-to-go: 0.5 x 5, 5
    assert adv.advantages[1, 1:3].tolist() == pytest.approx([-5.0, -10.0])  # clipped to -10 first


def test_token_level_kl_enters_the_reward_only_with_add_token_level_kl():
    mask = masks(2)
    old = torch.zeros(1, 5)
    ref = torch.tensor([[0.0, -0.2, -0.4, 0.0, 0.0]])  # k1 = old - ref: 0.2, 0.4
    cfg = AlgorithmConfig(adv_estimator="reinforce", add_token_level_kl=True, init_kl_coef=0.5)
    ctrl = KLController(cfg.init_kl_coef)
    adv = compute_advantages(cfg, torch.tensor([1.0]), mask, 1, old_logprobs=old, ref_logprobs=ref, kl_ctrl=ctrl)
    # token rewards: -0.5 x 0.2, 1 - 0.5 x 0.4; reward-to-go: 0.7, 0.8
    assert adv.advantages[0, 1:3].tolist() == pytest.approx([0.7, 0.8])
    assert adv.metrics["kl_coef"] == 0.5 and adv.metrics["token_kl"] == pytest.approx(0.3)
    cfg.add_token_level_kl = False
    adv = compute_advantages(cfg, torch.tensor([1.0]), mask, 1, old_logprobs=old, ref_logprobs=ref, kl_ctrl=ctrl)
    assert adv.advantages[0, 1:3].tolist() == [1.0, 1.0]


def test_sample_masks_stale_truncated_and_difficulty():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    mask = masks(1, 1, 1, 1, 1, 1)
    valid = torch.tensor([True, True, True, True, True, False])
    truncated = torch.tensor([False, False, False, True, False, False])
    cfg = AlgorithmConfig(max_len_mask=True, difficulty_mask=True, difficulty_low_threshold=0.1,
                          difficulty_high_threshold=0.95)  # fmt: skip
    adv = compute_advantages(cfg, scores, mask, group_size=3, valid=valid, truncated=truncated)
    # group 1 all right (mean 1 >= 0.95): masked; group 2: the truncated and the stale sample masked
    assert adv.mask.sum(1).tolist() == [0, 0, 0, 0, 1, 0]
    assert adv.metrics["samples_used"] == 1.0
    # group 2's statistics: samples 0 and 0 (the stale 1 left out): equal, so exactly 0
    assert adv.advantages.abs().sum().item() == 0.0


# ---- domains and the correctness score (issue 23: as ROLL's pipeline, per reward domain) --------------------------


def test_whitening_runs_per_domain_as_roll():
    """reinforce + whiten_advantages, rewards [1, 0, 1, 0] (math) and [3, 5, 3, 5] (another domain), 3 tokens each:
    pooled, the right math answers get -0.64; per domain (ROLL) +0.96."""
    cfg = AlgorithmConfig(adv_estimator="reinforce", whiten_advantages=True)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 3.0, 5.0, 3.0, 5.0])
    mask = masks(*[3] * 8)
    per_domain = compute_advantages(cfg, rewards, mask, group_size=4, domains=["math"] * 4 + ["code"] * 4)
    s = math.sqrt(12 * 0.25 / 11 + 1e-8)  # one domain's 12 tokens: half 1, half 0 (or 5 / 3): mean 1/2, var 3/11
    assert per_domain.advantages[0, 1:4].tolist() == pytest.approx([0.5 / s] * 3)  # +0.957
    assert per_domain.advantages[1, 1:4].tolist() == pytest.approx([-0.5 / s] * 3)
    assert per_domain.advantages[4, 1:4].tolist() == pytest.approx([-1.0 / (2 * s)] * 3)  # 3 of {3, 5}: (3-4)/(2s)
    assert round(per_domain.advantages[0, 1].item(), 2) == 0.96
    pooled = compute_advantages(cfg, rewards, mask, group_size=4)
    assert round(pooled.advantages[0, 1].item(), 2) == -0.64  # what one pooled batch gives (ROLL does not)
    assert per_domain.metrics["math/samples_used"] == 4.0 and per_domain.metrics["samples_used"] == 8.0


def test_kl_controller_is_updated_after_each_domain():
    """ROLL's compute_token_reward per domain: the second domain's in-reward KL uses the coefficient as updated by the
    first (n_steps: the domain's samples)."""
    cfg = AlgorithmConfig(adv_estimator="reinforce", add_token_level_kl=True, init_kl_coef=0.5, target_kl=0.1)
    ctrl = KLController(cfg.init_kl_coef, cfg.target_kl, horizon=10)
    old = torch.zeros(4, 3)
    ref = torch.tensor([[0.0, -0.2, 0.0]] * 2 + [[0.0, -0.05, 0.0]] * 2)  # k1: 0.2 (domain a), 0.05 (domain b)
    mask = masks(1, 1, 1, 1)[:, :3]
    adv = compute_advantages(cfg, torch.zeros(4), mask, 2, old_logprobs=old, ref_logprobs=ref, kl_ctrl=ctrl,
                             domains=["a", "a", "b", "b"])  # fmt: skip
    beta_b = 0.5 * (1 + 0.2 * 2 / 10)  # a: KL 0.2, error clip(0.2 / 0.1 - 1) = 0.2 over 2 samples
    assert adv.metrics["a/kl_coef"] == 0.5 and adv.metrics["b/kl_coef"] == pytest.approx(beta_b)
    assert adv.advantages[2, 1].item() == pytest.approx(-beta_b * 0.05)
    assert ctrl.value == pytest.approx(beta_b * (1 - 0.2 * 2 / 10))  # b: KL 0.05, error -0.5 clipped to -0.2


def test_a_group_cannot_span_two_domains():
    with pytest.raises(ValueError, match="span two domains"):
        compute_advantages(AlgorithmConfig(), torch.zeros(4), masks(1, 1, 1, 1), 2, domains=["a", "b", "b", "b"])


def test_difficulty_mask_filters_on_correctness_not_on_the_reward():
    """A reward of +-1 with a -0.1 penalty, ROLL's 7B thresholds (0.1, 0.95): rewards [0.9]*4 + [-1.1]*4 (4 of 8
    right) then [0.9]*8 (8 of 8). On the reward the first group (mean -0.1) would go and the second (0.9) stay;
    on correctness (0.5 and 1.0), as ROLL, the first stays and the second goes."""
    cfg = AlgorithmConfig(difficulty_mask=True, difficulty_low_threshold=0.1, difficulty_high_threshold=0.95)
    rewards = torch.tensor([0.9] * 4 + [-1.1] * 4 + [0.9] * 8)
    correct = torch.tensor([1.0] * 4 + [0.0] * 4 + [1.0] * 8)
    adv = compute_advantages(cfg, rewards, masks(*[1] * 16), group_size=8, correct=correct)
    assert adv.mask.sum(1).tolist() == [1.0] * 8 + [0.0] * 8
    assert adv.metrics["difficulty_mask_ratio"] == 0.5
    assert adv.advantages[0, 1].item() > 0 > adv.advantages[7, 1].item()


# ---- config -------------------------------------------------------------------------------------------------------


def test_roll_defaults():
    a = algorithm_config(OmegaConf.create({}))
    assert (a.adv_estimator, a.norm_mean_type, a.norm_std_type) == ("grpo", "group", "group")
    assert a.loss_agg_mode == "seq-mean-token-mean" and a.lr_scheduler_type == "linear"
    assert a.init_kl_coef == 0.2 and not a.add_token_level_kl and a.kl_loss_coef_in_use == 0.0
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps, a.learning_rate) == (8, 1, 5e-5)
    a = algorithm_config(OmegaConf.create({"adv_estimator": "reinforce", "pg_clip_high": 0.28}))
    assert (a.norm_mean_type, a.norm_std_type) == (None, None)
    assert a.clip_high == 0.2  # without use_pg_clip_range, as in ROLL
    a = algorithm_config(OmegaConf.create({"use_pg_clip_range": True, "pg_clip_low": 0.2, "pg_clip_high": 0.28}))
    assert (a.clip_low, a.clip_high) == (0.2, 0.28)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"adv_estimator": "gae"}, "adv_estimator"),
        ({"norm_mean_type": "running"}, "norm_mean_type"),
        ({"loss_agg_mode": "seq-sum"}, "loss_agg_mode"),
        ({"kl_penalty": "full"}, "kl_penalty"),
        ({"entropy_loss_coef": 0.01}, "entropy_loss_coef"),
        ({"error_max_len_clip": True}, "error_max_len_clip"),
        ({"whiten_advantages": "yes"}, "whiten_advantages"),
        ({"actor_train": {"training_args": {"lr_scheduler_type": "polynomial"}}}, "lr_scheduler_type"),
    ],
)
def test_unsupported_values_are_refused_naming_the_key(values, key):
    from fabric.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        algorithm_config(OmegaConf.create(values))


def test_lr_schedules_by_hand():
    param = torch.nn.Parameter(torch.zeros(2))
    cfg = AlgorithmConfig(learning_rate=1.0, warmup_steps=2, lr_scheduler_type="linear")

    def lrs(cfg, steps=11):
        optimizer = torch.optim.SGD([{"params": [param], "wd_mult": 0.0}], lr=0.0)
        scheduler = lr_scheduler(optimizer, cfg, total_steps=10)
        seen = [optimizer.param_groups[0]["lr"]]
        for _ in range(steps - 1):
            scheduler.step(1)
            seen.append(optimizer.param_groups[0]["lr"])
        return seen

    assert lrs(cfg) == pytest.approx([0.0, 0.5, 1.0] + [1 - k / 8 for k in range(1, 9)])
    cfg.lr_scheduler_type = "cosine"
    assert lrs(cfg)[6] == pytest.approx(0.5)  # halfway through the decay
    cfg.lr_scheduler_type = "constant"
    assert lrs(cfg) == pytest.approx([0.0, 0.5] + [1.0] * 9)
