"""One reward server for the reward tests: the real CLI (`fabric serve reward`) in a subprocess, started once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import serve

CONFIG = Path(__file__).resolve().parent / "reward_config.yaml"
# Overrides on top of reward_config.yaml: a plugin scorer by dotted path, and a small char limit to test.
OVERRIDES = ["rewards.crashy.worker_cls=tests.reward.plugin_scorers.CrashOnMarkerScorer",
             "rewards.crashy.infer_batch_size=8", "rewards.crashy.batch_wait_ms=50",
             "rewards.flaky.worker_cls=tests.reward.plugin_scorers.FailsFirstTimeScorer",
             "rewards.answer_tag.max_input_chars=1000"]  # fmt: skip


@pytest.fixture(scope="session")
def reward_server():
    server = serve("reward", CONFIG, OVERRIDES)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rlvr_reward_server():
    """ifeval and code_sandbox (ROLL's class names) on one server."""
    server = serve("reward", Path(__file__).resolve().parent / "rlvr_rewards.yaml")
    yield server
    server.stop()
