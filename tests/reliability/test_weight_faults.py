"""Weight updates under faults, on the three shared rollout servers: the sender killed mid-push (SIGKILL of the
`fabric push-weights` process, slowed by a throttling proxy so the kill lands halfway) and a relay link cut
mid-chain (a proxy between the second and third hop resets the connection). Afterwards every server serves one
whole version, its greedy output equals transformers' on that version's checkpoint, and the next push heals all.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
import torch

from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from fabric.weights.sender import WeightSource, needed_chunks, push_weights

from .conftest import greedy, weights_status
from .proxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHUNK_BYTES = 16 * 1024  # ~110 chunks for the tiny model: room to land a fault halfway


def source_of(checkpoint: str) -> WeightSource:
    return WeightSource.from_hf_checkpoint(checkpoint, chunk_bytes=CHUNK_BYTES, dtype=torch.float32)


def push(checkpoint: str, targets: list[str], version: int, **kwargs):
    return asyncio.run(push_weights(source_of(checkpoint), targets, version=version, transport="grpc", **kwargs))


def assert_serving(address: str, version: int, checkpoint: str, reference) -> None:
    """One whole version: the status says `version` and the output is that checkpoint's, token for token."""
    status = weights_status(address)
    assert status.serving_version == version, (address, status)
    assert greedy(address) == (reference[checkpoint], {version}), address


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def chain(rollout_servers, tiny_model, reference):
    """The three servers on one baseline version of checkpoint a, whatever earlier tests left."""
    addresses = [p.address for p in rollout_servers]
    baseline = max(weights_status(a).serving_version for a in addresses) + 1
    report = push(tiny_model, addresses, baseline)
    assert report.ok, report.failed
    return addresses


def test_sender_killed_mid_push_leaves_old_version_everywhere_and_resume_heals(
    chain, tiny_model, tiny_model_b, reference
):
    old = weights_status(chain[0]).serving_version
    version = old + 1
    total_chunks = len(source_of(tiny_model_b).manifest.chunks)
    with TcpProxy(chain[0], rate_bytes_per_s=400_000) as slow:  # ~5 s for the whole model: the kill lands mid-way
        cmd = [sys.executable, "-m", "fabric.cli", "push-weights", "--checkpoint", tiny_model_b, "--version",
               str(version), "--transport", "grpc", "--chunk-mib", str(CHUNK_BYTES / 2**20),
               "--target", slow.address, "--target", chain[1], "--target", chain[2]]  # fmt: skip
        sender = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

        def a_third_staged():
            assert sender.poll() is None, "push-weights exited before a third of the chunks arrived"
            status = weights_status(chain[0])
            return (
                status
                if status.staged_version == version and 3 * len(status.staged_chunk_indices) >= total_chunks
                else None
            )

        try:
            staged = wait_for(a_third_staged, timeout=120, what="a third of the chunks to reach the first server")
            os.killpg(sender.pid, signal.SIGKILL)
        finally:
            sender.kill()
            output = sender.communicate(timeout=30)[0].decode()
            print(f"\npush-weights output:\n{output[-2000:]}")  # shown when the test fails
        assert sender.returncode == -signal.SIGKILL, output
        assert len(staged.staged_chunk_indices) < total_chunks, "the push finished before the kill"
    # The broken stream propagates down the chain; every server keeps serving the old version, whole.
    for address in chain:
        status = weights_status(address)
        assert status.serving_version == old and status.staged_version in (0, version), status
        assert_serving(address, old, tiny_model, reference)
    assert weights_status(chain[0]).staged_version == version  # partial, kept for the resume

    # The next push of that version resumes: only chunks some server lacks go out, once, down the chain.
    source = source_of(tiny_model_b)
    missing = needed_chunks(source, version, [weights_status(a) for a in chain])
    report = asyncio.run(push_weights(source, chain, version=version, transport="grpc"))
    assert report.ok, report.failed
    expected_bytes = sum(source.manifest.chunks[i].length for i in missing) if missing is not None else None
    assert report.bytes_sent == (expected_bytes if missing is not None else source.total_bytes)
    for address in chain:
        assert_serving(address, version, tiny_model_b, reference)
        assert weights_status(address).staged_version == 0


def test_relay_link_cut_mid_chain_leaves_whole_versions_and_next_push_heals(chain, tiny_model, tiny_model_b, reference):
    old = weights_status(chain[0]).serving_version
    old_checkpoint = tiny_model_b if greedy(chain[0])[0] == reference[tiny_model_b] else tiny_model
    new_checkpoint = tiny_model if old_checkpoint == tiny_model_b else tiny_model_b
    version = old + 1
    source = source_of(new_checkpoint)
    with TcpProxy(chain[2]) as link:  # the link from the second server to the third goes through here
        link.cut_after(int(source.total_bytes * 0.4))
        report = asyncio.run(
            push_weights(source, [chain[0], chain[1], link.address], version=version, transport="grpc")
        )
        assert report.mode == "relay" and link.cuts == 1
        first, second, third = report.results
        assert first.committed and second.committed and not first.error.code and not second.error.code
        assert not third.committed and third.error.reason == "RELAY_LINK_CUT", third
        assert link.address in third.error.message
        # What the third server had consumed when the link died stays staged (how much depends on its scheduling:
        # bytes in gRPC's buffers but not yet read by the servicer go with the connection).
        stranded = weights_status(chain[2])
        assert stranded.staged_version in (0, version) and len(stranded.staged_chunk_indices) < len(
            source.manifest.chunks
        )
        assert_serving(chain[0], version, new_checkpoint, reference)
        assert_serving(chain[1], version, new_checkpoint, reference)
        assert_serving(chain[2], old, old_checkpoint, reference)

        # The next push of the same version resumes the stranded server with only its missing chunks.
        healed = asyncio.run(push_weights(source, chain, version=version, transport="grpc"))
        assert healed.ok, healed.failed
        assert [r.already_committed for r in healed.results].count(True) == 2
        missing = needed_chunks(source, version, [stranded])  # at most these: it may have staged more since
        at_most = sum(source.manifest.chunks[i].length for i in missing) if missing is not None else source.total_bytes
        assert 0 < healed.bytes_sent <= at_most
        for address in chain:
            assert_serving(address, version, new_checkpoint, reference)

        # And the chain through the restored link carries the following version whole.
        link.restore()
        after = asyncio.run(
            push_weights(source_of(old_checkpoint), [chain[0], chain[1], link.address], version=version + 1,
                         transport="grpc")
        )  # fmt: skip
        assert after.ok, after.failed
        for address in chain:
            assert_serving(address, version + 1, old_checkpoint, reference)


