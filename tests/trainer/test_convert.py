"""Pure-tensor tests of the HF <-> megatron layout math, including a tensor-parallel size of 2."""

from __future__ import annotations

import pytest
import torch

from fabric.trainer import convert

# 4 query heads in 2 KV groups, head_dim 1: each row is one head, so the layout is readable by eye.
SHAPE = convert.AttentionShape(num_heads=4, num_kv_heads=2, head_dim=1)
Q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
K = torch.tensor([[20.0], [21.0]])
V = torch.tensor([[30.0], [31.0]])


def test_qkv_interleaves_per_query_group():
    fused = convert.qkv_to_megatron(Q, K, V, SHAPE)
    # group 0: its two q heads, its k, its v; then group 1
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]


def test_qkv_tp2_gives_each_rank_whole_groups_and_merges_back():
    shards = [convert.qkv_to_megatron(Q, K, V, SHAPE, tp_rank=r, tp_size=2) for r in range(2)]
    assert shards[0].flatten().tolist() == [10, 11, 20, 30]
    assert shards[1].flatten().tolist() == [12, 13, 21, 31]
    q, k, v = convert.qkv_to_hf(shards, SHAPE)
    assert torch.equal(q, Q) and torch.equal(k, K) and torch.equal(v, V)


def test_qkv_round_trip_bias_and_wide_heads():
    shape = convert.AttentionShape(num_heads=8, num_kv_heads=4, head_dim=3)
    q, k, v = torch.randn(24, 5), torch.randn(12, 5), torch.randn(12, 5)
    for tp_size in (1, 2, 4):
        shards = [convert.qkv_to_megatron(q, k, v, shape, r, tp_size) for r in range(tp_size)]
        assert all(s.shape == (48 // tp_size, 5) for s in shards)
        assert all(torch.equal(a, b) for a, b in zip(convert.qkv_to_hf(shards, shape), (q, k, v), strict=True))
        bias_shards = [convert.qkv_to_megatron(q[:, 0], k[:, 0], v[:, 0], shape, r, tp_size) for r in range(tp_size)]
        merged = convert.qkv_to_hf(bias_shards, shape)
        assert all(torch.equal(a, b[:, 0]) for a, b in zip(merged, (q, k, v), strict=True))


def test_qkv_rejects_tp_that_splits_a_group():
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by tensor-parallel size 4"):
        convert.qkv_to_megatron(Q, K, V, SHAPE, tp_rank=0, tp_size=4)


def test_fc1_tp2_puts_gate_slice_before_up_slice_on_each_rank():
    gate = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    up = torch.tensor([[5.0], [6.0], [7.0], [8.0]])
    assert convert.fc1_to_megatron(gate, up).flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    shards = [convert.fc1_to_megatron(gate, up, r, 2) for r in range(2)]
    assert shards[0].flatten().tolist() == [1, 2, 5, 6]
    assert shards[1].flatten().tolist() == [3, 4, 7, 8]
    merged_gate, merged_up = convert.fc1_to_hf(shards)
    assert torch.equal(merged_gate, gate) and torch.equal(merged_up, up)


@pytest.mark.parametrize(("kind", "dim"), [("column", 0), ("row", 1)])
def test_column_and_row_split_merge(kind, dim):
    tensor = torch.arange(24.0).view(4, 6)
    shards = [convert.split_for_tp(tensor, kind, r, 2) for r in range(2)]
    assert all(s.shape[dim] == tensor.shape[dim] // 2 for s in shards)
    assert torch.equal(shards[1].select(dim, 0), tensor.select(dim, tensor.shape[dim] // 2))
    assert torch.equal(convert.merge_from_tp(shards, kind), tensor)


def test_replicated_is_not_split():
    tensor = torch.arange(4.0)
    assert convert.split_for_tp(tensor, "replicated", 1, 2) is tensor
    with pytest.raises(ValueError, match="not divisible"):
        convert.split_for_tp(torch.zeros(3, 2), "column", 0, 2)
