"""Content digests of weight bytes, computed where the bytes are (CPU or GPU) with torch reductions.

A tensor's digest is (length, sum of its 8-byte words, sum of each word times an odd weight from its position),
all modulo 2**64: a wrong, missing, stale or moved word changes it. Sums wrap identically on every device and in any
order, so the sender's GPU and a receiver's staging file agree. It is a checksum against unwritten or foreign bytes
arriving on a data path, not a MAC: who may write a version is settled by the control plane's authentication and the
per-update secret; the digest travels on that authenticated stream.
"""

from __future__ import annotations

import struct

import torch

BLOCK_WORDS = 4 << 20  # 32 MiB of the tensor per reduction step: bounds the temporaries
DIGEST_BYTES = 24
_WEIGHTS: dict[str, torch.Tensor] = {}  # 1, 3, 5, ... per device, reused


def _weights(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = torch.arange(1, 2 * BLOCK_WORDS + 1, 2, dtype=torch.int64, device=device)
    return _WEIGHTS[key]


def _words(raw: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    block = raw[lo * 8 : hi * 8]
    try:
        return block.view(torch.int64)
    except RuntimeError:  # a storage offset that is not 8-byte aligned: digest a copy of this block
        return block.clone().view(torch.int64)


def digest_bytes(raw: torch.Tensor) -> bytes:
    """Digest of a flat uint8 tensor (a view of a tensor's bytes, a staging slot, a bucket) on any device."""
    raw = raw.reshape(-1)
    n = raw.numel()
    words = n // 8
    s1 = torch.zeros((), dtype=torch.int64, device=raw.device)
    s2 = torch.zeros((), dtype=torch.int64, device=raw.device)
    for lo in range(0, words, BLOCK_WORDS):
        hi = min(lo + BLOCK_WORDS, words)
        w = _words(raw, lo, hi)
        block_sum = w.sum()
        s1 += block_sum
        # word i of the tensor weighs 2i + 1 = (2(i - lo) + 1) + 2 lo
        s2 += (w * _weights(raw.device)[: hi - lo]).sum() + 2 * lo * block_sum
    if n % 8:
        tail = torch.zeros(8, dtype=torch.uint8, device=raw.device)
        tail[: n % 8] = raw[words * 8 :]
        w = tail.view(torch.int64)
        s1 += w.sum()
        s2 += (w * (2 * words + 1)).sum()
    return struct.pack("<qqq", n, int(s1.item()), int(s2.item()))


def tensor_digests(raws) -> list[bytes]:
    """One digest per tensor, in order, of flat uint8 views."""
    return [digest_bytes(raw) for raw in raws]


def source_digests(source) -> list[bytes]:
    """A WeightSource's digests, computed once per source (a source is one version's tensors) where they live."""
    cached = getattr(source, "_tensor_digests", None)
    if cached is None:
        cached = tensor_digests(source._raw(i) for i in range(len(source.tensors)))
        source._tensor_digests = cached
    return cached
