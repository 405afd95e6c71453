"""Issue 21, the version store's holds: versions never go backwards, a manifest must tile each tensor, and the
committed bytes match the sender's digests. Real gRPC to a RolloutService over the fake engine (real staging files,
real sender); the attacker speaks UpdateWeights by hand."""

from __future__ import annotations

import asyncio

import grpc

from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from fabric.weights.digest import source_digests
from fabric.weights.sender import push_weights, weights_status
from tests.rollout.fake_engine import fingerprint
from tests.rollout.test_servicer import fake_server
from tests.weights.test_versions import checkpoint, shm, source

__all__ = ["shm"]  # the fixture, used by name


def chunk_message(weights, i: int, data: bytes | None = None) -> rollout_pb2.UpdateWeightsRequest:
    from fabric.weights import manifest as mf

    chunk = weights.chunk_meta(i)
    chunk.data = weights.chunk_view(i).tobytes() if data is None else data
    chunk.crc32c = mf.crc32c(chunk.data)
    return rollout_pb2.UpdateWeightsRequest(chunk=chunk)


def test_an_older_version_finished_after_a_newer_one_committed_is_not_served(shm):
    old, new = source(5), source(6)
    total = len(old.manifest.chunks)

    async def go():
        async with fake_server() as (client, _, engine):
            stub = rollout_pb2_grpc.RolloutServiceStub(client.channel)
            gate = asyncio.Event()

            async def held_open():  # v5: half, then held until v6 has committed, then the rest
                header = rollout_pb2.UpdateWeightsHeader(weight_version=5, manifest=old.manifest, transport="grpc")
                yield rollout_pb2.UpdateWeightsRequest(header=header)
                for i in range(total // 2):
                    yield chunk_message(old, i)
                await gate.wait()
                for i in range(total // 2, total):
                    yield chunk_message(old, i)

            call = stub.UpdateWeights(held_open(), timeout=60)
            status = await weights_status(client.address)
            while status.staged_version != 5 or len(status.staged_chunk_indices) < total // 2:
                await asyncio.sleep(0.01)
                status = await weights_status(client.address)
            report = await push_weights(new, [client.address], version=6, transport="grpc")
            gate.set()
            late = await call
            return report, late, engine, await weights_status(client.address)

    report, late, engine, after = asyncio.run(go())
    assert report.ok
    (result,) = late.results
    assert not result.committed and result.error.reason == "STALE_VERSION", result
    assert after.serving_version == 6 == engine.weight_version
    assert engine.commits == [6] and engine.weights == fingerprint(checkpoint(6).items())


def test_a_manifest_whose_chunks_cover_half_a_tensor_twice_is_refused(shm):
    first, second = source(1, chunk_bytes=1 << 20), source(2, chunk_bytes=1 << 20)

    async def go():
        async with fake_server() as (client, _, engine):
            assert (await push_weights(first, [client.address], version=1, transport="grpc")).ok
            manifest = rollout_pb2.UpdateWeightsHeader(manifest=second.manifest).manifest
            # the biggest tensor: two chunks over its first half (lengths still add up to the tensor's size)
            t = max(range(len(manifest.tensors)), key=lambda i: manifest.tensors[i].nbytes)
            nbytes = manifest.tensors[t].nbytes
            (c,) = [i for i, ch in enumerate(manifest.chunks) if ch.tensor_index == t]
            manifest.chunks[c].length = nbytes // 2
            manifest.chunks.insert(c + 1, manifest.chunks[c])
            half = second._raw(t)[: nbytes // 2].numpy().tobytes()

            async def requests():
                yield rollout_pb2.UpdateWeightsRequest(
                    header=rollout_pb2.UpdateWeightsHeader(weight_version=2, manifest=manifest, transport="grpc")
                )
                for i, spec in enumerate(manifest.chunks):
                    data = half if spec.tensor_index == t else second._raw(spec.tensor_index).numpy().tobytes()
                    from fabric.weights import manifest as mf

                    chunk = rollout_pb2.UpdateWeightsRequest(
                        chunk={"chunk_index": i, "tensor_index": spec.tensor_index, "offset": spec.offset}
                    )
                    chunk.chunk.data = data[spec.offset : spec.offset + spec.length] if spec.tensor_index != t else data
                    chunk.chunk.crc32c = mf.crc32c(chunk.chunk.data)
                    yield chunk

            stub = rollout_pb2_grpc.RolloutServiceStub(client.channel)
            try:
                await stub.UpdateWeights(requests(), timeout=30)
                error = None
            except grpc.aio.AioRpcError as exc:
                error = exc
            return error, engine

    error, engine = asyncio.run(go())
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "CHUNKS_DO_NOT_TILE" in str(error.debug_error_string()) or "exactly once" in error.details()
    assert engine.weight_version == 1 and engine.weights == fingerprint(checkpoint(1).items())


def test_bytes_that_do_not_match_the_senders_digests_do_not_commit(shm):
    honest, other = source(1), source(2)

    async def go():
        async with fake_server() as (client, _, engine):
            header = rollout_pb2.UpdateWeightsHeader(
                weight_version=1, manifest=honest.manifest, transport="grpc", tensor_digests=source_digests(honest)
            )

            async def requests():  # the digests of one version, the (well-checksummed) bytes of another
                yield rollout_pb2.UpdateWeightsRequest(header=header)
                for i in range(len(other.manifest.chunks)):
                    yield chunk_message(other, i)

            stub = rollout_pb2_grpc.RolloutServiceStub(client.channel)
            response = await stub.UpdateWeights(requests(), timeout=30)
            good = await push_weights(honest, [client.address], version=1, transport="grpc")
            return response, good, engine

    response, good, engine = asyncio.run(go())
    (result,) = response.results
    assert not result.committed and result.error.reason == "CONTENT_MISMATCH", result
    assert good.ok and engine.commits == [1] and engine.weights == fingerprint(checkpoint(1).items())