def test_relay_head_lost_mid_push_the_next_server_leads_and_the_rest_commit(chain, tiny_model, tiny_model_b, reference):
    old = weights_status(chain[0]).serving_version
    old_checkpoint = tiny_model_b if greedy(chain[0])[0] == reference[tiny_model_b] else tiny_model
    new_checkpoint = tiny_model if old_checkpoint == tiny_model_b else tiny_model_b
    version = old + 1
    source = source_of(new_checkpoint)
    with socket.socket() as unused:  # a port nothing listens on: a server that is gone before the push starts
        unused.bind(("127.0.0.1", 0))
        gone = f"127.0.0.1:{unused.getsockname()[1]}"
    with TcpProxy(chain[0]) as head:  # the sender's link to the head dies 40% of the way in, and stays down
        head.cut_after(int(source.total_bytes * 0.4))
        report = asyncio.run(push_weights(source, [head.address, chain[1], gone, chain[2]], version=version,
                                          transport="grpc"))  # fmt: skip
    assert report.mode == "relay" and head.cuts == 1
    by_server = {r.server: r for r in report.results}
    assert set(by_server) == {head.address, chain[1], gone, chain[2]}, report.results
    assert not by_server[head.address].committed and by_server[head.address].error.reason == "PUSH_FAILED"
    assert not by_server[gone].committed and by_server[gone].error.reason == "UNREACHABLE"
    assert gone in by_server[gone].error.message
    assert by_server[chain[1]].committed and by_server[chain[2]].committed, report.results
    assert_serving(chain[0], old, old_checkpoint, reference)  # the lost head keeps its whole old version
    assert_serving(chain[1], version, new_checkpoint, reference)
    assert_serving(chain[2], version, new_checkpoint, reference)

    healed = asyncio.run(push_weights(source, chain, version=version, transport="grpc"))
    assert healed.ok, healed.failed
    assert_serving(chain[0], version, new_checkpoint, reference)


def test_relay_hop_that_never_answers_is_reported_and_does_not_stall_the_stream(chain, tiny_model, tiny_model_b,
                                                                                 reference):  # fmt: skip
    """The next hop accepts the TCP connection and never speaks HTTP/2 (a hung host): the head receives faster than
    it can forward, so its relay queue fills and the stream waits on it. When gRPC gives the hop up, the head must
    go on receiving, commit, and report the hop; before the fix it waited on the full queue until the deadline."""
    old = weights_status(chain[0]).serving_version
    checkpoint = tiny_model_b if greedy(chain[0])[0] == reference[tiny_model_b] else tiny_model
    source = source_of(checkpoint)
    assert len(source.manifest.chunks) > 2 * 8, "more chunks than the relay queue holds"
    header = rollout_pb2.UpdateWeightsHeader(weight_version=old + 1, manifest=source.manifest)
    with socket.create_server(("127.0.0.1", 0)) as black_hole:  # the kernel completes handshakes; nobody reads
        hop = f"127.0.0.1:{black_hole.getsockname()[1]}"
        header.relay_targets.append(hop)
        messages = [rollout_pb2.UpdateWeightsRequest(header=header)]
        for i in range(len(source.manifest.chunks)):
            chunk = source.chunk_meta(i)
            chunk.data = source.chunk_view(i).tobytes()
            messages.append(rollout_pb2.UpdateWeightsRequest(chunk=chunk))
        started = time.monotonic()
        with grpc.insecure_channel(chain[0]) as channel:
            response = rollout_pb2_grpc.RolloutServiceStub(channel).UpdateWeights(iter(messages), timeout=90)
        seconds = time.monotonic() - started
    head, lost = response.results
    assert head.committed and not head.error.code, head
    assert not lost.committed and lost.error.reason == "RELAY_LINK_CUT" and hop in lost.error.message, lost
    print(f"\nrelay hop that never answered given up after {seconds:.1f} s; the head committed")
    assert seconds < 30, f"the hung hop held the stream for {seconds:.0f} s (its connection attempt should end in 5)"
    assert_serving(chain[0], old + 1, checkpoint, reference)
    healed = push(checkpoint, chain, old + 1)  # the other servers catch up: the module ends on one version
    assert healed.ok, healed.failed
