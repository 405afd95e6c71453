"""Servers shared by the reliability tests, started once per session: the session's three rollout servers (vLLM on
the tiny model; tests/conftest.py rollout_cluster, shared with the weight and client tests) and one reward server
(rule scorers), each the real `fabric serve` CLI in its own process group.

Tests may kill and restart a rollout server: `rollout_servers` is the cluster's mutable list of ServerProcess, and
`rollout_cluster.restart(i, port)` puts a new process in the dead one's place (same port), so teardown stops
whatever is running at the end.
"""

from __future__ import annotations

import grpc
import pytest

from fabric.procs import ServerProcess
from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from tests.references import hf_greedy
from tests.servers import MAX_NEW, PROMPTS

REWARD_CONFIG = """\
rewards:
  math:
    worker_cls: math_rule
    infer_batch_size: 16
    timeout_s: 2.0
  answer_tag:
    worker_cls: answer_tag
    infer_batch_size: 32
    max_input_chars: 4096
  crashy:
    worker_cls: tests.reward.plugin_scorers.CrashOnMarkerScorer
    infer_batch_size: 8
    batch_wait_ms: 20
"""


@pytest.fixture(scope="session")
def rollout_servers(rollout_cluster):
    return rollout_cluster.procs


@pytest.fixture(scope="session")
def reward_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "reward.yaml"
    path.write_text(REWARD_CONFIG)
    proc = ServerProcess("reward", path, name="reward")
    proc.start()
    proc.wait_ready(timeout=180)
    yield proc
    proc.stop(grace=10)


@pytest.fixture(scope="session")
def reference(tiny_model, tiny_model_b) -> dict[str, list[list[int]]]:
    """Greedy outputs by checkpoint directory."""
    refs = {m: hf_greedy(m, PROMPTS, MAX_NEW) for m in (tiny_model, tiny_model_b)}
    assert refs[tiny_model] != refs[tiny_model_b], "the two checkpoints must be told apart by their outputs"
    return refs


def stub(address: str) -> rollout_pb2_grpc.RolloutServiceStub:
    return rollout_pb2_grpc.RolloutServiceStub(grpc.insecure_channel(address))


def greedy(address: str) -> tuple[list[list[int]], set[int]]:
    """The server's greedy output on PROMPTS and the weight versions that produced it."""
    requests = [
        rollout_pb2.GenerateRequest(
            request_id=str(i), prompt=p, sampling=rollout_pb2.SamplingParams(max_new_tokens=MAX_NEW, temperature=0)
        )
        for i, p in enumerate(PROMPTS)
    ]
    with grpc.insecure_channel(address) as channel:
        responses = list(rollout_pb2_grpc.RolloutServiceStub(channel).Generate(iter(requests), timeout=60))
    assert all(not r.HasField("error") for r in responses), responses
    by_id = {r.request_id: r for r in responses}
    return [list(by_id[str(i)].token_ids) for i in range(len(PROMPTS))], {r.weight_version for r in responses}


def weights_status(address: str) -> rollout_pb2.GetWeightsStatusResponse:
    with grpc.insecure_channel(address) as channel:
        return rollout_pb2_grpc.RolloutServiceStub(channel).GetWeightsStatus(
            rollout_pb2.GetWeightsStatusRequest(), timeout=10
        )


def server_info(address: str) -> rollout_pb2.RolloutServiceGetServerInfoResponse:
    with grpc.insecure_channel(address) as channel:
        return rollout_pb2_grpc.RolloutServiceStub(channel).GetServerInfo(
            rollout_pb2.RolloutServiceGetServerInfoRequest(), timeout=10
        )
