"""The megatron GPTModel against transformers: bit-exact HF -> megatron -> HF, equal logits, clear errors."""

from __future__ import annotations

import pytest
import torch

from fabric.trainer import losses
from fabric.trainer.model import (
    build_gpt_model,
    export_hf_state_dict,
    iter_hf_weights,
    load_hf_into_megatron,
    read_hf_state_dict,
)

pytestmark = pytest.mark.slow
# megatron runs on CUDA where there is one (unchanged code), else on the CPU; transformers, the reference, on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def mg_model(megatron, tiny_model):
    model = build_gpt_model(tiny_model)
    load_hf_into_megatron(model, tiny_model)
    return model.eval()


def _logits(model, ids):
    ids = ids.to(DEVICE)
    positions = torch.arange(ids.shape[1], device=DEVICE).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None).cpu()


def _token_logprobs(model, ids, mask=None):
    with torch.no_grad():
        return losses.token_logprobs(model, ids.to(DEVICE), None if mask is None else mask.to(DEVICE)).cpu()


def test_round_trip_is_bit_exact(tiny_model, mg_model):
    original = read_hf_state_dict(tiny_model)
    exported = export_hf_state_dict(mg_model)
    assert sorted(exported) == sorted(original)
    different = [name for name in original if not torch.equal(original[name], exported[name])]
    assert different == []
    assert all(t.dtype == torch.float32 for t in exported.values())


def test_logits_equal_transformers(hf_model, mg_model):
    ids = torch.randint(0, hf_model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    expected = hf_model(ids).logits
    got = _logits(mg_model, ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_token_logprobs_match_transformers_and_ignore_padding(hf_model, mg_model):
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    expected = losses.logprobs_from_logits(hf_model(ids).logits, ids) * mask
    got = _token_logprobs(mg_model, ids, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got[1, 8:].abs().sum() == 0
    alone = _token_logprobs(mg_model, ids[1:, :8])  # padding leaves the real tokens' logprobs unchanged
    torch.testing.assert_close(got[1, :8], alone[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not right-padded"):
        _token_logprobs(mg_model, ids, mask.flip(1))


def test_iter_hf_weights_streams_lm_head_for_tied_embeddings(mg_model):
    names = [name for name, _ in iter_hf_weights(mg_model)]
    assert len(names) == len(set(names))
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    weights = dict(iter_hf_weights(mg_model))
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert "lm_head.weight" not in export_hf_state_dict(mg_model)


def test_a_bf16_model_holds_every_parameter_in_bf16_norms_included(megatron, tiny_model):
    """megatron's local spec builds its RMSNorms in fp32 whatever the dtype; a bf16 model must not keep them so
    (bf16 activations against an fp32 norm weight miss torch's fused rms_norm), and its logits stay those of the
    bf16 checkpoint within bf16 rounding."""
    model = build_gpt_model(tiny_model, torch.bfloat16)
    load_hf_into_megatron(model, tiny_model)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16}, {n: d for n, d in dtypes.items() if d != torch.bfloat16}
    exported = export_hf_state_dict(model)
    assert exported["model.norm.weight"].dtype == torch.bfloat16


def test_llama_untied_with_biases_matches_transformers(megatron):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=24,  # not hidden / heads: kv_channels must come from head_dim
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
    )
    torch.manual_seed(3)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF zero-initializes biases: make them count
        for name, param in hf.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    model = build_gpt_model(config).eval()
    load_hf_into_megatron(model, hf.state_dict())
    exported = export_hf_state_dict(model)
    assert "lm_head.weight" in exported
    assert all(torch.equal(exported[n], t) for n, t in hf.state_dict().items())
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(model, ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_bad_weights_and_configs_fail_with_named_errors(tiny_model, mg_model, hf_model):
    state = read_hf_state_dict(tiny_model)
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(KeyError, match="model.layers.1.self_attn.k_proj.bias"):
        load_hf_into_megatron(mg_model, missing)
    with pytest.raises(KeyError, match="no place for.*extra.weight"):
        load_hf_into_megatron(mg_model, {**state, "extra.weight": torch.zeros(1)})
    wrong = {**state, "model.norm.weight": torch.zeros(7)}
    with pytest.raises(ValueError, match=r"decoder.final_layernorm.weight.*\(7,\).*\(128,\)"):
        load_hf_into_megatron(mg_model, wrong)
    load_hf_into_megatron(mg_model, state)  # a failed load is repaired by a good one
    config = hf_model.config.__class__.from_dict({**hf_model.config.to_dict(), "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        build_gpt_model(config)


def test_init_megatron_twice_is_safe_and_refuses_other_sizes(megatron):
    from megatron.core import parallel_state

    from fabric.trainer.compat import init_megatron

    init_megatron(tp=1, pp=1)
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    with pytest.raises(RuntimeError, match="already initialized with tp=1 pp=1"):
        init_megatron(tp=2, pp=1)
