"""GPU-only checks, run on a CUDA host by `make gpu-check` (skipped elsewhere, with the reason): CUDA IPC pushes
into a real vLLM rollout server on the same GPU serve exactly what transformers computes on the pushed checkpoint,
with the worker loading in place (its recorded copy plan after the first update)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU with CUDA vLLM: runs on a GPU node (make gpu-check)"
)


def test_ipc_pushes_serve_what_transformers_computes(tmp_path):
    from bench import gpu_one

    gpu_one.correctness(tmp_path)
    checks = gpu_one.RESULTS["correctness.ipc"]
    pushes = {k: v for k, v in checks.items() if k.startswith("v")}
    assert all(p["ok"] and p["transport"] == "ipc" and not p["errors"] for p in pushes.values()), pushes
    assert [p["versions"] for p in pushes.values()] == [[1], [2], [3]]
    assert checks["v1_b"]["equals_hf"] and checks["v3_b"]["equals_hf"]  # the first load, then the replayed plan
    assert checks["v2_a"]["equals_initial"]  # back on checkpoint a: what vLLM itself loaded from disk
