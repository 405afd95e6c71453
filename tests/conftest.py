"""Shared fixtures. Heavy things (the tiny model, vLLM engines, servers) are built once per session or module."""

from __future__ import annotations

import os

import pytest

from fabric.procs import become_subreaper

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's worker runs inside its engine-core process, as it does on a GPU with one device: on the CPU platform vLLM
# otherwise spawns it as a third process, and each process pays about 10 s of CPU importing vLLM on this host.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

# Orphans of the servers the tests start (vLLM's resource tracker outlives its server by a moment) are reparented to
# this process and reaped by fabric.procs as it waits for a group to be gone, as `fabric run` does for its own.
become_subreaper()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The tiny Qwen2 model directory (seed 0), built once per test session."""
    from fabric.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0))


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory) -> str:
    """A second checkpoint of the same architecture with different weights (seed 1)."""
    from fabric.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-model-b") / "model", seed=1))


@pytest.fixture(scope="session")
def rollout_cluster(tiny_model, tmp_path_factory):
    """Three rollout servers shared by the client, reliability and weight tests (tests.servers.Cluster): started
    once for the session instead of once per package, as a vLLM engine takes 20-60 s to start here."""
    from tests.servers import Cluster, write_rollout_config

    tmp = tmp_path_factory.mktemp("rollout-cluster")
    cluster = Cluster(write_rollout_config(tiny_model, tmp / "rollout.yaml"), tmp)
    cluster.start(3)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session", autouse=True)
def shared_memory_is_released():
    """Every server the suite starts, its engine processes included, releases its shared memory when it stops:
    /dev/shm ends the session as the session found it."""
    from fabric.shm import orphaned_shm, shm_entries

    before = shm_entries()
    yield
    leaked = orphaned_shm(before)  # reported, not deleted: on a shared host they could be another run's, mid-start
    # fabric.procs notes what a server's group uses while it lives and releases it once the group is gone, stopped
    # or SIGKILLed from outside (test_run, reliability/test_failover, weights/test_collective): nothing is left.
    if leaked:
        pytest.fail(
            f"the suite left shared memory in /dev/shm (a server or engine not started through fabric.procs?): "
            f"{leaked}",
            pytrace=False,
        )
