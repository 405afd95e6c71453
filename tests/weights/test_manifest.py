"""Chunk planning, manifest checks and staging: the pure parts of a weight update."""

from __future__ import annotations

import grpc
import pytest
import torch

from fabric.errors import FabricError
from fabric.v1 import rollout_pb2
from fabric.weights import manifest as mf
from fabric.weights.sender import WeightSource, needed_chunks
from fabric.weights.staging import StagingBuffer, tensors_from_update_info


def _named():
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(10, 7, generator=g)),
        ("b.bias", torch.randn(3, generator=g).to(torch.bfloat16)),
        ("c.weight", torch.randn(64, 64, generator=g)),
    ]


def test_chunks_cover_every_tensor_exactly_once():
    source = WeightSource(_named(), chunk_bytes=1000)
    covered = {}
    for spec in source.manifest.chunks:
        covered.setdefault(spec.tensor_index, []).append((spec.offset, spec.length))
        assert 0 < spec.length <= 1000
    for index, tensor in enumerate(source.tensors):
        spans = sorted(covered[index])
        assert spans[0][0] == 0 and sum(n for _, n in spans) == tensor.numel() * tensor.element_size()
        assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:], strict=False))
    assert source.manifest.total_bytes == sum(t.numel() * t.element_size() for _, t in _named())
    # views are the tensors' own bytes, reassembled they give the tensor back
    joined = b"".join(
        source.chunk_view(i).tobytes() for i, s in enumerate(source.manifest.chunks) if s.tensor_index == 2
    )
    assert torch.equal(torch.frombuffer(bytearray(joined), dtype=torch.float32).reshape(64, 64), _named()[2][1])


def test_digest_is_stable_and_changes_with_layout():
    a = WeightSource(_named(), chunk_bytes=1000)
    b = WeightSource(_named(), chunk_bytes=1000)
    c = WeightSource(_named(), chunk_bytes=2000)
    assert a.digest == b.digest != c.digest


def _expected():
    return {name: (tuple(t.shape), t.dtype) for name, t in _named()}


@pytest.mark.parametrize(
    "mutate, reason, needle",
    [
        (lambda m: setattr(m.tensors[0], "name", "a.wieght"), "UNKNOWN_TENSOR", "did you mean 'a.weight'"),
        (lambda m: m.tensors[2].shape.__setitem__(0, 32), "SHAPE_MISMATCH", "c.weight"),
        (lambda m: setattr(m.tensors[0], "dtype", mf.TORCH_TO_PROTO[torch.float16]), "DTYPE_MISMATCH", "a.weight"),
        (lambda m: setattr(m.chunks[-1], "length", m.chunks[-1].length + 4), "CHUNK_OUT_OF_BOUNDS", "c.weight"),
        (lambda m: m.tensors.pop(), "MISSING_TENSORS", "c.weight"),
    ],
)
def test_manifest_refusals_name_the_tensor(mutate, reason, needle):
    manifest = WeightSource(_named(), chunk_bytes=1000).manifest
    mutate(manifest)
    if reason == "MISSING_TENSORS":
        del manifest.chunks[:]
    with pytest.raises(FabricError) as err:
        mf.check_manifest(manifest, _expected())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.reason == reason and needle in err.value.message


def test_optional_tied_head_may_be_absent():
    expected = {**_expected(), "lm_head.weight": ((10, 7), torch.float32)}
    manifest = WeightSource(_named()).manifest
    mf.check_manifest(manifest, expected, optional=frozenset({"lm_head.weight"}))
    with pytest.raises(FabricError):
        mf.check_manifest(manifest, expected)


def test_staging_file_maps_back_to_the_same_tensors():
    named = _named()
    buffer = StagingBuffer.from_named_tensors(named)
    try:
        for (name, tensor), (name2, mapped) in zip(named, tensors_from_update_info(buffer.update_info()), strict=True):
            assert name == name2 and mapped.dtype == tensor.dtype and torch.equal(mapped, tensor)
    finally:
        buffer.close()


def test_resume_sends_only_the_missing_chunks():
    source = WeightSource(_named(), chunk_bytes=1000)
    n = len(source.manifest.chunks)
    partial = rollout_pb2.GetWeightsStatusResponse(
        staged_version=3, staged_manifest_digest=source.digest, staged_chunk_indices=range(0, n, 2), total_chunks=n
    )
    assert needed_chunks(source, 3, [partial]) == list(range(1, n, 2))
    other_digest = rollout_pb2.GetWeightsStatusResponse(staged_version=3, staged_manifest_digest="x")
    assert needed_chunks(source, 3, [partial, other_digest]) is None  # someone needs everything
    assert needed_chunks(source, 4, [partial]) is None  # a different version starts over
