"""A megatron-core GPTModel built from an HF Qwen2 / Llama config, and its weights in and out in HF layout.

    model = build_gpt_model(hf_config_or_dir)          # local layer spec: no Transformer Engine, no apex
    load_hf_into_megatron(model, hf_dir_or_state_dict)
    for name, tensor in iter_hf_weights(model): ...    # streaming, HF names and layout (what rollout servers load)
    save_hf_checkpoint(model, hf_config_dir, tokenizer_dir, out_dir)

Call `fabric.trainer.compat.init_megatron()` first (torch.distributed + megatron's parallel state). The tensor-parallel
rank and size come from megatron's parallel state; the layout math is in `convert.py`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fabric.trainer import convert
from fabric.trainer.config import compile_mode, resolve_compile_mode

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
ATTENTION_BACKENDS = ("sdpa", "unfused")  # torch's fused SDPA kernels; megatron's DotProductAttention (reference)
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def load_hf_config(hf_config_or_dir):
    """An HF PretrainedConfig from a config object or a model directory."""
    if isinstance(hf_config_or_dir, str | os.PathLike):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(hf_config_or_dir))
    return hf_config_or_dir


def _rope_theta(hf_config) -> float:
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r} is not supported yet; only default RoPE converts to megatron")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("the HF config has no rope_theta (in rope_parameters or at top level)")
    return float(theta)


def transformer_config_from_hf(
    hf_config,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    recompute_granularity: str | None = None,
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    torch_compile: str = "off",
):
    """megatron TransformerConfig equivalent to an HF Qwen2 / Llama config; raises ValueError naming what differs.

    recompute_*, torch_compile: see `build_gpt_model`."""
    if recompute_granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"recompute_granularity={recompute_granularity!r} is unknown; use full, selective or None")
    if recompute_granularity == "full":  # default: every layer a unit, one layer's activations live at once
        recompute_method, recompute_num_layers = recompute_method or "uniform", recompute_num_layers or 1
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if hf_config.hidden_act != "silu":
        raise ValueError(f"hidden_act={hf_config.hidden_act!r} is not supported; only silu (SwiGLU) is")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported; megatron's model here uses full attention")
    if model_type == "qwen2":  # Qwen2: bias on q, k, v only
        qkv_bias, linear_bias = True, False
    else:  # Llama: attention_bias covers q, k, v and o; mlp_bias the MLP; megatron has one switch for o + MLP
        qkv_bias = bool(getattr(hf_config, "attention_bias", False))
        linear_bias = bool(getattr(hf_config, "mlp_bias", False))
        if qkv_bias != linear_bias:
            raise ValueError(
                f"attention_bias={qkv_bias} with mlp_bias={linear_bias} is not supported; megatron biases the "
                "attention output and the MLP together"
            )
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    convert.AttentionShape(num_heads, num_kv_heads, head_dim).check_tp(tp)
    if hf_config.vocab_size % tp:
        raise ValueError(f"vocab_size={hf_config.vocab_size} is not divisible by tensor-parallel size {tp}")
    _rope_theta(hf_config)  # validates rope_type early
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=num_heads,
        num_query_groups=num_kv_heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_qkv_bias=qkv_bias,
        add_bias_linear=linear_bias,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0)),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=torch.device(device).type == "cpu",
        # SwiGLU and the residual add fused by torch.compile (megatron's jit_fuser): compile "fusions" on CUDA. With
        # compiled layers the plain paths, which the layer's graph fuses (and traces without a break).
        bias_activation_fusion=torch_compile == "fusions" and torch.device(device).type == "cuda",
        bias_dropout_fusion=torch_compile == "fusions" and torch.device(device).type == "cuda",
        # These need apex or Transformer Engine; the plain torch paths run everywhere.
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cuda_graph_scope=[],  # the default "full" means the same but warns that it is deprecated
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
    )


def _compile_fusions(model, device) -> bool:
    """torch.compile'd logprob passes (`_logprob_passes`): on CUDA when the model was built with torch_compile fusions
    or layers (its own setting, else FABRIC_TRAINER_COMPILE: a model built elsewhere)."""
    mode = getattr(model, "torch_compile", None) or compile_mode()
    return torch.device(device).type == "cuda" and mode not in ("off", "auto")


def compile_layers(model) -> None:
    """Each decoder layer's forward through torch.compile: one graph forward, one backward (AOTAutograd), the norms,
    rotary, SwiGLU and residual adds fused. All layers run the same code, so they share the compiled graphs (the
    parameters are graph inputs: torch._dynamo.config.inline_inbuilt_nn_modules); sequence and batch sizes are
    dynamic, so a new length does not recompile. Packed (thd) micro-batches run the eager layer: megatron's thd
    rotary embedding and the SDPA core attention loop over the sequences in Python (host syncs, graph breaks)."""
    for layer in model.decoder.layers:
        layer.forward = _LayerForward(layer.forward)
    model.compiled_layers = True


class _LayerForward:
    """A TransformerLayer's forward: compiled for padded batches, eager for packed ones."""

    def __init__(self, eager):
        self.eager = eager
        self.compiled = torch.compile(eager, dynamic=True)

    def __call__(self, *args, **kwargs):
        if kwargs.get("packed_seq_params") is not None:
            return self.eager(*args, **kwargs)
        return self.compiled(*args, **kwargs)


