"""Log-probabilities, GRPO advantages and the clipped policy-gradient loss with KL to a reference. Pure torch.

Token alignment used everywhere: for a [B, T] batch of right-padded token ids, `logprobs[b, t]` is
log p(ids[b, t] | ids[b, :t]); column 0 has no prediction and is 0. A `response_mask[b, t]` of 1 marks a response
token, so the same [B, T] positions index ids, logprobs, old/reference logprobs and per-token advantages.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of values where mask is 1 (over everything, or along dim); 0 where the mask is empty."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1.0)


def logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, T, V] next-token logits (full vocabulary) -> [B, T] logprobs of input_ids, aligned as above."""
    shifted = logits[:, :-1].float() / temperature
    picked = shifted.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - shifted.logsumexp(-1)
    return torch.nn.functional.pad(picked, (1, 0))


def check_right_padded(attention_mask: torch.Tensor) -> None:
    """megatron's RoPE numbers positions 0..T-1 whatever position_ids say, so every row must start at column 0."""
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.to(torch.int8)
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError("attention_mask is not right-padded: put padding after the tokens, never before them")


def token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """[B, T] logprobs of input_ids under a megatron GPTModel (aligned as above; 0 at column 0 and at padding).

    Uses megatron's vocab-parallel cross entropy, so it is exact with the vocabulary split over TP ranks too.
    Differentiable when called under grad. temperature divides the logits, as the sampler did.
    """
    from megatron.core import tensor_parallel

    if attention_mask is not None:
        check_right_padded(attention_mask)
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    logits = model(input_ids, position_ids, None)  # None: megatron's causal mask; padding sits after every token
    # Division makes a fresh float32 tensor, which the cross entropy may modify in place.
    scaled = logits[:, :-1].float() / temperature
    picked = -tensor_parallel.vocab_parallel_cross_entropy(scaled, input_ids[:, 1:].contiguous())
    logprobs = torch.nn.functional.pad(picked, (1, 0))
    if attention_mask is not None:
        logprobs = logprobs * attention_mask.to(logprobs.dtype)
    return logprobs


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO group-normalized advantages: (r - mean of its group) / (std of its group + eps).

    rewards is [N] with each group's samples contiguous (N = groups * group_size). std is the unbiased one
    (as TRL and verl); normalize_std=False gives Dr. GRPO's plain mean-centering. A group of equal rewards gets 0.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} items, got {rewards.shape}")
    grouped = rewards.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.view(-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens' logprobs (Schulman's k1, k2, k3)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":  # unbiased and always >= 0: r - 1 - log r with r = p_ref / p
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator {estimator!r} is unknown; use one of {', '.join(KL_ESTIMATORS)}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """token-mean: mean over all response tokens of the batch (DAPO); seq-mean-token-mean: per sequence, then over
    sequences (the original GRPO)."""
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    if mode == "seq-mean-token-mean":
        return masked_mean(per_token, mask, dim=-1).mean()
    raise ValueError(f"loss aggregation {mode!r} is unknown; use one of {', '.join(LOSS_AGGREGATIONS)}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    pg_clip: float = 0.2,
    pg_clip_high: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-style clipped policy-gradient loss plus kl_coef * KL(policy || reference), over response tokens.

    Per token: max(-A * ratio, -A * clip(ratio, 1 - pg_clip, 1 + pg_clip_high)) with ratio = exp(logprobs -
    old_logprobs); advantages are [B] (one per sequence) or [B, T]. pg_clip_high defaults to pg_clip (DAPO's
    clip-higher sets it larger). Returns (loss, metrics) with detached metrics: pg_loss, kl, clip_frac, ratio_mean.
    """
    mask = response_mask.to(logprobs.dtype)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    high = pg_clip if pg_clip_high is None else pg_clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - pg_clip, 1.0 + high)
    pg_per_token = torch.maximum(unclipped, clipped)
    pg_loss = aggregate(pg_per_token, mask, loss_agg)
    loss = pg_loss
    metrics = {
        "pg_loss": pg_loss.detach(),
        "clip_frac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask).detach(),
        "ratio_mean": masked_mean(ratio, mask).detach(),
    }
    if ref_logprobs is not None:
        kl = aggregate(kl_penalty(logprobs, ref_logprobs, kl_estimator), mask, loss_agg)
        metrics["kl"] = kl.detach()
        if kl_coef:
            loss = loss + kl_coef * kl
    elif kl_coef:
        raise ValueError("kl_coef is set but ref_logprobs is None; pass the reference model's logprobs")
    return loss, metrics


def sft_loss(logprobs: torch.Tensor, response_mask: torch.Tensor, loss_agg: str = "token-mean") -> torch.Tensor:
    """Teacher-forced cross entropy on response tokens: the mean negative logprob."""
    return aggregate(-logprobs, response_mask.to(logprobs.dtype), loss_agg)
