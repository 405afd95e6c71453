"""Weight updates end to end: real rollout servers (vLLM on the tiny model), real pushes over gRPC and raw TCP.

Three servers are started once for the session (tests/conftest.py rollout_cluster, shared with test_collective, the
reliability and the client tests). Each test pushes a new version (the serving one + 1) and checks what the servers
then generate against transformers' greedy output on the checkpoint that was pushed.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch

from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from fabric.weights.manifest import TORCH_TO_PROTO
from fabric.weights.sender import WeightSource, push_weights
from fabric.weights.transports import tcp
from tests.servers import MAX_NEW, PROMPTS

pytestmark = pytest.mark.slow


@pytest.fixture
def servers(cluster) -> list[str]:
    """The session's three rollout servers, by address."""
    return cluster.addresses


def stub(address: str):
    return rollout_pb2_grpc.RolloutServiceStub(grpc.insecure_channel(address))


def greedy(address: str) -> tuple[list[list[int]], set[int]]:
    requests = [
        rollout_pb2.GenerateRequest(
            request_id=str(i), prompt=p, sampling=rollout_pb2.SamplingParams(max_new_tokens=MAX_NEW, temperature=0)
        )
        for i, p in enumerate(PROMPTS)
    ]
    responses = list(stub(address).Generate(iter(requests), timeout=60))
    assert all(not r.HasField("error") for r in responses), responses
    by_id = {r.request_id: r for r in responses}
    return [list(by_id[str(i)].token_ids) for i in range(len(PROMPTS))], {r.weight_version for r in responses}


def status(address: str) -> rollout_pb2.GetWeightsStatusResponse:
    return stub(address).GetWeightsStatus(rollout_pb2.GetWeightsStatusRequest(), timeout=10)


def next_version(*addresses: str) -> int:
    return max(status(a).serving_version for a in addresses) + 1


def push(source, targets, **kwargs):
    return asyncio.run(push_weights(source, targets, **kwargs))


