"""One training step on a scored batch: the policy's and the reference's logprobs, advantages as ROLL's keys say
(algorithm.compute_advantages: grpo / reinforce, masks, clips, whitening, in-reward KL), the staleness filter and
the off-policy weights (algorithm.off_policy_weights: samples of an older version weighted by truncated importance
ratios against the rollout's own logprobs), then ROLL's mini-batches of clipped policy loss (policy.train_step).
The maths are the functions of algorithm.py and losses.py, on tensors; this module feeds them a step's samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fabric.trainer import losses
from fabric.trainer.algorithm import KLController, compute_advantages, off_policy_weights
from fabric.trainer.algorithm_config import AlgorithmConfig
from fabric.trainer.rollout_stream import Sample, staleness
from fabric.v1 import rollout_pb2


@dataclass(frozen=True)
class StepSettings:
    algorithm: AlgorithmConfig
    group_size: int
    max_staleness: int  # k: samples further behind are stale
    drop_stale: bool  # stale_samples: drop (else use)
    off_policy_correction: str  # tis | decoupled | none
    importance_cap: float
    seed: int  # with the step number: the mini-batch order's
    full_reward: float  # the sum of the rewards' weights: a sample that scores it is right ("accuracy")


def train_step(
    policy: Any,
    reference: Any,
    samples: list[Sample],
    settings: StepSettings,
    version: int,
    step: int,
    pad_id: int,
    kl_ctrl: KLController,
) -> dict:
    """Trains `policy` (at `version`, before its `step`-th RL step) on the samples; returns the step's metrics."""
    from fabric.trainer.policy import TrainBatch

    a = settings.algorithm
    batch = TrainBatch.from_token_lists(
        [list(s.response.prompt_token_ids) for s in samples], [list(s.response.token_ids) for s in samples], pad_id
    )
    age = staleness(samples, version, settings.max_staleness, settings.drop_stale)
    truncated = torch.tensor([s.response.finish_reason == rollout_pb2.FINISH_REASON_LENGTH for s in samples])
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    batch.old_logprobs = policy.logprobs(batch)
    batch.ref_logprobs = reference.logprobs(batch)
    rollout_lp = rollout_logprobs(samples, batch.old_logprobs)
    # training-inference mismatch: the rollout's logprobs against the trainer's for the same tokens (fresh ones)
    fresh = batch.response_mask.bool() & ~age.off_policy[:, None]
    gap = (rollout_lp - batch.old_logprobs)[fresh]
    kl = float(losses.masked_mean(losses.kl_penalty(batch.old_logprobs, batch.ref_logprobs), batch.response_mask))
    adv = compute_advantages(
        a,
        rewards,
        batch.response_mask,
        settings.group_size,
        valid=age.valid,
        truncated=truncated,
        old_logprobs=batch.old_logprobs,
        ref_logprobs=batch.ref_logprobs,
        kl_ctrl=kl_ctrl,
        correct=torch.tensor([s.reward if s.correct is None else s.correct for s in samples]),
        domains=[s.domain for s in samples],
    )
    # asynchronous RL: samples from older versions weighted by rollout -> current importance ratios (the
    # rollout's own logprobs as the behaviour policy); samples of the current version keep weight 1 exactly
    weights, correction = off_policy_weights(
        rollout_lp, batch.old_logprobs, adv.mask, age.off_policy & ~age.stale, settings.off_policy_correction,
        settings.importance_cap,
    )  # fmt: skip
    batch.advantages, batch.response_mask = adv.advantages * weights, adv.mask
    steps = []
    if adv.mask.any():  # else nothing to learn from (ROLL skips such a step too)
        generator = torch.Generator().manual_seed(settings.seed + step)
        for rows in mini_batches(len(batch), a.mini_batch_size, a.ppo_epochs, generator):
            steps.append(policy.train_step(batch.rows(rows)))

    def mean(key: str) -> float:
        return sum(float(m.get(key, 0.0)) for m in steps) / len(steps) if steps else 0.0

    return {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "loss": mean("loss"),
        "kl": kl,
        "logprob_mismatch": float(gap.abs().mean()) if gap.numel() else 0.0,
        "stale_samples": int(age.stale.sum()),
        "extra": {
            "accuracy": float((rewards >= 0.999 * settings.full_reward).float().mean()),
            "grad_norm": mean("grad_norm"),
            "lr": float(steps[-1]["lr"]) if steps else 0.0,
            "optimizer_steps": float(len(steps)),
            # rollout minus trainer logprob: > 0 is top-p / top-k truncation (vLLM renormalizes over the kept
            # tokens; the trainer's logprobs are over the whole vocabulary)
            "logprob_gap_mean": float(gap.mean()) if gap.numel() else 0.0,
            "clip_frac": mean("clip_frac"),
            **{k: float(v) for k, v in adv.metrics.items()},
            **correction,
            "staleness_mean": float(age.behind.float().mean()),
            "staleness_max": float(age.behind.max()),
            **domain_rewards(samples, rewards),
        },
    }


def rollout_logprobs(samples: list[Sample], like: torch.Tensor) -> torch.Tensor:
    """The rollout's own logprobs of each response token, aligned with the trainer's [N, T] (0 elsewhere)."""
    out = torch.zeros_like(like)
    for row, sample in enumerate(samples):
        start = len(sample.response.prompt_token_ids)
        lp = list(sample.response.logprobs)
        out[row, start : start + len(lp)] = torch.tensor(lp)
    return out


def mini_batches(n: int, size: int, epochs: int, generator: torch.Generator) -> list[torch.Tensor]:
    """ROLL's mini-batches: each epoch a fresh permutation of the n rows (in order when one mini-batch holds them
    all), cut into `size` rows."""
    out = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        if n <= size:
            order = torch.arange(n)
        out += [order[start : start + size] for start in range(0, n, size)]
    return out


def domain_rewards(samples: list[Sample], rewards: torch.Tensor) -> dict[str, float]:
    """Each reward domain's mean reward and correctness ("reward/<domain>", "correct/<domain>"), when there are two
    domains or more."""
    domains = list(dict.fromkeys(s.domain for s in samples))
    if len(domains) < 2:
        return {}
    out = {}
    for domain in domains:
        rows = [k for k, s in enumerate(samples) if s.domain == domain]
        out[f"reward/{domain}"] = float(rewards[rows].mean())
        known = [c for k in rows if (c := samples[k].correct) is not None]
        if known:
            out[f"correct/{domain}"] = sum(known) / len(known)
    return out
