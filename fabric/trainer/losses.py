"""Log-probabilities, reward normalization (GRPO), KL estimators, ROLL's loss aggregations and the clipped
policy-gradient loss with KL to a reference. Pure torch; ROLL's roll/utils/functionals.py is the reference.

Token alignment used everywhere: for a [B, T] batch of right-padded token ids, `logprobs[b, t]` is
log p(ids[b, t] | ids[b, :t]); column 0 has no prediction and is 0. A `response_mask[b, t]` of 1 marks a response
token, so the same [B, T] positions index ids, logprobs, old/reference logprobs and per-token advantages.
"""

from __future__ import annotations

from typing import Any

import torch

KL_ESTIMATORS = ("kl", "abs", "mse", "k3", "k1", "k2")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


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


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) over the masked entries, var unbiased (ROLL's and verl's masked_whiten)."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    if count < 2:
        raise ValueError("whitening needs at least two masked values (an unbiased variance)")
    mean = (values * mask).sum() / count
    var = ((values - mean).square() * mask).sum() / (count - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def _norm_stats(rewards: torch.Tensor, valid: torch.Tensor, kind: str, group_size: int):
    """Mean, unbiased std and "all equal" of the valid rewards per group (kind "group") or over the batch ("batch"),
    broadcast back to [N]. A group whose valid rewards are all equal (or that has fewer than two) is "equal"."""
    shape = (-1, group_size) if kind == "group" else (1, -1)
    r, v = rewards.view(shape), valid.view(shape)
    count = v.sum(1, keepdim=True)
    mean = torch.where(v, r, 0.0).sum(1, keepdim=True) / count.clamp(min=1)
    var = torch.where(v, (r - mean).square(), 0.0).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    high = torch.where(v, r, -torch.inf).amax(1, keepdim=True)
    low = torch.where(v, r, torch.inf).amin(1, keepdim=True)
    equal = (high == low) | (count < 2)
    return (mean.expand(shape).reshape(-1), var.sqrt().expand(shape).reshape(-1), equal.expand(shape).reshape(-1))


def reward_norm(
    rewards: torch.Tensor,
    group_size: int,
    norm_mean_type: str | None = "group",
    norm_std_type: str | None = "group",
    valid: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """ROLL's reward_norm: (r - mean) / (std + eps) with mean and std over each group or the whole batch (None: no
    centering / no scaling). rewards is [N], each group's samples contiguous. Differences from ROLL, on purpose:
    only `valid` samples (e.g. not stale) count in the statistics and get a nonzero result; where the valid rewards
    are all equal the result is exactly 0 (centering) and nothing is divided by the std, instead of float rounding
    noise divided by eps (0.7 x 12 in float32 gives 0.106 otherwise). Computed in float64, returned as float32.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} items, got {rewards.shape}")
    for kind in (norm_mean_type, norm_std_type):
        if kind not in (None, "group", "batch"):
            raise ValueError(f"norm type {kind!r} is unknown; use group, batch or None")
    r = rewards.double()
    valid = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.bool()
    out = r
    if norm_mean_type is not None:
        mean, _, equal = _norm_stats(r, valid, norm_mean_type, group_size)
        out = torch.where(equal, 0.0, r - mean)
    if norm_std_type is not None:
        _, std, equal = _norm_stats(r, valid, norm_std_type, group_size)
        out = out / torch.where(equal, 1.0, std + eps)
    return torch.where(valid, out, 0.0).float()


def grpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO group-normalized advantages: (r - mean of its group) / (unbiased std of its group + 1e-6), [N].

    normalize_std=False gives Dr. GRPO's plain mean-centering. A group of equal rewards gets exactly 0.
    """
    return reward_norm(rewards, group_size, "group", "group" if normalize_std else None, valid, eps)


def reward_to_go(token_rewards: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """ROLL's compute_reinforce_return: A[t] = sum over t' >= t of gamma^(t'-t) r[t'], along the last dimension."""
    if gamma == 1.0:
        return token_rewards.flip(-1).cumsum(-1).flip(-1)
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[..., 0])
    for t in reversed(range(token_rewards.shape[-1])):
        running = token_rewards[..., t] + gamma * running
        returns[..., t] = running
    return returns


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' logprobs, named as ROLL names them:
    kl (k1: log p - log p_ref), abs (|k1|), mse (k2: 0.5 k1^2), k3 (p_ref/p - 1 - log(p_ref/p), clamped to
    [-10, 10] as ROLL and verl clamp it). k1 and k2 are accepted as aliases."""
    log_ratio = logprobs - ref_logprobs
    if estimator in ("kl", "k1"):
        return log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    if estimator in ("mse", "k2"):
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return (torch.expm1(-log_ratio) + log_ratio).clamp(min=-10.0, max=10.0)
    raise ValueError(f"kl estimator {estimator!r} is unknown; use one of {', '.join(KL_ESTIMATORS)}")


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    norm_length: float | None = None,
) -> torch.Tensor:
    """ROLL's agg_loss over [B, T] values where mask is 1:

    token-mean               sum of all tokens / num_tokens (DAPO)
    seq-mean-token-mean      sum over sequences of (their token mean) / num_seqs (the original GRPO; ROLL's default)
    seq-mean-token-sum       sum over sequences of (their token sum) / num_seqs
    seq-mean-token-sum-norm  sum of all tokens / norm_length (Dr. GRPO: a constant; ROLL's is its loss mask's padded
                             width, sequence_length - 1)

    num_tokens and num_seqs default to this batch's masked tokens and its sequences with any masked token; pass a
    whole mini-batch's counts when this is one micro-batch of it, so the micro-batches' losses add up to the
    mini-batch's loss.
    """
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        total = mask.sum() if num_tokens is None else num_tokens
        return masked_sum(per_token, mask) / torch.as_tensor(total, dtype=per_token.dtype).clamp(min=1.0)
    if mode == "seq-mean-token-sum-norm":
        if norm_length is None:
            raise ValueError("seq-mean-token-sum-norm needs norm_length (a constant: ROLL's sequence_length - 1)")
        return masked_sum(per_token, mask) / norm_length
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        seqs = (mask.sum(-1) > 0).sum() if num_seqs is None else num_seqs
        per_seq = (
            masked_mean(per_token, mask, dim=-1)
            if mode == "seq-mean-token-mean"
            else masked_sum(per_token, mask, dim=-1)
        )
        return per_seq.sum() / torch.as_tensor(seqs, dtype=per_token.dtype).clamp(min=1.0)
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
    dual_clip: float | None = None,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    norm_length: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ROLL's policy loss (roll/pipeline/rlvr/actor_worker.py): per token -min(A r, A clip(r, 1 - pg_clip,
    1 + pg_clip_high)) with r = exp(logprobs - old_logprobs); with dual_clip = c, a token of negative advantage
    costs at most -c A (ROLL's dual-clip loss uses c = 1 + 2 pg_clip); aggregated by loss_agg, plus kl_coef x the
    aggregated kl_estimator KL to ref_logprobs (ROLL: use_kl_loss x kl_loss_coef, k3).

    advantages are [B] (one per sequence) or [B, T]. pg_clip_high defaults to pg_clip (DAPO's clip-higher sets it
    larger). num_tokens / num_seqs / norm_length: see `aggregate`. Returns (loss, metrics), metrics detached and
    aggregated like the loss (pg_loss, kl, clip_frac, ratio_mean; token means over num_tokens).
    """
    mask = response_mask.to(logprobs.dtype)
    if advantages.ndim == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    agg: dict[str, Any] = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    high = pg_clip if pg_clip_high is None else pg_clip_high
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1.0 - pg_clip, 1.0 + high) * advantages
    per_token = -torch.minimum(surr1, surr2)
    if dual_clip is not None:
        bounded = -torch.maximum(-per_token, dual_clip * advantages)
        per_token = torch.where(advantages < 0, bounded, per_token)
    pg_loss = aggregate(per_token, mask, loss_agg, **agg)
    loss = pg_loss
    token_mean: dict[str, Any] = dict(num_tokens=num_tokens)
    metrics = {
        "pg_loss": pg_loss.detach(),
        "clip_frac": aggregate((surr2 < surr1).to(logprobs.dtype), mask, "token-mean", **token_mean).detach(),
        "ratio_mean": aggregate(ratio, mask, "token-mean", **token_mean).detach(),
    }
    if ref_logprobs is not None:
        kl = aggregate(kl_penalty(logprobs, ref_logprobs, kl_estimator), mask, loss_agg, **agg)
        metrics["kl"] = kl.detach()
        if kl_coef:
            loss = loss + kl_coef * kl
    elif kl_coef:
        raise ValueError("kl_coef is set but ref_logprobs is None; pass the reference model's logprobs")
    return loss, metrics


def sft_loss(
    logprobs: torch.Tensor, response_mask: torch.Tensor, loss_agg: str = "token-mean", num_tokens=None, num_seqs=None
) -> torch.Tensor:
    """Teacher-forced cross entropy on response tokens: the mean negative logprob."""
    return aggregate(-logprobs, response_mask.to(logprobs.dtype), loss_agg, num_tokens=num_tokens, num_seqs=num_seqs)
