"""The manifest of a weight update: which tensors (HF names, dtypes, shapes) and how they are cut into chunks.

Both ends compute from it: the sender plans chunks, the receiver checks names/shapes/dtypes against the model,
bounds-checks every chunk and tells a resume which chunks are still missing. Its digest identifies a version's
layout, so a resumed stream must send the very same manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import crc32c as _crc32c
import torch

from fabric.errors import did_you_mean, invalid
from fabric.v1 import weights_pb2

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024

TORCH_TO_PROTO: dict[torch.dtype, weights_pb2.DType] = {
    torch.float32: weights_pb2.D_TYPE_FLOAT32,
    torch.float16: weights_pb2.D_TYPE_FLOAT16,
    torch.bfloat16: weights_pb2.D_TYPE_BFLOAT16,
    torch.float64: weights_pb2.D_TYPE_FLOAT64,
    torch.int64: weights_pb2.D_TYPE_INT64,
    torch.int32: weights_pb2.D_TYPE_INT32,
    torch.int16: weights_pb2.D_TYPE_INT16,
    torch.int8: weights_pb2.D_TYPE_INT8,
    torch.uint8: weights_pb2.D_TYPE_UINT8,
    torch.bool: weights_pb2.D_TYPE_BOOL,
    torch.float8_e4m3fn: weights_pb2.D_TYPE_FLOAT8_E4M3FN,
    torch.float8_e5m2: weights_pb2.D_TYPE_FLOAT8_E5M2,
}
PROTO_TO_TORCH = {v: k for k, v in TORCH_TO_PROTO.items()}


def crc32c(data) -> int:
    """CRC-32C (hardware-accelerated) of bytes or of any buffer, e.g. a view into the staging file, without a copy."""
    return _crc32c.crc32c(data)


def dtype_name(proto_dtype: int) -> str:
    return weights_pb2.DType.Name(proto_dtype) if proto_dtype in weights_pb2.DType.values() else str(proto_dtype)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def build_manifest(
    specs: Iterable[tuple[str, torch.dtype, Sequence[int]]], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> weights_pb2.WeightManifest:
    """Tensors in the given order; each cut into chunks of at most chunk_bytes (small tensors: one chunk each)."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    manifest = weights_pb2.WeightManifest(checksum="crc32c")
    total = 0
    for index, (name, dtype, shape) in enumerate(specs):
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * element_size(dtype)
        manifest.tensors.append(
            weights_pb2.TensorSpec(name=name, dtype=TORCH_TO_PROTO[dtype], shape=list(shape), nbytes=nbytes)
        )
        for offset in range(0, max(nbytes, 1), chunk_bytes):
            manifest.chunks.append(
                weights_pb2.ChunkSpec(tensor_index=index, offset=offset, length=min(chunk_bytes, nbytes - offset))
            )
        total += nbytes
    manifest.total_bytes = total
    return manifest


def digest(manifest: weights_pb2.WeightManifest) -> str:
    return hashlib.sha256(manifest.SerializeToString(deterministic=True)).hexdigest()[:32]


