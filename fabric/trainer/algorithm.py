"""From scored samples to per-token advantages, as ROLL's RLVR pipeline does it (roll/utils/functionals.py):

0. the batch is split by reward domain (the reward whose tag_included names the sample's tag) and each domain runs
   through steps 1-4 on its own, as ROLL's pipeline loops over `batch.group_by("domain")`;
1. sample masks (get_sample_level_mask): max_len_mask drops truncated responses, difficulty_mask drops groups whose
   mean correctness score (the reward worker's 0/1 `correct`, ROLL's `scores`) lies outside
   (difficulty_low_threshold, difficulty_high_threshold); the fabric also drops stale
   samples (`stale_samples: drop`), which moreover do not count in their group's statistics;
2. reward_postprocess: reward_norm (grpo: group mean and std; reinforce: norm_mean_type / norm_std_type), then
   reward_clip;
3. compute_token_reward: the response's reward on its last token, minus kl_coef x KL(old || reference) per token when
   add_token_level_kl (kl_penalty estimator, k1 by default; the coefficient adaptive with target_kl), reward_clip;
4. compute_advantage: whiten_rewards, the reward-to-go with gamma, whiten_advantages, advantage_clip.

With grpo, gamma 1 and no token-level KL every response token of a sample gets its group-normalized reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fabric.trainer import losses
from fabric.trainer.algorithm_config import AlgorithmConfig


class KLController:
    """ROLL's kl_controller: fixed at init_kl_coef, or adaptive (Ziegler et al.) when target_kl is set."""

    def __init__(self, init_kl_coef: float, target_kl: float | None = None, horizon: int = 10000):
        self.value = float(init_kl_coef)
        self.target = target_kl
        self.horizon = horizon

    def update(self, current: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = float(np.clip(current / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_steps / self.horizon


@dataclass
class Advantages:
    advantages: torch.Tensor  # [N, T], 0 outside `mask`
    mask: torch.Tensor  # [N, T]: the response tokens that enter the loss (sample masks applied)
    metrics: dict[str, float]


def last_token_positions(response_mask: torch.Tensor) -> torch.Tensor:
    """[N] column of each row's last response token (0 for a row without any)."""
    columns = torch.arange(response_mask.shape[1], device=response_mask.device)
    return (response_mask.bool() * columns).amax(dim=1)


def _clip_frac(values: torch.Tensor, limit: float, mask: torch.Tensor | None = None) -> float:
    outside = (values.abs() > limit).float()
    if mask is None:
        return float(outside.mean()) if outside.numel() else 0.0
    return float(losses.masked_mean(outside, mask))


@torch.no_grad()
def compute_advantages(
    cfg: AlgorithmConfig,
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    group_size: int,
    valid: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_ctrl: KLController | None = None,
    correct: torch.Tensor | None = None,
    domains: list[str] | None = None,
) -> Advantages:
    """scores [N] (each group's samples contiguous), response_mask [N, T]; valid [N] (False: stale, left out of the
    loss and of the statistics), truncated [N] (finished by length: max_len_mask), old/ref logprobs [N, T] for the
    token-level KL, correct [N] (the reward worker's 0/1 correctness, which the difficulty mask filters on, as
    ROLL's `scores`; default: scores), domains [N] (each sample's reward domain; a group lies in one domain).

    As ROLL's RLVR pipeline, each domain's samples go through steps 1-4 on their own, in order of first appearance
    (the KL controller is updated after each). Returns the advantages, the loss mask and metrics: with more than one
    domain, each domain's as "<domain>/<key>" beside the batch's (sums and sample-weighted means)."""
    n = scores.shape[0]
    if domains is None or len(set(domains)) < 2:
        return _domain_advantages(cfg, scores, response_mask, group_size, valid, truncated, old_logprobs,
                                  ref_logprobs, kl_ctrl, correct)  # fmt: skip
    if len(domains) != n:
        raise ValueError(f"{len(domains)} domains for {n} samples")
    advantages = torch.zeros_like(response_mask, dtype=torch.float32)
    mask = torch.zeros_like(response_mask, dtype=torch.float32)
    metrics: dict[str, float] = {}
    totals: dict[str, float] = {}
    if any(len(set(domains[k : k + group_size])) > 1 for k in range(0, n, group_size)):
        raise ValueError("a group's samples span two domains: a prompt's samples share its tag")
    for domain in dict.fromkeys(domains):
        rows = torch.tensor([d == domain for d in domains])

        def part(t: torch.Tensor | None, rows: torch.Tensor = rows) -> torch.Tensor | None:
            return None if t is None else t[rows]

        out = _domain_advantages(
            cfg, scores[rows], response_mask[rows], group_size, part(valid), part(truncated), part(old_logprobs),
            part(ref_logprobs), kl_ctrl, part(correct),
        )  # fmt: skip
        advantages[rows], mask[rows] = out.advantages, out.mask
        size = float(rows.sum())
        for key, value in out.metrics.items():
            metrics[f"{domain}/{key}"] = value
            totals[key] = totals.get(key, 0.0) + (value if key == "samples_used" else value * size)
    for key, total in totals.items():
        metrics[key] = total if key == "samples_used" else total / n
    return Advantages(advantages, mask, metrics)


def _domain_advantages(
    cfg: AlgorithmConfig,
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    group_size: int,
    valid: torch.Tensor | None,
    truncated: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    kl_ctrl: KLController | None,
    correct: torch.Tensor | None,
) -> Advantages:
    """Steps 1-4 over one domain's samples (ROLL's get_sample_level_mask, reward_postprocess, compute_token_reward,
    compute_advantage)."""
    n = scores.shape[0]
    response_mask = response_mask.float()
    valid = torch.ones(n, dtype=torch.bool) if valid is None else valid.bool()
    sample_mask = valid.clone()
    metrics: dict[str, float] = {}

    # 1. sample masks; the difficulty mask on the correctness score, as ROLL's (on `scores`, not the reward)
    if cfg.max_len_mask and truncated is not None:
        sample_mask &= ~truncated.bool()
        metrics["max_len_mask_ratio"] = float((~truncated.bool()).float().mean())
    if cfg.difficulty_mask and group_size > 1:
        basis = scores if correct is None else correct
        group_mean = basis.float().view(-1, group_size).mean(1, keepdim=True).expand(-1, group_size).reshape(-1)
        keep = (group_mean > cfg.difficulty_low_threshold) & (group_mean < cfg.difficulty_high_threshold)
        sample_mask &= keep
        metrics["difficulty_mask_ratio"] = float(keep.float().mean())
    final_mask = response_mask * sample_mask.float()[:, None]
    metrics["samples_used"] = float(sample_mask.sum())

    # 2. response-level reward: normalization, clip
    norm = ("group", "group") if cfg.adv_estimator == "grpo" else (cfg.norm_mean_type, cfg.norm_std_type)
    rewards = losses.reward_norm(scores, group_size, *norm, valid=valid)
    if cfg.reward_clip:
        metrics["reward_clip_frac"] = _clip_frac(rewards, cfg.reward_clip)
        rewards = rewards.clamp(-cfg.reward_clip, cfg.reward_clip)

    # 3. token-level reward: on the last response token, minus the in-reward KL
    token_rewards = torch.zeros_like(response_mask)
    token_rewards[torch.arange(n), last_token_positions(response_mask)] = rewards
    token_rewards = token_rewards * (response_mask.sum(1, keepdim=True) > 0)
    if old_logprobs is not None and ref_logprobs is not None:
        kld = losses.kl_penalty(old_logprobs.float(), ref_logprobs.float(), cfg.kl_penalty) * response_mask
        current_kl = float(losses.masked_mean(kld, response_mask, dim=-1).mean())
        beta = 0.0
        if cfg.add_token_level_kl and kl_ctrl is not None:
            beta = kl_ctrl.value
            token_rewards = token_rewards - beta * kld
        if kl_ctrl is not None:
            kl_ctrl.update(current=current_kl, n_steps=n)
        metrics.update(token_kl=current_kl, kl_coef=beta)
    if cfg.reward_clip:
        token_rewards = token_rewards.clamp(-cfg.reward_clip, cfg.reward_clip)

    # 4. advantages
    enough = final_mask.sum() > 1  # an unbiased variance needs two tokens (ROLL skips whitening then too)
    if cfg.whiten_rewards and enough:
        token_rewards = losses.masked_whiten(token_rewards, final_mask)
    token_rewards = token_rewards * final_mask
    advantages = losses.reward_to_go(token_rewards, cfg.gamma)
    if cfg.whiten_advantages and enough:
        advantages = losses.masked_whiten(advantages, final_mask)
    advantages = advantages * final_mask
    if cfg.advantage_clip is not None:
        metrics["advantage_clip_frac"] = _clip_frac(advantages, cfg.advantage_clip, final_mask)
        advantages = advantages.clamp(-cfg.advantage_clip, cfg.advantage_clip)
    return Advantages(advantages, final_mask, metrics)


def lr_scheduler(optimizer, cfg: AlgorithmConfig, total_steps: int):
    """megatron-core's OptimizerParamScheduler as ROLL's mcore_adapter builds it: warm-up from 0 to learning_rate
    over warmup_steps (or warmup_ratio of the run), then linear / cosine decay to 0 at the run's last optimizer step,
    or constant. Weight decay constant; a param group's wd_mult (0 for biases and norms) applies."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.learning_rate,
        min_lr=0.0,
        lr_warmup_steps=cfg.lr_warmup_steps(total_steps),
        lr_decay_steps=total_steps,
        lr_decay_style=cfg.lr_scheduler_type,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=0,
        wd_incr_style="constant",
    )


@torch.no_grad()
def off_policy_weights(
    rollout_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    off_policy: torch.Tensor,
    mode: str = "tis",
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token weights [N, T] that correct the loss of samples generated by an older policy (asynchronous RL),
    with the rollout's own logprobs as the behaviour policy and the trainer's recomputed ones (`old_logprobs`, the
    proximal policy the PPO ratio is clipped around) as the target: w = exp(old - rollout) per token.

    tis        truncated importance sampling (verl's TIS): min(w, cap)
    decoupled  decoupled PPO (AReaL): w, and a token with w > cap leaves the loss (weight 0)
    none       1

    Only rows in `off_policy` [N] are weighted; every other row gets exactly 1 (its rollout policy is the current
    one), so a synchronous step is unchanged bit for bit. The weights are >= 0 and multiply the advantages: for the
    clipped surrogate (and the dual clip) that is the same as multiplying the per-token policy loss."""
    weights = torch.ones_like(old_logprobs, dtype=torch.float32)
    rows = off_policy.bool()[:, None] & mask.bool()
    metrics = {"off_policy_samples": float(off_policy.sum())}
    if mode == "none" or not rows.any():
        return weights, metrics
    raw = torch.exp((old_logprobs.float() - rollout_logprobs.float()).clamp(-20.0, 20.0))
    if mode == "tis":
        corrected = raw.clamp(max=cap)
    elif mode == "decoupled":
        corrected = torch.where(raw > cap, torch.zeros_like(raw), raw)
    else:
        raise ValueError(f"off-policy correction {mode!r} is unknown; use tis, decoupled or none")
    weights = torch.where(rows, corrected, weights)
    metrics.update(
        importance_weight_mean=float(raw[rows].mean()),
        importance_capped_frac=float((raw[rows] > cap).float().mean()),
    )
    return weights, metrics