@functools.cache
def sdpa_attention_class():
    """megatron's core-attention module on torch's scaled_dot_product_attention (flash / memory-efficient kernels
    on CUDA, no Transformer Engine needed): causal, GQA without repeating K and V (enable_gqa), and the packed
    `thd` layout (PackedSeqParams with cu_seqlens: each sequence attends only to itself, no compute on padding).
    Built on megatron's DotProductAttention for its head counts, scale and dropout; same inputs and outputs."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SDPAttention(DotProductAttention):
        def forward(
            self,
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=None,
            attention_bias=None,
            packed_seq_params=None,
        ):
            if attention_mask is not None or attention_bias is not None:
                raise ValueError("the SDPA core attention is causal only: pass attention_mask=None, no bias")
            dropout = self.attention_dropout.p if self.training else 0.0
            # The rng fork (as DotProductAttention draws its dropout) only with dropout: it breaks torch.compile graphs
            with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext():
                if packed_seq_params is not None:
                    if packed_seq_params.qkv_format != "thd":
                        raise ValueError(f"packed qkv_format {packed_seq_params.qkv_format!r}: only thd is supported")
                    return self._packed(query, key, value, packed_seq_params, dropout)
                # [s, b, heads, dim] -> [b, heads, s, dim]
                q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
                out = self._sdpa(q, k, v, dropout)
            return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], self.hidden_size_per_partition)

        def _sdpa(self, q, k, v, dropout):
            # K and V heads shared by groups of query heads, never repeated; from the config, not the shapes (a
            # Python bool, which torch.compile with dynamic shapes needs)
            gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale, enable_gqa=gqa
            )

        def _packed(self, query, key, value, params, dropout):
            # [tokens, heads, dim], sequences back to back: one causal SDPA per sequence
            bounds = params.cu_seqlens_q.tolist()
            outs = []
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True):  # rows are never empty (losses)
                q, k, v = (t[start:stop].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
                outs.append(self._sdpa(q, k, v, dropout)[0].transpose(0, 1))
            return torch.cat(outs).reshape(query.shape[0], self.hidden_size_per_partition)

    return SDPAttention


@functools.cache
def row_parallel_linear_class():
    """megatron's RowParallelLinear, passing its own tensor-parallel group to the linear function: megatron's passes
    None, so the function looks the default group up and warns (DeprecationWarning) on every call on rank 0, which
    breaks a torch.compile graph. The same group, the same maths."""
    from megatron.core.tensor_parallel import RowParallelLinear

    class GroupRowParallelLinear(RowParallelLinear):
        def _forward_impl(self, input, weight, *args, **kwargs):
            if kwargs.get("tp_group") is None:
                kwargs["tp_group"] = self.tp_group
            return super()._forward_impl(input, weight, *args, **kwargs)

    return GroupRowParallelLinear


def _layer_spec(attention: str):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={attention!r} is unknown; use one of {', '.join(ATTENTION_BACKENDS)}")
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.linear_proj = row_parallel_linear_class()
    spec.submodules.mlp.submodules.linear_fc2 = row_parallel_linear_class()
    if attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = sdpa_attention_class()
    return spec


def build_gpt_model(
    hf_config_or_dir,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    attention: str = "sdpa",
    recompute_granularity: str | None = None,
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    torch_compile: str | None = None,
):
    """A megatron GPTModel (local layer spec) shaped like the HF config, randomly initialized; `model.hf_config` set.

    device defaults to the current CUDA device when there is one, else the CPU. attention: "sdpa" (torch's fused
    scaled_dot_product_attention; packed sequences too) or "unfused" (megatron's DotProductAttention: the
    reference; padded batches only). Transformer Engine is not used: its layer spec names parameters differently.
    recompute_granularity: megatron's activation recompute, "full" (every layer's activations recomputed in the
    backward pass; recompute_method / recompute_num_layers as megatron's, default uniform over 1 layer) or
    "selective" (the core attention only), None: off. torch_compile: off, fusions, layers (`compile_layers`) or auto
    (layers on CUDA for a model of 100M parameters or more, else off: fabric.trainer.config.resolve_compile_mode);
    None: the FABRIC_TRAINER_COMPILE environment variable (default auto).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    hf_config = load_hf_config(hf_config_or_dir)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    torch_compile = compile_mode(torch_compile)
    config = transformer_config_from_hf(
        hf_config, dtype, device, recompute_granularity, recompute_method, recompute_num_layers, torch_compile
    )
    spec = _layer_spec(attention)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=_rope_theta(hf_config),
    ).to(device)
    _norms_in(model, dtype)
    model.hf_config = hf_config
    model.attention_backend = attention
    model.compiled_layers = False
    params = sum(p.numel() for p in model.parameters())
    asked, torch_compile = torch_compile, resolve_compile_mode(torch_compile, torch.device(device).type, params)
    model.torch_compile = torch_compile
    log.info(
        "megatron model: %.3f B parameters, %s core attention, recompute %s, torch.compile %s%s, %s on %s",
        params / 1e9,
        attention,
        recompute_granularity,
        torch_compile,
        " (auto)" if asked == "auto" else "",
        dtype,
        device,
    )
    if torch_compile == "layers":
        if recompute_granularity == "selective":  # megatron's checkpoint inside the layer: rng state, .item()
            log.warning("selective recompute breaks each compiled layer into several graphs; full recompute does not")
        compile_layers(model)
    return model


