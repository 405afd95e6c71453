"""HF <-> megatron-core parameter layouts, as pure tensor functions of (tp_rank, tp_size).

megatron's GPTModel (local spec) differs from an HF Qwen2 / Llama checkpoint in three ways:

- attention: HF keeps q_proj, k_proj, v_proj apart; megatron fuses them into one `linear_qkv` whose rows are
  interleaved per query (KV) group: for each group g, [the q rows of g's heads, g's k rows, g's v rows].
  Tensor parallelism splits whole groups, so TP rank r holds groups [r*G/tp, (r+1)*G/tp) in the same layout.
- MLP: HF's gate_proj and up_proj are one `linear_fc1` in megatron, [gate; up] per TP rank (each rank holds its
  slice of gate followed by its slice of up, which is what megatron's GLU chunk(2) expects).
- names (`HF_TO_MEGATRON_LAYER` below) and tied embeddings: with `tie_word_embeddings` megatron has no
  output_layer weight and HF files have no lm_head.weight, but a vLLM receiver still needs lm_head.weight sent.

Column-parallel weights (qkv, fc1, the vocab of embedding and output layer) split along dim 0, row-parallel ones
(attention out projection, fc2) along dim 1, norms are replicated. Every `*_to_megatron` function returns the
shard of one TP rank; every `*_to_hf` function takes the list of all ranks' shards (in rank order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Per-layer names: HF suffix under `model.layers.{i}.` -> megatron suffix under `decoder.layers.{i}.`, and how the
# tensor is split across tensor-parallel ranks. q/k/v and gate/up are handled by the fused converters.
HF_TO_MEGATRON_LAYER: dict[str, tuple[str, str]] = {
    "input_layernorm.weight": ("input_layernorm.weight", "replicated"),
    "self_attn.o_proj.weight": ("self_attention.linear_proj.weight", "row"),
    "self_attn.o_proj.bias": ("self_attention.linear_proj.bias", "replicated"),
    "post_attention_layernorm.weight": ("pre_mlp_layernorm.weight", "replicated"),
    "mlp.down_proj.weight": ("mlp.linear_fc2.weight", "row"),
    "mlp.down_proj.bias": ("mlp.linear_fc2.bias", "replicated"),
}
HF_TO_MEGATRON_GLOBAL: dict[str, tuple[str, str]] = {
    "model.embed_tokens.weight": ("embedding.word_embeddings.weight", "column"),
    "model.norm.weight": ("decoder.final_layernorm.weight", "replicated"),
    "lm_head.weight": ("output_layer.weight", "column"),
}


@dataclass(frozen=True)
class AttentionShape:
    """What the qkv layout depends on."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def check_tp(self, tp_size: int) -> None:
        if self.num_kv_heads % tp_size:
            raise ValueError(
                f"num_key_value_heads={self.num_kv_heads} is not divisible by tensor-parallel size {tp_size}; "
                "choose a tensor-parallel size that divides it"
            )


def split_for_tp(tensor: torch.Tensor, kind: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The shard of one TP rank of a plain (non-fused) tensor; `kind` is column, row or replicated."""
    if kind == "replicated" or tp_size == 1:
        return tensor
    dim = {"column": 0, "row": 1}[kind]
    if tensor.shape[dim] % tp_size:
        raise ValueError(f"dim {dim} of shape {tuple(tensor.shape)} is not divisible by tensor-parallel size {tp_size}")
    return tensor.chunk(tp_size, dim=dim)[tp_rank]


def merge_from_tp(shards: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Inverse of `split_for_tp`: the full tensor from all ranks' shards."""
    if kind == "replicated" or len(shards) == 1:
        return shards[0]
    return torch.cat(shards, dim={"column": 0, "row": 1}[kind])


def qkv_to_megatron(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape, tp_rank: int = 0, tp_size: int = 1
) -> torch.Tensor:
    """HF q/k/v weights ([rows, hidden]) or biases ([rows]) -> one TP rank's interleaved `linear_qkv` shard."""
    shape.check_tp(tp_size)
    groups = shape.num_kv_heads
    trailing = q.shape[1:]
    q = q.reshape(groups, shape.heads_per_group * shape.head_dim, *trailing)
    k = k.reshape(groups, shape.head_dim, *trailing)
    v = v.reshape(groups, shape.head_dim, *trailing)
    per_rank = groups // tp_size
    rank_groups = slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    fused = torch.cat([q[rank_groups], k[rank_groups], v[rank_groups]], dim=1)
    return fused.reshape(-1, *trailing)


def qkv_to_hf(shards: list[torch.Tensor], shape: AttentionShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All TP ranks' `linear_qkv` shards -> HF (q, k, v)."""
    shape.check_tp(len(shards))
    fused = torch.cat(shards, dim=0)
    trailing = fused.shape[1:]
    q_rows = shape.heads_per_group * shape.head_dim
    grouped = fused.reshape(shape.num_kv_heads, q_rows + 2 * shape.head_dim, *trailing)
    q, k, v = grouped.split([q_rows, shape.head_dim, shape.head_dim], dim=1)
    return q.reshape(-1, *trailing), k.reshape(-1, *trailing), v.reshape(-1, *trailing)


def fc1_to_megatron(gate: torch.Tensor, up: torch.Tensor, tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
    """HF gate_proj and up_proj -> one TP rank's `linear_fc1` shard: [gate slice; up slice]."""
    if gate.shape[0] % tp_size:
        raise ValueError(f"intermediate_size={gate.shape[0]} is not divisible by tensor-parallel size {tp_size}")
    return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)


def fc1_to_hf(shards: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """All TP ranks' `linear_fc1` shards -> HF (gate, up)."""
    gates, ups = zip(*(shard.chunk(2, dim=0) for shard in shards), strict=True)
    return torch.cat(gates, dim=0), torch.cat(ups, dim=0)