def check_manifest(
    manifest: weights_pb2.WeightManifest,
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    optional: frozenset[str] = frozenset(),
):
    """Refuses (INVALID_ARGUMENT naming the tensor) anything the serving model cannot take as a whole version."""
    if manifest.checksum not in ("", "crc32c"):
        raise invalid("header.manifest.checksum", f"unsupported checksum {manifest.checksum!r}: use crc32c")
    seen = set()
    total = 0
    for i, spec in enumerate(manifest.tensors):
        field = f"header.manifest.tensors[{i}]"
        if spec.name in seen:
            raise invalid(field, f"tensor {spec.name!r} appears twice", "DUPLICATE_TENSOR")
        seen.add(spec.name)
        if spec.name not in expected:
            near = did_you_mean(spec.name, expected)
            raise invalid(
                field, f"tensor {spec.name!r} is not a parameter of the serving model{near}", "UNKNOWN_TENSOR"
            )
        shape, dtype = expected[spec.name]
        if tuple(spec.shape) != tuple(shape):
            raise invalid(
                field,
                f"tensor {spec.name!r} has shape {list(spec.shape)}, the model expects {list(shape)}",
                "SHAPE_MISMATCH",
            )
        if PROTO_TO_TORCH.get(spec.dtype) != dtype:
            want = dtype_name(TORCH_TO_PROTO[dtype])
            raise invalid(
                field,
                f"tensor {spec.name!r} has dtype {dtype_name(spec.dtype)}, the serving model runs "
                f"{want}: cast before sending",
                "DTYPE_MISMATCH",
            )
        numel = 1
        for d in spec.shape:
            numel *= d
        if spec.nbytes != numel * element_size(dtype):
            raise invalid(
                field,
                f"tensor {spec.name!r}: nbytes {spec.nbytes} does not match its shape and dtype",
                "NBYTES_MISMATCH",
            )
        total += spec.nbytes
    missing = sorted(set(expected) - seen - optional)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise invalid(
            "header.manifest.tensors", f"a version must carry every parameter; missing {shown}", "MISSING_TENSORS"
        )
    if manifest.total_bytes != total:
        raise invalid("header.manifest.total_bytes", f"{manifest.total_bytes} does not match the tensors' sum {total}")
    ranges: list[list[tuple[int, int, int]]] = [[] for _ in manifest.tensors]
    for i, chunk in enumerate(manifest.chunks):
        if not 0 <= chunk.tensor_index < len(manifest.tensors):
            raise invalid(f"header.manifest.chunks[{i}]", f"tensor_index {chunk.tensor_index} out of range")
        spec = manifest.tensors[chunk.tensor_index]
        if chunk.offset < 0 or chunk.length < 0 or chunk.offset + chunk.length > spec.nbytes:
            raise invalid(
                f"header.manifest.chunks[{i}]",
                f"chunk [{chunk.offset}, {chunk.offset + chunk.length}) "
                f"runs past the end of tensor {spec.name!r} ({spec.nbytes} bytes)",
                "CHUNK_OUT_OF_BOUNDS",
            )
        ranges[chunk.tensor_index].append((chunk.offset, chunk.length, i))
    # The chunks must tile each tensor: lengths that add up are not enough (two chunks over one half would leave
    # the other half holding whatever the staging file held before).
    for spec, spans in zip(manifest.tensors, ranges, strict=True):
        end = 0
        for offset, length, i in sorted(spans):
            if offset != end and length:
                what = "overlaps the chunk before it" if offset < end else f"leaves [{end}, {offset}) unsent"
                raise invalid(
                    f"header.manifest.chunks[{i}]",
                    f"chunk [{offset}, {offset + length}) of tensor {spec.name!r} {what}: chunks must cover each "
                    "tensor exactly once",
                    "CHUNKS_DO_NOT_TILE",
                )
            end = max(end, offset + length)
        if end != spec.nbytes:
            raise invalid("header.manifest.chunks", f"chunks cover {end} of the {spec.nbytes} bytes of {spec.name!r}")


def expected_from_hf_config(hf_config, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The parameters an HF causal LM of this config has (built on the meta device: no memory, no weights).

    With tied embeddings lm_head.weight is not a separate parameter: it is listed (a sender may send it) but optional,
    and the receiver loads the embedding into the head when it is absent.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    expected = {name: (tuple(p.shape), dtype) for name, p in model.named_parameters()}
    if getattr(hf_config, "tie_word_embeddings", False) and "lm_head.weight" not in expected:
        expected["lm_head.weight"] = (tuple(model.get_input_embeddings().weight.shape), dtype)
    return expected


def optional_names(hf_config) -> frozenset[str]:
    return frozenset({"lm_head.weight"}) if getattr(hf_config, "tie_word_embeddings", False) else frozenset()