def _norms_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The local spec builds its RMSNorms in fp32 whatever params_dtype says (megatron's training casts the whole
    model through Float16Module); bf16 activations against an fp32 norm weight miss torch's fused rms_norm kernel
    (H200: a composite of fp32 kernels per norm, forward and backward). Norm weights go to the model's dtype, as in
    the HF checkpoint and in vLLM; the optimizer keeps their fp32 main copies."""
    for module in model.modules():
        if isinstance(module, torch.nn.RMSNorm | torch.nn.LayerNorm):
            module.to(dtype)


@dataclass(frozen=True)
class ParamMapping:
    """One megatron parameter and the HF tensor(s) it holds. kind: replicated, column, row, qkv or fc1."""

    megatron_name: str
    hf_names: tuple[str, ...]
    kind: str


def _attention_shape(hf_config) -> convert.AttentionShape:
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    return convert.AttentionShape(num_heads, num_kv_heads, head_dim)


def _global_layer_index(model, local_index: int) -> int:
    # layer_number is global and 1-based, so pipeline stages map to the right HF layer.
    return model.decoder.layers[local_index].layer_number - 1


def param_mappings(model) -> list[ParamMapping]:
    """The HF counterpart of every megatron parameter of this (TP/PP-local) model, in parameter order."""
    megatron_to_hf_global = {mg: (hf, kind) for hf, (mg, kind) in convert.HF_TO_MEGATRON_GLOBAL.items()}
    megatron_to_hf_layer = {mg: (hf, kind) for hf, (mg, kind) in convert.HF_TO_MEGATRON_LAYER.items()}
    mappings = []
    for name, _ in model.named_parameters():
        if name in megatron_to_hf_global:
            hf_name, kind = megatron_to_hf_global[name]
            mappings.append(ParamMapping(name, (hf_name,), kind))
            continue
        match = _LAYER_RE.match(name)
        if match is None:
            raise KeyError(f"megatron parameter {name!r} has no HF counterpart")
        prefix = f"model.layers.{_global_layer_index(model, int(match.group(1)))}."
        suffix = match.group(2)
        if suffix.startswith("self_attention.linear_qkv."):
            leaf = suffix.rsplit(".", 1)[1]
            hf_names = tuple(f"{prefix}self_attn.{p}_proj.{leaf}" for p in "qkv")
            mappings.append(ParamMapping(name, hf_names, "qkv"))
        elif suffix.startswith("mlp.linear_fc1."):
            leaf = suffix.rsplit(".", 1)[1]
            mappings.append(ParamMapping(name, (f"{prefix}mlp.gate_proj.{leaf}", f"{prefix}mlp.up_proj.{leaf}"), "fc1"))
        elif suffix in megatron_to_hf_layer:
            hf_suffix, kind = megatron_to_hf_layer[suffix]
            mappings.append(ParamMapping(name, (prefix + hf_suffix,), kind))
        else:
            raise KeyError(f"megatron parameter {name!r} has no HF counterpart")
    return mappings


def _tp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def read_hf_state_dict(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF model directory's safetensors file(s)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _to_megatron(mapping: ParamMapping, hf: Mapping[str, torch.Tensor], shape, tp_rank: int, tp_size: int):
    tensors = [hf[n] for n in mapping.hf_names]
    if mapping.kind == "qkv":
        q, k, v = tensors
        return convert.qkv_to_megatron(q, k, v, shape, tp_rank, tp_size)
    if mapping.kind == "fc1":
        gate, up = tensors
        return convert.fc1_to_megatron(gate, up, tp_rank, tp_size)
    return convert.split_for_tp(tensors[0], mapping.kind, tp_rank, tp_size)


@torch.no_grad()
def load_hf_into_megatron(model, hf_state_dict_or_dir) -> None:
    """Copies HF weights (a state dict or a model directory) into the megatron model, this rank's shards only.

    Raises KeyError naming missing or unexpected HF tensors and ValueError naming a shape mismatch; on error the
    model may be partly loaded.
    """
    if isinstance(hf_state_dict_or_dir, str | os.PathLike):
        hf_state = read_hf_state_dict(hf_state_dict_or_dir)
    else:
        hf_state = dict(hf_state_dict_or_dir)
    tied = bool(model.hf_config.tie_word_embeddings)
    if tied:
        hf_state.pop("lm_head.weight", None)  # the same tensor as embed_tokens (HF state_dict() still lists it)
    shape = _attention_shape(model.hf_config)
    tp_rank, tp_size = _tp_rank_size()
    params = dict(model.named_parameters())
    mappings = param_mappings(model)
    missing = sorted(n for m in mappings for n in m.hf_names if n not in hf_state)
    if missing:
        raise KeyError(f"HF weights lack {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    expected = {n for m in mappings for n in m.hf_names}
    if model.pre_process and model.post_process:  # a whole model: every HF tensor must find a place
        unexpected = sorted(n for n in hf_state if n not in expected and not n.endswith("rotary_emb.inv_freq"))
        if unexpected:
            raise KeyError(f"HF weights have {len(unexpected)} tensor(s) the model has no place for: {unexpected[:3]}")
    for mapping in mappings:
        param = params[mapping.megatron_name]
        value = _to_megatron(mapping, hf_state, shape, tp_rank, tp_size)
        if value.shape != param.shape:
            raise ValueError(
                f"{mapping.megatron_name}: HF {mapping.hf_names} give shape {tuple(value.shape)}, "
                f"the model has {tuple(param.shape)}; does the HF config match these weights?"
            )
        param.copy_(value)


def _gather_tp(tensor: torch.Tensor) -> list[torch.Tensor]:
    """All TP ranks' shards of a parameter, in rank order (just [tensor] at tp_size 1)."""
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size == 1:
        return [tensor]
    shards = [torch.empty_like(tensor) for _ in range(tp_size)]
    torch.distributed.all_gather(shards, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return shards


@torch.no_grad()
def iter_hf_weights(model, include_tied_lm_head: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF name, tensor) in HF layout, one parameter at a time, on the model's device and dtype.

    Tensors may share memory with the live model: consume (send, copy) each before the next optimizer step.
    With tied embeddings `lm_head.weight` is yielded too (same values as `model.embed_tokens.weight`), because a
    vLLM receiver keeps a separate output head that would otherwise stay stale. At TP > 1 every TP rank must
    iterate together (the shards are all-gathered); under pipeline parallelism each stage yields its own layers.
    """
    shape = _attention_shape(model.hf_config)
    params = dict(model.named_parameters())
    tied = bool(model.hf_config.tie_word_embeddings)
    for mapping in param_mappings(model):
        kind = mapping.kind
        shards = [s.detach() for s in _gather_tp(params[mapping.megatron_name])]
        tensors: tuple[torch.Tensor, ...]
        if kind == "qkv":
            tensors = convert.qkv_to_hf(shards, shape)
        elif kind == "fc1":
            tensors = convert.fc1_to_hf(shards)
        else:
            tensors = (convert.merge_from_tp(shards, kind),)
        for hf_name, tensor in zip(mapping.hf_names, tensors, strict=True):
            yield hf_name, tensor.contiguous()
            if hf_name == "model.embed_tokens.weight" and tied and include_tied_lm_head:
                yield "lm_head.weight", tensor.contiguous()


def export_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights as an HF state dict of independent CPU tensors (as HF writes it: no tied lm_head)."""
    return {name: t.detach().to("cpu", copy=True) for name, t in iter_hf_weights(model, include_tied_lm_head=False)}


SHARD_BYTES = 4 * 2**30  # HF's usual shard size: the export holds at most one shard in host memory


def _is_writer() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_hf_checkpoint(model, hf_config_dir_or_config, tokenizer_dir, out_dir, shard_bytes: int = SHARD_BYTES) -> Path:
    """Writes an HF model directory (safetensors, config.json, tokenizer, generation config) to out_dir.

    Loadable by transformers' from_pretrained and by vLLM. The weights are gathered tensor by tensor and written in
    shards of at most `shard_bytes` (one `model.safetensors` when they fit, else `model-0000i-of-0000n.safetensors`
    and `model.safetensors.index.json`, as HF writes them), so the host never holds more than one shard. Each file
    is written to a temporary name and renamed, so a reader never sees a half-written file. Collective at TP > 1
    (every TP rank iterates); only global rank 0 writes. Returns out_dir.
    """
    import json

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    writer = _is_writer()
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    hf_config = load_hf_config(hf_config_dir_or_config)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    written: list[tuple[Path, list[str]]] = []
    dtype = None
    total = 0

    def flush(index: int) -> None:
        tmp = out_dir / f"shard-{index:05d}.safetensors.tmp"
        save_file(shards[-1], str(tmp), metadata={"format": "pt"})
        written.append((tmp, list(shards[-1])))
        shards[-1] = {}

    for name, tensor in iter_hf_weights(model, include_tied_lm_head=False):
        if not writer:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush(len(written))
            size = 0
        shards[-1][name] = tensor.detach().to("cpu", copy=True)
        size += nbytes
        total += nbytes
        dtype = dtype or tensor.dtype
    if not writer:
        return out_dir
    if shards[-1] or not written:
        flush(len(written))
    if len(written) == 1:
        finals = ["model.safetensors"]
    else:
        finals = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    stale = [*out_dir.glob("model*.safetensors"), *out_dir.glob("model.safetensors.index.json")]
    for path in stale:  # a previous export of another sharding
        if path.name not in finals:
            path.unlink()
    for (tmp, _), final in zip(written, finals, strict=True):
        os.replace(tmp, out_dir / final)
    if len(written) > 1:
        weight_map = {n: final for (_, names), final in zip(written, finals, strict=True) for n in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_config.dtype = dtype
    hf_config.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out_dir))
    for source_dir in (hf_config_dir_or_config, tokenizer_dir):  # eos / pad ids for generation, where known
        if isinstance(source_dir, str | os.PathLike) and (Path(source_dir) / "generation_config.json").is_file():
            shutil.copyfile(Path(source_dir) / "generation_config.json", out_dir / "generation_config.json")
            break
    return out_dir


