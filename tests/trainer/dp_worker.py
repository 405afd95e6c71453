"""One rank of the data-parallel test: spawned by test_data_parallel.py (gloo, world 2, TP 1 so DP 2).

Rank 0 drives through `LeaderPolicy` as the trainer's rank 0 does, rank 1 follows (`distributed.follow`): logprobs
gathered from both, one RL step, a short supervised run, the HF weights streamed and exported, the sharded state
saved; then every rank resumes a fresh policy from that state and both take one more step.
"""

from __future__ import annotations

import os

import torch

LR = 1e-4
SFT_STEPS = 8


def sft_pairs() -> list[tuple[str, str]]:
    return [(f"Add {a} and {b}.\n", f"<answer>{a + b}</answer>") for a, b in [(2, 3), (10, 7), (4, 4), (1, 9)]]


def run_rank(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from fabric.trainer import distributed
    from fabric.trainer.compat import init_megatron
    from fabric.trainer.model import export_hf_state_dict
    from fabric.trainer.policy import OptimConfig, Policy
    from fabric.trainer.sft import make_sft_batch
    from tests.trainer.test_policy import rl_batch_ids
    from tests.trainer.tp_worker import hf_grads

    init_megatron(tp=1)
    control = distributed.Control()
    policy = Policy.from_hf(model_dir, OptimConfig(lr=LR, grad_clip=0.5, micro_batch_size=1))
    batch = rl_batch_ids(model_dir)
    sft_batch = make_sft_batch(AutoTokenizer.from_pretrained(model_dir), sft_pairs())
    out = os.path.join(out_dir, "dp")
    result: dict = {"dp": distributed.data_parallel()}
    if rank == 0:
        with distributed.leading({"policy": policy}, control) as views:
            lead = views["policy"]
            batch.old_logprobs = lead.logprobs(batch) - 0.1
            result["old_logprobs"] = batch.old_logprobs
            result["metrics"] = lead.train_step(batch)
            result["grads"] = hf_grads(policy.model)
            result["trained"] = {n: t.clone() for n, t in lead.hf_weights() if n != "lm_head.weight"}
            result["sft_losses"] = [lead.sft_step(sft_batch)["loss"] for _ in range(SFT_STEPS)]
            lead.save(os.path.join(out, "hf"))
            lead.save_distributed(os.path.join(out, "dist"))
    else:
        result["calls"] = distributed.follow({"policy": policy}, control)
    # every rank from here on (collective calls, no leader): a fresh policy resumed from the sharded state takes the
    # same next step as the live one
    batch.old_logprobs = policy.logprobs(batch) - 0.1
    fresh = Policy.from_hf(model_dir, OptimConfig(lr=LR, grad_clip=0.5, micro_batch_size=1))
    fresh.load_distributed(os.path.join(out, "dist"))
    result["resumed_version"] = fresh.weight_version
    policy.train_step(batch)
    fresh.train_step(batch)
    result["next_live"] = export_hf_state_dict(policy.model)
    result["next_resumed"] = export_hf_state_dict(fresh.model)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()