def test_push_weights_cli_switches_a_server_to_the_new_checkpoint(servers, tiny_model, tiny_model_b, reference):
    target = servers[0]
    assert push(WeightSource.from_hf_checkpoint(tiny_model), [target], transport="grpc").ok  # whatever ran before
    assert greedy(target)[0] == reference["a"]
    version = next_version(target)
    out = subprocess.run(
        [sys.executable, "-m", "fabric.cli", "push-weights", "--checkpoint", tiny_model_b, "--target", target],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    figures = re.search(r"bytes=(\d+) sent=(\d+) seconds=([\d.]+) GB/s=([\d.]+) version=(\d+) ok=True", out.stdout)
    assert figures, out.stdout
    assert int(figures.group(5)) == version and int(figures.group(1)) > 1_000_000
    tokens, versions = greedy(target)
    assert tokens == reference["b"] and versions == {version}
    assert status(target).serving_version == version and status(target).staged_version == 0


@pytest.mark.parametrize("transport", ["grpc", "tcp"])
def test_relay_chain_brings_three_servers_to_one_version(servers, tiny_model, tiny_model_b, reference, transport):
    for checkpoint, expected in ((tiny_model_b, "b"), (tiny_model, "a")):
        source = WeightSource.from_hf_checkpoint(checkpoint, chunk_bytes=256 * 1024)
        version = next_version(*servers)
        report = push(source, servers, version=version, transport=transport)
        assert report.mode == "relay" and report.ok, report.failed
        assert [r.server for r in report.results] == servers
        assert report.bytes_sent == source.total_bytes  # the sender paid one copy for three servers
        for address in servers:
            tokens, versions = greedy(address)
            assert tokens == reference[expected] and versions == {version}, address


def test_repeated_version_is_idempotent_and_older_one_refused(servers, tiny_model):
    target = servers[1]
    source = WeightSource.from_hf_checkpoint(tiny_model)
    version = next_version(target)
    assert push(source, [target], version=version, transport="grpc").ok
    again = push(source, [target], version=version, transport="grpc")
    assert again.ok and again.results[0].already_committed and again.bytes_sent == 0
    # Sent anyway (bypassing the sender's status check), a repeat answers already_committed too.
    header = rollout_pb2.UpdateWeightsHeader(weight_version=version, manifest=source.manifest)
    response = stub(target).UpdateWeights(iter([rollout_pb2.UpdateWeightsRequest(header=header)]), timeout=30)
    assert response.results[0].already_committed
    header.weight_version = version - 1
    with pytest.raises(grpc.RpcError) as err:
        stub(target).UpdateWeights(iter([rollout_pb2.UpdateWeightsRequest(header=header)]), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"older than the serving version {version}" in err.value.details()


def _requests(source: WeightSource, version: int, mutate_manifest=None, mutate_chunk=None):
    manifest = type(source.manifest)()
    manifest.CopyFrom(source.manifest)
    if mutate_manifest:
        mutate_manifest(manifest)
    yield rollout_pb2.UpdateWeightsRequest(
        header=rollout_pb2.UpdateWeightsHeader(weight_version=version, manifest=manifest)
    )
    for i in range(len(source.manifest.chunks)):
        chunk = source.chunk_meta(i)
        chunk.data = source.chunk_view(i).tobytes()
        if mutate_chunk:
            mutate_chunk(i, chunk)
        yield rollout_pb2.UpdateWeightsRequest(chunk=chunk)


def _flip_crc(i, chunk):
    if i == 3:
        chunk.crc32c ^= 1


def _overlong(i, chunk):
    if i == 5:
        chunk.data += b"\0" * 8


def _rename(manifest):
    manifest.tensors[1].name = "model.layers.0.self_attn.q_proj.weights"


def _reshape(manifest):
    manifest.tensors[2].shape[0] += 1


BAD_INPUTS = {
    "checksum": (None, _flip_crc, "checksum mismatch in chunk 3 of tensor"),
    "unknown tensor": (_rename, None, "'model.layers.0.self_attn.q_proj.weights' is not a parameter"),
    "shape": (_reshape, None, "has shape"),
    "chunk past the end": (None, _overlong, "past the tensor's end"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_updates_are_refused_and_the_old_version_keeps_serving(servers, tiny_model, case):
    target = servers[2]
    before_tokens, before_versions = greedy(target)
    serving = status(target).serving_version
    source = WeightSource.from_hf_checkpoint(tiny_model, chunk_bytes=64 * 1024)
    mutate_manifest, mutate_chunk, needle = BAD_INPUTS[case]
    with pytest.raises(grpc.RpcError) as err:
        stub(target).UpdateWeights(_requests(source, serving + 1, mutate_manifest, mutate_chunk), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    assert re.search(r"'model\.[\w.]+'", err.value.details()), "the message names the tensor"
    after = status(target)
    assert after.serving_version == serving and after.staged_version == 0  # staged version dropped
    assert greedy(target) == (before_tokens, before_versions)


def test_wrong_dtype_is_refused_naming_the_tensor(servers, tiny_model):
    target = servers[2]
    serving = status(target).serving_version
    source = WeightSource.from_hf_checkpoint(tiny_model, dtype=torch.float16)
    with pytest.raises(grpc.RpcError) as err:
        stub(target).UpdateWeights(_requests(source, serving + 1), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.embed_tokens.weight" in err.value.details() and "float32" in err.value.details().lower()
    assert TORCH_TO_PROTO[torch.float16] == source.manifest.tensors[0].dtype


def _wait_staged(target: str, at_least: int, timeout: float = 30.0) -> rollout_pb2.GetWeightsStatusResponse:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = status(target)
        if len(current.staged_chunk_indices) >= at_least:
            return current
        time.sleep(0.1)
    raise AssertionError(f"never staged {at_least} chunks: {status(target)}")


def test_grpc_stream_killed_halfway_leaves_old_version_and_resumes(servers, tiny_model_b, tiny_model, reference):
    target = servers[1]
    push(WeightSource.from_hf_checkpoint(tiny_model), [target], transport="grpc")
    before = greedy(target)
    source = WeightSource.from_hf_checkpoint(tiny_model_b, chunk_bytes=64 * 1024)
    version = next_version(target)
    half = len(source.manifest.chunks) // 2
    requests = list(_requests(source, version))[: 1 + half]

    def stalled():
        yield from requests
        time.sleep(60)  # the sender "dies" here: the test cancels the call

    call = stub(target).UpdateWeights.future(stalled(), timeout=120)
    partial = _wait_staged(target, half)
    call.cancel()
    assert partial.staged_version == version and partial.total_chunks == len(source.manifest.chunks)
    assert partial.serving_version == version - 1
    assert greedy(target) == before  # the old version serves, untouched
    report = push(source, [target], version=version, transport="grpc")
    assert report.ok
    assert report.bytes_sent < source.total_bytes * 0.75  # only the missing chunks went out
    tokens, versions = greedy(target)
    assert tokens == reference["b"] and versions == {version}


def test_tcp_connection_cut_halfway_leaves_old_version_and_resumes(servers, tiny_model_b, tiny_model, reference):
    target = servers[0]
    push(WeightSource.from_hf_checkpoint(tiny_model), [target], transport="tcp")
    before = greedy(target)
    source = WeightSource.from_hf_checkpoint(tiny_model_b, chunk_bytes=64 * 1024)
    version = next_version(target)
    half = len(source.manifest.chunks) // 2
    port = status(target).tcp_data_port
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(tcp.MAGIC)
        tcp.send_frame(sock, b"")
        header = rollout_pb2.UpdateWeightsHeader(weight_version=version, manifest=source.manifest)
        tcp.send_frame(sock, rollout_pb2.UpdateWeightsRequest(header=header).SerializeToString())
        for i in range(half):
            tcp.send_frame(sock, source.chunk_meta(i).SerializeToString())
            sock.sendall(source.chunk_view(i))
        _wait_staged(target, half)
    # connection closed without the end frame: a broken transfer
    time.sleep(0.5)
    partial = status(target)
    assert partial.staged_version == version and len(partial.staged_chunk_indices) == half
    assert greedy(target) == before
    report = push(source, [target], version=version, transport="tcp")
    assert report.ok and report.bytes_sent < source.total_bytes * 0.75
    tokens, versions = greedy(target)
    assert tokens == reference["b"] and versions == {version}


def test_a_partial_newer_version_left_by_a_dead_sender_does_not_lock_the_server_out(servers, tiny_model, reference):
    """A trainer dies halfway through pushing version v+5 and a restarted one counts from the serving version: v+1.
    While a stream still feeds v+5, the older v+1 is refused; once none does, v+1 replaces the stranded partial."""
    target = servers[1]
    source = WeightSource.from_hf_checkpoint(tiny_model, chunk_bytes=64 * 1024)
    serving = status(target).serving_version
    stranded = serving + 5
    hold = threading.Event()

    def header_and_two_chunks_then_hang():
        requests = _requests(source, stranded)
        yield from (next(requests) for _ in range(3))
        hold.wait(60)

    call = stub(target).UpdateWeights.future(header_and_two_chunks_then_hang(), timeout=120)
    try:
        deadline = time.monotonic() + 30
        while len(status(target).staged_chunk_indices) < 2:
            assert time.monotonic() < deadline, status(target)
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as err:
            stub(target).UpdateWeights(_requests(source, serving + 1), timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"version {stranded} is arriving now" in err.value.details()
    finally:
        call.cancel()  # the first sender dies
        hold.set()
    assert status(target).staged_version == stranded  # kept: its sender could still come back and resume it

    deadline = time.monotonic() + 20
    while not (report := push(source, [target], version=serving + 1, transport="grpc")).ok:
        assert time.monotonic() < deadline, report.failed  # until the server has seen the stream end
        time.sleep(0.2)
    after = status(target)
    assert after.serving_version == serving + 1 and after.staged_version == 0
    assert greedy(target) == (reference["a"], {serving + 1})


def test_a_commit_that_fails_inside_vllm_ends_the_update_and_the_previous_version_keeps_serving(
    cluster, servers, tiny_model, tiny_model_b, reference
):
    """The staged version's file vanishes before its commit (a tmp cleaner wiping /dev/shm, say), so vLLM's worker
    fails inside the update. The update must be ended in the engine (else the next one is refused as "already
    active" and the engine dies later), the previous version must serve on, and the next push must succeed."""
    target = servers[2]
    assert push(WeightSource.from_hf_checkpoint(tiny_model), [target], transport="tcp").ok
    serving = status(target).serving_version
    source = WeightSource.from_hf_checkpoint(tiny_model_b, chunk_bytes=64 * 1024)
    total = len(source.manifest.chunks)
    requests = list(_requests(source, serving + 1))[:total]  # the header and all chunks but the last

    def all_but_last():
        yield from requests
        time.sleep(60)  # the sender "dies" here: the test cancels the call

    call = stub(target).UpdateWeights.future(all_but_last(), timeout=120)
    _wait_staged(target, total - 1)
    call.cancel()
    # The staged file is the one holding the new checkpoint's first chunk (the serving one holds the old weights;
    # the staged version may reuse a spare file of the same layout, so it need not be a new file).
    first = source.chunk_view(0).tobytes()
    (staged_file,) = [f for f in cluster.staging[target].iterdir() if f.read_bytes()[: len(first)] == first]
    staged_file.unlink()

    failed = push(source, [target], version=serving + 1, transport="grpc")  # sends the last chunk: commit
    assert not failed.ok
    (result,) = failed.results
    assert result.error.reason == "COMMIT_FAILED", result
    assert f"version {serving} restored and serving" in result.error.message
    assert status(target).serving_version == serving
    assert greedy(target) == (reference["a"], {serving})

    retried = push(source, [target], version=serving + 1, transport="tcp")
    assert retried.ok, retried.failed
    assert greedy(target) == (reference["b"], {serving + 1})