# ---- logprobs: chunked over the vocabulary, padded or packed ------------------------------------------------------

LOGPROB_CHUNK_TOKENS = 4096  # rows of [tokens, vocab] logits alive at once (fp32: 2.5 GB at a 152k vocabulary)
# Logits a micro-batch may keep for its backward pass (in the model's dtype: 1.2 GB for 4,096 tokens of a 152k
# vocabulary in bf16). Within it the backward pass reuses them; past it each chunk's logits are recomputed there.
SAVED_LOGITS_BYTES = 4 << 30


class _TokenLogprob(torch.autograd.Function):
    """log softmax(logits / T)[target] per row, in fp32 from logits of any dtype, keeping only the logits (as they
    are) and one logsumexp per row for the backward pass: no fp32 [tokens, vocab] copy is kept, and the gradient
    (onehot - softmax) * g / T is made in one pass, in the logits' dtype. Exact in fp32; the same maths as megatron's
    vocab-parallel cross entropy on one tensor-parallel rank."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float, fused: bool) -> torch.Tensor:
        forward, ctx.backward = _logprob_passes(fused)
        picked, lse = forward(logits, targets, temperature)
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        return picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        return ctx.backward(logits, targets, lse, grad, ctx.temperature), None, None, None


def _logprob_forward_eager(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    scaled = logits.float() / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    return scaled.gather(-1, targets[:, None])[:, 0] - lse, lse


def _logprob_backward_eager(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, temperature: float
):
    softmax = torch.exp(logits.float() / temperature - lse[:, None])
    onehot = torch.arange(logits.shape[-1], device=logits.device)[None] == targets[:, None]
    return ((onehot.float() - softmax) * (grad.float() / temperature)[:, None]).to(logits.dtype)


@functools.cache
def _logprob_passes(compiled: bool):
    """The forward and backward passes over the logits: eager, or torch.compile'd (one fused kernel per pass, no
    fp32 [tokens, vocab] copy made) when the model's torch_compile is on and the logits are on CUDA
    (`_compile_fusions`). Keyed by that choice, not made once per process: a process may hold an eager and a
    compiled Policy (the bench)."""
    if not compiled:
        return _logprob_forward_eager, _logprob_backward_eager
    return torch.compile(_logprob_forward_eager, dynamic=True), torch.compile(_logprob_backward_eager, dynamic=True)


def _chunk_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """logprobs of targets [N] from final hidden states [N, 1, H], LOGPROB_CHUNK_TOKENS rows at a time.

    Each chunk's logits are made and turned into logprobs (`_TokenLogprob`, one tensor-parallel rank) without an fp32
    [tokens, vocab] copy kept; under grad the logits stay for the backward pass while the micro-batch's fit
    SAVED_LOGITS_BYTES, and past that each chunk is checkpointed (its logits recomputed in the backward pass).
    With tensor parallelism megatron's vocab-parallel cross entropy keeps it exact over the split vocabulary."""
    from megatron.core import parallel_state, tensor_parallel

    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    one_rank = parallel_state.get_tensor_model_parallel_world_size() == 1
    fused = _compile_fusions(model, hidden.device)

    def chunk(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits, _ = model.output_layer(h, weight=weight)
        if one_rank:
            return _TokenLogprob.apply(logits[:, 0], t, float(temperature), fused)
        # A fresh float32 tensor, which the cross entropy may modify in place (float() of fp32 logits would not copy).
        scaled = logits.float() / temperature if temperature != 1.0 or logits.dtype == torch.float32 else logits.float()
        return -tensor_parallel.vocab_parallel_cross_entropy(scaled, t[:, None])[:, 0]

    grad = torch.is_grad_enabled() and hidden.requires_grad
    vocab = weight.shape[0] if weight is not None else model.output_layer.weight.shape[0]
    keep_logits = hidden.shape[0] * vocab * hidden.element_size() <= SAVED_LOGITS_BYTES
    parts = []
    for start in range(0, hidden.shape[0], LOGPROB_CHUNK_TOKENS):
        h, t = hidden[start : start + LOGPROB_CHUNK_TOKENS], targets[start : start + LOGPROB_CHUNK_TOKENS]
        if grad and not keep_logits:
            parts.append(torch.utils.checkpoint.checkpoint(chunk, h, t, use_reentrant=False))
        else:
            parts.append(chunk(h, t))
    return torch.cat(parts)


def _hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor, packed_seq_params=None):
    """The decoder's final hidden states [S, B, H] (after the final norm), without the output layer."""
    post_process = model.post_process
    model.post_process = False  # GPTModel then returns the hidden states, as a pipeline stage hands them on
    try:
        return model(input_ids, position_ids, None, packed_seq_params=packed_seq_params)
    finally:
        model.post_process = post_process


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    packed: bool = False,
    check: bool = True,
) -> torch.Tensor:
    """[B, T] logprobs of input_ids, as `losses.token_logprobs` (aligned as there: 0 at column 0 and at padding),
    without the [B, T, vocab] logits: over chunks of tokens (`_chunk_logprobs`). Differentiable under grad.

    packed=True (needs attention_mask and the SDPA core attention): the rows' real tokens are put back to back in
    one sequence, each attending only to itself (megatron's thd layout with cu_seqlens; RoPE restarts at every
    row), so no compute is spent on padding; the result is the same [B, T] tensor. check=False: the caller has
    checked that attention_mask is right-padded (the check waits for the device).
    """
    from fabric.trainer.losses import check_right_padded

    batch, seq = input_ids.shape
    if attention_mask is not None and check:
        check_right_padded(attention_mask)
    if packed:
        if attention_mask is None:
            raise ValueError("packed logprobs need the attention_mask (each row's length)")
        return _packed_token_logprobs(model, input_ids, attention_mask, temperature)
    position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    hidden = _hidden_states(model, input_ids, position_ids)  # [T, B, H]; causal, padding after every token
    targets = input_ids.t()[1:].reshape(-1)  # [T-1, B] token-major, as the hidden states
    picked = _chunk_logprobs(model, hidden[:-1].reshape(-1, 1, hidden.shape[-1]), targets, temperature)
    logprobs = F.pad(picked.view(seq - 1, batch).t(), (1, 0))
    if attention_mask is not None:
        logprobs = logprobs * attention_mask.to(logprobs.dtype)
    return logprobs


