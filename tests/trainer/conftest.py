"""megatron's parallel state is per process: initialize it once for the trainer tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def megatron():
    from fabric.trainer.compat import init_megatron

    init_megatron(tp=1, pp=1, seed=1234)
