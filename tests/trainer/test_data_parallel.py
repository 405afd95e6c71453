"""Data parallelism 2 for real: two processes on gloo, megatron-core's DDP summing the gradients, rank 0 driving the
other through the trainer's control group (LeaderPolicy / follow), against the same work in one process.

TP 2 against one process is test_tensor_parallel.py; the two together cover the issue's CPU measure.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from fabric.trainer.model import read_hf_state_dict
from fabric.trainer.policy import OptimConfig, Policy
from tests.trainer.dp_worker import LR, SFT_STEPS, run_rank, sft_pairs
from tests.trainer.test_policy import rl_batch_ids
from tests.trainer.tp_worker import hf_grads

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dp2(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(run_rank, args=(2, port, tiny_model, str(out)), nprocs=2, join=True, start_method="spawn")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single(megatron, tiny_model):
    """The same calls in one process (TP 1, DP 1)."""
    from transformers import AutoTokenizer

    from fabric.trainer.sft import make_sft_batch

    policy = Policy.from_hf(tiny_model, OptimConfig(lr=LR, grad_clip=0.5, micro_batch_size=1))
    batch = rl_batch_ids(tiny_model)
    batch.old_logprobs = policy.logprobs(batch) - 0.1
    metrics = policy.train_step(batch)
    result = {"old_logprobs": batch.old_logprobs, "metrics": metrics, "grads": hf_grads(policy.model)}
    result["trained"] = {n: t.clone() for n, t in policy.hf_weights() if n != "lm_head.weight"}
    sft_batch = make_sft_batch(AutoTokenizer.from_pretrained(tiny_model), sft_pairs())
    result["sft_losses"] = [policy.sft_step(sft_batch)["loss"] for _ in range(SFT_STEPS)]
    return result


def test_two_data_parallel_ranks_and_the_followers_calls(dp2):
    _, results = dp2
    assert [r["dp"] for r in results] == [(0, 2), (1, 2)]
    # rank 1 made each of rank 0's calls: logprobs, train_step, hf_weights, 8 sft steps, save, save_distributed
    assert results[1]["calls"] == 4 + SFT_STEPS + 1


def test_logprobs_loss_and_gradients_match_one_process(dp2, single):
    _, results = dp2
    torch.testing.assert_close(results[0]["old_logprobs"], single["old_logprobs"], rtol=1e-5, atol=1e-5)
    metrics = results[0]["metrics"]
    assert metrics["loss"] == pytest.approx(single["metrics"]["loss"], rel=1e-5, abs=1e-7)
    assert metrics["grad_norm"] == pytest.approx(single["metrics"]["grad_norm"], rel=1e-4)
    assert single["metrics"]["grad_norm"] > 0.5  # clipping was in play
    for name, grad in single["grads"].items():
        torch.testing.assert_close(results[0]["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_exported_weights_match_one_process(dp2, single):
    """As in the TP test: tight where the gradient is well above the summation noise, within AdamW's step elsewhere."""
    _, results = dp2
    trained, grads = results[0]["trained"], single["grads"]
    stable_weights = 0
    for name, tensor in single["trained"].items():
        stable = grads[name].abs() > 1e-5
        torch.testing.assert_close(trained[name][stable], tensor[stable], rtol=1e-4, atol=2e-6, msg=name)
        assert (trained[name] - tensor).abs().max() <= 2 * LR * 1.001, name
        stable_weights += int(stable.sum())
    assert stable_weights > 0.9 * sum(t.numel() for t in trained.values())


def test_a_short_data_parallel_run_learns_as_one_process_does(dp2, single):
    losses = dp2[1][0]["sft_losses"]
    assert losses[-1] < 0.8 * losses[0], losses
    for dp_loss, one_loss in zip(losses, single["sft_losses"], strict=True):
        assert dp_loss == pytest.approx(one_loss, rel=2e-3)


def test_the_hf_export_is_written_once_and_loads(dp2):
    out, results = dp2
    exported = read_hf_state_dict(out / "dp" / "hf")
    assert (out / "dp" / "hf" / "config.json").is_file()
    assert sorted(exported) == sorted(results[0]["trained"])


def test_resuming_the_sharded_state_takes_the_same_next_step(dp2):
    _, results = dp2
    for result in results:
        assert result["resumed_version"] == 1 + SFT_STEPS
        for name, tensor in result["next_live"].items():
            assert torch.equal(result["next_resumed"][name], tensor), name
    for name, tensor in results[0]["next_live"].items():
        assert torch.equal(results[1]["next_live"][name], tensor), name  # the replicas stayed identical
