"""One rank of the tensor-parallel test: spawned twice by test_tensor_parallel.py (world size 2, gloo, TP 2)."""

from __future__ import annotations

import os

import torch


def hf_grads(model) -> dict[str, torch.Tensor]:
    """The gradients in HF layout, all-gathered over TP ranks like the weights (each parameter's data is swapped
    for its grad while the export reads it)."""
    from fabric.trainer.model import export_hf_state_dict

    params = [p for p in model.parameters() if p.grad is not None]
    saved = [p.data for p in params]
    try:
        for param in params:
            param.data = param.grad
        return export_hf_state_dict(model)
    finally:
        for param, data in zip(params, saved, strict=True):
            param.data = data


def run_rank(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megatron.core import parallel_state

    from fabric.trainer.compat import init_megatron
    from fabric.trainer.model import export_hf_state_dict
    from fabric.trainer.policy import OptimConfig, Policy
    from tests.trainer.test_policy import rl_batch_ids

    init_megatron(tp=world_size)
    policy = Policy.from_hf(model_dir, OptimConfig(lr=1e-4, grad_clip=0.5))
    shapes = {n: tuple(p.shape) for n, p in policy.model.named_parameters()}
    loaded = export_hf_state_dict(policy.model)  # all-gathered from both ranks
    batch = rl_batch_ids(model_dir)
    batch.old_logprobs = policy.logprobs(batch) - 0.1
    metrics = policy.train_step(batch)
    result = {
        "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
        "shapes": shapes,
        "loaded": loaded,
        "old_logprobs": batch.old_logprobs,
        "metrics": metrics,
        "grads": hf_grads(policy.model),  # after clipping, as the optimizer used them
        "trained": export_hf_state_dict(policy.model),
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()
