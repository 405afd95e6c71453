"""A checkpoint saved by the Policy loads in vLLM and decodes exactly as transformers does on it; vLLM's logprobs of
sampled tokens at temperature 0.7 match the trainer's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fabric.tasks import arithmetic
from fabric.trainer.policy import OptimConfig, Policy, TrainBatch
from fabric.trainer.sft import GreedyEvaluator, sft_warmup

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(megatron, tiny_model, tmp_path_factory):
    """A policy after a short supervised warm-up (not noise: its distributions are peaked) and its checkpoint."""
    rows = list(arithmetic.examples(seed=0))
    policy = Policy.from_hf(tiny_model, OptimConfig(lr=1e-5))
    sft_warmup(policy, [(r["prompt"], r["response"]) for r in rows[16:]], steps=20, batch_size=32, lr=3e-3)
    return policy, policy.save(tmp_path_factory.mktemp("trained") / "ckpt"), [r["prompt"] for r in rows[:16]]


@pytest.fixture(scope="module")
def decoded(trained):
    """The checkpoint's greedy completions and samples at temperature 0.7, from one vLLM engine."""
    _, checkpoint, prompts = trained
    return run_vllm("vllm_decode.py", [str(checkpoint), "12", "0.7"], prompts)


def run_vllm(script: str, args: list[str], prompts: list[str]):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(script)), *args],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        env=env,
        timeout=420,  # one engine start, then greedy and sampled decoding: minutes on a loaded 2-core host
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("FABRIC_RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[0].removeprefix("FABRIC_RESULT "))


def test_trained_checkpoint_greedy_output_equals_in_vllm_and_transformers(trained, decoded):
    policy, _, prompts = trained
    expected = GreedyEvaluator(policy, max_new_tokens=12).generate(prompts)
    assert sum(arithmetic.extract_answer(text) is not None for text in expected) >= 12  # trained: not noise
    assert decoded["greedy"] == expected


def test_rollout_logprobs_match_the_trainers_at_temperature_0_7(trained, decoded):
    """vLLM's processed logprobs (the fabric's logprobs_mode) are the sampled distribution's, after temperature:
    they match the trainer's logprobs at the same temperature. vLLM's default raw logprobs are the temperature-1
    ones, which the trainer's at T = 1 reproduce: against the trainer at T = 0.7 they differ far more."""
    policy = trained[0]
    got = decoded
    assert got["mode"] == "processed_logprobs"
    rows = got["rows"]
    batch = TrainBatch.from_token_lists([r["prompt"] for r in rows], [r["tokens"] for r in rows], pad_id=0)
    rollout = torch.zeros(batch.input_ids.shape)
    for k, row in enumerate(rows):
        rollout[k, len(row["prompt"]) : len(row["prompt"]) + len(row["tokens"])] = torch.tensor(row["logprobs"])
    mask = batch.response_mask.bool()
    trainer = {}
    for temperature in (0.7, 1.0):
        policy.loss.temperature = temperature
        trainer[temperature] = policy.logprobs(batch)
    processed_gap = float((rollout - trainer[0.7]).abs()[mask].mean())
    raw_gap = float((trainer[1.0] - trainer[0.7]).abs()[mask].mean())  # what raw logprobs would have shown
    assert processed_gap < 1e-3, processed_gap
    assert raw_gap > 0.05 and raw_gap > 50 * processed_gap, (raw_gap, processed_gap)
