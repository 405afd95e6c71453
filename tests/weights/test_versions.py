"""The weight receiver's version state machine and transport negotiation, on a RolloutService over the fake engine
(tests/rollout/fake_engine.py) in the test's event loop: real gRPC, real raw-TCP data plane, real staging files,
real sender; only the model load is the fake's (it fingerprints what the staging file holds)."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
import torch

from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from fabric.weights import manifest as mf
from fabric.weights.sender import WeightSource, push_weights, weights_status
from tests.rollout.fake_engine import FakeEngine, fingerprint, tiny_hf_config
from tests.rollout.test_servicer import fake_server


def checkpoint(seed: int) -> dict[str, torch.Tensor]:
    """Every parameter of the fake engine's model, seeded."""
    generator = torch.Generator().manual_seed(seed)
    expected = mf.expected_from_hf_config(tiny_hf_config(), torch.float32)
    return {name: torch.randn(shape, generator=generator) for name, (shape, _) in expected.items()}


def source(seed: int, chunk_bytes: int = 512) -> WeightSource:
    return WeightSource(checkpoint(seed).items(), chunk_bytes=chunk_bytes)


@pytest.fixture
def shm(tmp_path, monkeypatch):
    """Staging files go to a directory of the test's own, so it can see every one of them."""
    monkeypatch.setenv("FABRIC_SHM_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("transport", ["grpc", "tcp", "auto"])
def test_a_push_commits_one_version_and_reports_its_path(shm, transport):
    async def go():
        async with fake_server() as (client, _, engine):
            before = await weights_status(client.address)
            report = await push_weights(source(1), [client.address], transport=transport)
            return before, report, engine, await weights_status(client.address)

    before, report, engine, after = asyncio.run(go())
    assert [o.name for o in before.transports] == ["tcp", "grpc"] and before.transports[0].port
    assert report.ok and after.serving_version == 1 == engine.weight_version
    assert engine.weights == fingerprint(checkpoint(1).items())
    (result,) = report.results
    chosen = "tcp" if transport == "auto" else transport
    assert result.transport == chosen and report.transport == chosen
    assert result.transport_reason.startswith("auto: the best" if transport == "auto" else f"requested {transport}")


def test_a_path_the_server_does_not_offer_falls_back_and_says_why(shm):
    async def go():
        async with fake_server() as (client, _, engine):
            return await push_weights(source(1), [client.address], transport="nccl"), engine

    report, engine = asyncio.run(go())
    (result,) = report.results
    assert report.ok and engine.weight_version == 1 and result.transport == "tcp"
    assert "requested nccl but the server does not offer nccl (offers tcp, grpc): fell back to tcp" in (
        result.transport_reason
    )


def test_a_broken_stream_leaves_a_resumable_version_and_the_resume_sends_only_what_is_missing(shm):
    weights = source(2)
    total = len(weights.manifest.chunks)

    async def go():
        async with fake_server() as (client, _, engine):
            stub = rollout_pb2_grpc.RolloutServiceStub(client.channel)
            header = rollout_pb2.UpdateWeightsHeader(weight_version=1, manifest=weights.manifest, transport="grpc")

            async def half():
                yield rollout_pb2.UpdateWeightsRequest(header=header)
                for i in range(total // 2):
                    chunk = weights.chunk_meta(i)
                    chunk.data = weights.chunk_view(i).tobytes()
                    yield rollout_pb2.UpdateWeightsRequest(chunk=chunk)
                await asyncio.sleep(30)  # the sender "dies" here

            call = stub.UpdateWeights(half(), timeout=60)
            status = await weights_status(client.address)
            while len(status.staged_chunk_indices) < total // 2:
                await asyncio.sleep(0.01)
                status = await weights_status(client.address)
            call.cancel()
            serving_meanwhile = engine.weight_version
            report = await push_weights(weights, [client.address], version=1, transport="grpc")
            return status, serving_meanwhile, report, engine

    partial, serving_meanwhile, report, engine = asyncio.run(go())
    assert partial.staged_version == 1 and partial.total_chunks == total and partial.serving_version == 0
    assert partial.staged_manifest_digest == weights.digest
    assert serving_meanwhile == 0  # nothing commits before every chunk is there
    assert report.ok and engine.weights == fingerprint(checkpoint(2).items())
    half_bytes = sum(weights.manifest.chunks[i].length for i in range(total // 2))
    assert report.bytes_sent == weights.total_bytes - half_bytes


def test_a_corrupted_chunk_drops_the_staged_version_and_the_old_one_keeps_serving(shm):
    good, bad = source(1), source(2)

    async def go():
        async with fake_server() as (client, _, engine):
            await push_weights(good, [client.address])
            stub = rollout_pb2_grpc.RolloutServiceStub(client.channel)

            async def corrupt():
                yield rollout_pb2.UpdateWeightsRequest(
                    header=rollout_pb2.UpdateWeightsHeader(weight_version=2, manifest=bad.manifest)
                )
                chunk = bad.chunk_meta(0)
                chunk.data = bytes(b ^ 0xFF for b in bad.chunk_view(0).tobytes())
                yield rollout_pb2.UpdateWeightsRequest(chunk=chunk)

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.UpdateWeights(corrupt(), timeout=30)
            return refused.value, await weights_status(client.address), engine

    refused, status, engine = asyncio.run(go())
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "checksum mismatch" in refused.details()
    assert status.serving_version == 1 and status.staged_version == 0
    assert engine.weights == fingerprint(checkpoint(1).items())


def test_a_commit_that_fails_in_the_engine_rolls_back_to_the_serving_version_and_the_next_push_succeeds(shm):
    async def go():
        async with fake_server() as (client, _, engine):
            first = await push_weights(source(1), [client.address])
            engine.fail_next_commits = 1
            failed = await push_weights(source(2), [client.address])
            weights_after_failure = dict(engine.weights)
            version_after_failure = engine.weight_version
            retried = await push_weights(source(2), [client.address])
            return first, failed, weights_after_failure, version_after_failure, retried, engine

    first, failed, after_failure, version_after_failure, retried, engine = asyncio.run(go())
    assert first.ok and not failed.ok and retried.ok
    (result,) = failed.results
    assert result.error.reason == "COMMIT_FAILED" and "version 1 restored and serving" in result.error.message
    # the fake loaded half the layers before failing: the rollback put version 1 back everywhere
    assert after_failure == fingerprint(checkpoint(1).items()) and version_after_failure == 1
    assert engine.commits == [1, 1, 2] and engine.weights == fingerprint(checkpoint(2).items())


def test_two_staging_files_alternate_and_stopping_deletes_them(shm):
    async def go():
        async with fake_server() as (client, servicer, _):
            for seed in (1, 2, 3, 4):
                assert (await push_weights(source(seed), [client.address])).ok
            return sorted(os.listdir(shm))

    during = asyncio.run(go())
    assert len(during) == 2 and all(name.startswith("fabric-weights-") for name in during)
    assert os.listdir(shm) == []


class StagedSource(WeightSource):
    """Takes every tensor as off-host, so CPU tensors go the way GPU tensors go: through the two staging buffers."""

    @staticmethod
    def _off_host(tensor):
        return True


@pytest.mark.parametrize("stage_bytes", [256, 700, 1 << 20])
def test_host_chunks_stage_off_host_tensors_through_two_reused_buffers(stage_bytes):
    plain, staged = source(3, chunk_bytes=256), StagedSource(checkpoint(3).items(), chunk_bytes=256)
    indices = list(range(len(plain.manifest.chunks)))
    direct = [(i, bytes(view)) for i, view in plain.host_chunks(indices)]
    through = [(i, bytes(view)) for i, view in staged.host_chunks(indices, stage_bytes=stage_bytes)]
    assert through == direct
    assert [staged.chunk_meta(i).crc32c for i in indices] == [plain.chunk_meta(i).crc32c for i in indices]
    assert len(staged._pinned) == 2  # both buffers back in the pool, reused by the next push
    again = [(i, bytes(view)) for i, view in staged.host_chunks(indices[::-1], stage_bytes=stage_bytes)]
    assert again == direct[::-1] and len(staged._pinned) == 2


def test_a_sample_that_spans_an_update_reports_the_first_and_last_version_it_ran_under(shm):
    from tests.rollout.test_servicer import collect, request

    async def go():
        async with fake_server(FakeEngine(token_seconds=0.01)) as (client, servicer, engine):
            assert (await push_weights(source(1), [client.address])).ok
            stream = asyncio.ensure_future(collect(client, [request("long", tokens=300), request("short", tokens=1)]))
            while servicer.scheduler.running < 2:
                await asyncio.sleep(0.01)
            while servicer.scheduler.running > 1:  # "short" is done: only "long" is in the engine
                await asyncio.sleep(0.01)
            assert (await push_weights(source(2), [client.address])).ok
            return await stream

    by_id = {r.request_id: r for r in asyncio.run(go())}
    assert (by_id["short"].first_weight_version, by_id["short"].last_weight_version) == (1, 1)
    assert (by_id["long"].first_weight_version, by_id["long"].last_weight_version) == (1, 2)
    assert by_id["long"].weight_version == 1
