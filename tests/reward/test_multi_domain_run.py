"""`fabric run` on examples/multi_domain.yaml (math + ifeval + code + judge), shortened, on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.servers import ROOT


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 150 s on a quiet 2-core host; vLLM's start alone can take minutes when it is busy
@pytest.mark.skipif(os.geteuid() != 0, reason="the code reward's sandbox needs root")
def test_the_multi_domain_example_runs_end_to_end(tmp_path):
    # 2 rows per domain, 8 prompts a step: every step samples every domain, so every reward scores in each step
    overrides = [f"output_dir={tmp_path}", "max_steps=2", "sft_warmup.steps=2", "task.per_domain=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fabric.cli", "run", "--config", "examples/multi_domain.yaml", *overrides],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output = proc.communicate(timeout=1100)[0]
    except subprocess.TimeoutExpired:
        proc.terminate()  # the launcher stops its servers on SIGTERM
        output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(row["samples"] == 32 for row in rows)
    for row in rows:  # each domain's reward in the metrics (and so in the plot), a domain per reward
        assert {f"reward/{d}" for d in ("math", "ifeval", "code", "judge")} <= set(row["extra"]), row["extra"]
    assert (tmp_path / "metrics.png").stat().st_size > 0
    tags = [json.loads(line)["tag"] for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert sorted(tags) == sorted(["math", "ifeval", "KodCode", "RLVR"] * 2)
    # the launcher gave the judge the run's rollout server (judge_address: actor_infer)
    reward_log = (tmp_path / "logs" / "reward-0.log").read_text()
    assert "reward 'judge' ready" in reward_log and "LLM judge at 127.0.0.1:" in reward_log
    assert "reward 'code' ready" in reward_log and "reward 'ifeval' ready" in reward_log