def _packed_token_logprobs(model, input_ids, attention_mask, temperature):
    from megatron.core.packed_seq_params import PackedSeqParams

    if getattr(model, "attention_backend", None) != "sdpa":
        raise ValueError("packed sequences need the SDPA core attention (build_gpt_model(attention='sdpa'))")
    batch, seq = input_ids.shape
    lengths = attention_mask.sum(-1)
    if (lengths == 0).any():  # an empty row has no logprob: pack the others
        logprobs = torch.zeros((batch, seq), device=input_ids.device)
        rows = lengths > 0
        if rows.any():
            logprobs[rows] = _packed_token_logprobs(model, input_ids[rows], attention_mask[rows], temperature)
        return logprobs
    real = attention_mask.bool()
    ids = input_ids[real]  # row after row, each row's real tokens
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    max_len = int(lengths.max())
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )
    starts = cu_seqlens[:-1].long().repeat_interleave(lengths)
    position_ids = (torch.arange(ids.shape[0], device=ids.device) - starts)[None]
    hidden = _hidden_states(model, ids[None], position_ids, params)  # [tokens, 1, H]
    # Token i predicts token i + 1, but a row's last token predicts nothing (the next row's first token follows).
    picked = _chunk_logprobs(model, hidden[:-1], ids[1:], temperature)
    predicts = torch.ones(ids.shape[0] - 1, dtype=torch.bool, device=ids.device)
    predicts[cu_seqlens[1:-1].long() - 1] = False
    targets = real.clone()
    targets[:, 0] = False  # column 0 has no prediction
    logprobs = torch.zeros((batch, seq), dtype=picked.dtype, device=picked.device)
    logprobs[targets] = picked[predicts]
    return logprobs
