"""A checkpoint saved by the Policy loads in vLLM and decodes exactly as transformers does on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fabric.tasks import arithmetic
from fabric.trainer.policy import OptimConfig, Policy
from fabric.trainer.sft import GreedyEvaluator, sft_warmup

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_trained_checkpoint_greedy_output_equals_in_vllm_and_transformers(megatron, tiny_model, tmp_path):
    rows = list(arithmetic.examples(seed=0))
    policy = Policy.from_hf(tiny_model, OptimConfig(lr=1e-5))
    sft_warmup(policy, [(r["prompt"], r["response"]) for r in rows[16:]], steps=20, batch_size=32, lr=3e-3)
    checkpoint = policy.save(tmp_path / "ckpt")
    prompts = [r["prompt"] for r in rows[:16]]
    expected = GreedyEvaluator(policy, max_new_tokens=12).generate(prompts)
    assert sum(arithmetic.extract_answer(text) is not None for text in expected) >= 12  # trained: not noise

    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("vllm_greedy.py")), str(checkpoint), "12"],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("FABRIC_RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    assert json.loads(lines[0].removeprefix("FABRIC_RESULT ")) == expected
