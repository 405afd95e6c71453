"""megatron's parallel state is per process: initialize it once for the trainer tests. `env`: the loop's tests over
fake rollout servers (staging files under the test's folder, rewards scored in process)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def megatron():
    from fabric.trainer.compat import init_megatron

    init_megatron(tp=1, pp=1, seed=1234)


@pytest.fixture
def env(tmp_path, monkeypatch):
    from fabric.trainer import loop as loop_module
    from tests.trainer.test_async import InProcessRewards

    monkeypatch.setenv("FABRIC_SHM_DIR", str(tmp_path))
    monkeypatch.setattr(loop_module, "RewardPool", InProcessRewards)
    return tmp_path
