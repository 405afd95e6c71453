"""Each part of the trainer's loop gets the few settings it uses, read here from the pipeline config (the one place
that maps PipelineConfig's fields onto them; `server.py` does the same for the policy's optimizer and loss)."""

from __future__ import annotations

from fabric.config.sampling import sampling_settings
from fabric.trainer.config import PipelineConfig
from fabric.trainer.rollout_stream import StreamSettings
from fabric.trainer.scoring import RewardSettings
from fabric.trainer.step import StepSettings
from fabric.trainer.sync import SyncSettings


def stream_settings(pc: PipelineConfig) -> StreamSettings:
    return StreamSettings(
        max_steps=pc.max_steps,
        prompts_per_step=pc.rollout_batch_size,
        group_size=pc.group_size,
        max_staleness=pc.max_staleness,
        partial_rollout=pc.partial_rollout,
        sampling=sampling_settings(pc.sampling),
        seed=pc.seed,
    )


def reward_settings(pc: PipelineConfig) -> RewardSettings:
    return RewardSettings(
        weights={name: spec["weight"] for name, spec in pc.rewards.items()},
        rewards_for=pc.rewards_for,
        domain_of=pc.domain_of,
    )


def step_settings(pc: PipelineConfig) -> StepSettings:
    return StepSettings(
        algorithm=pc.algorithm,
        group_size=pc.group_size,
        max_staleness=pc.max_staleness,
        drop_stale=pc.stale_policy == "drop",
        off_policy_correction=pc.off_policy_correction,
        importance_cap=pc.importance_cap,
        seed=pc.seed,
        full_reward=sum(spec["weight"] for spec in pc.rewards.values()),
    )


def sync_settings(pc: PipelineConfig) -> SyncSettings:
    return SyncSettings(
        mode=pc.sync_mode,
        transport=pc.sync_transport,
        chunk_bytes=int(pc.chunk_mib * 2**20),
        push_timeout_s=pc.push_timeout_s,
        rpc_timeout_s=pc.rpc_timeout_s,
        colocate=pc.colocate,
        sleep_level=pc.sleep_level,
    )
