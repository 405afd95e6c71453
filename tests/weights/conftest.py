"""The weight tests (test_collective, test_update) on the session's three rollout servers (tests/conftest.py
rollout_cluster; they stage in directories of their own, so a test can find and sabotage a server's files)."""

from __future__ import annotations

import pytest

from tests.servers import MAX_NEW, PROMPTS


@pytest.fixture(scope="session")
def cluster(rollout_cluster):
    return rollout_cluster


@pytest.fixture(scope="package")
def reference(tiny_model, tiny_model_b) -> dict[str, list[list[int]]]:
    """transformers' greedy output on PROMPTS for checkpoint a (tiny_model) and b (tiny_model_b)."""
    from tests.references import hf_greedy

    return {"a": hf_greedy(tiny_model, PROMPTS, MAX_NEW), "b": hf_greedy(tiny_model_b, PROMPTS, MAX_NEW)}
