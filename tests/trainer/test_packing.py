"""The trainer's fast paths change no number: SDPA core attention = megatron's unfused one, packed micro-batches =
padded ones for every loss_agg_mode, chunked logprobs = full logits, ROLL's dynamic batching and activation
recompute = plain micro-batches. All in fp32 on tiny shapes."""

from __future__ import annotations

import pytest
import torch

from fabric.trainer import losses, model
from fabric.trainer.policy import LossConfig, OptimConfig, Policy, TrainBatch

pytestmark = pytest.mark.slow


def _optim(**kw) -> OptimConfig:
    # lr 0 and no clipping: a step leaves the weights as they were and the raw gradients to compare
    return OptimConfig(**{"lr": 0.0, "grad_clip": None, "micro_batch_size": 2, **kw})


@pytest.fixture(scope="module")
def sdpa(megatron, tiny_model):
    return Policy.from_hf(tiny_model, _optim())


@pytest.fixture(scope="module")
def unfused(megatron, tiny_model):
    return Policy.from_hf(tiny_model, _optim(), attention="unfused")


@pytest.fixture(scope="module")
def batch(sdpa):
    """Five rows of different prompt and response lengths (one response empty), RL fields filled."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 9), (6, 2), (2, 14), (5, 0), (4, 6)]
    prompts = [torch.randint(1, 300, (p,), generator=g).tolist() for p, _ in shapes]
    responses = [torch.randint(1, 300, (r,), generator=g).tolist() for _, r in shapes]
    batch = TrainBatch.from_token_lists(prompts, responses, pad_id=0)
    logprobs = sdpa.logprobs(batch)
    noise = torch.randn(batch.input_ids.shape, generator=g)
    batch.old_logprobs = (logprobs + 0.3 * noise) * batch.attention_mask  # ratios off 1: clipping takes part
    batch.ref_logprobs = (logprobs - 0.2 * noise.flip(0)) * batch.attention_mask
    batch.advantages = torch.tensor([1.0, -0.5, 0.8, 0.0, -1.2])
    return batch


def _step(policy: Policy, batch: TrainBatch, packed: bool, mode: str = "token-mean"):
    policy.packed = packed
    policy.loss = LossConfig(loss_agg_mode=mode, kl_coef=0.1, norm_length=14.0, dual_clip=3.0)
    metrics = policy.train_step(batch)
    grads = {n: p.grad.detach().clone() for n, p in policy.model.named_parameters()}
    return metrics, grads


def _assert_same(a, b, rtol=1e-5):
    """Equal up to fp32 rounding: metrics to rtol, each gradient to rtol x its largest element."""
    (metrics_a, grads_a), (metrics_b, grads_b) = a, b
    for name in ("loss", "pg_loss", "kl", "clip_frac", "ratio_mean", "grad_norm"):
        assert metrics_a[name] == pytest.approx(metrics_b[name], rel=rtol, abs=1e-7), name
    for name, grad in grads_a.items():
        atol = rtol * float(grads_b[name].abs().max())
        torch.testing.assert_close(grad, grads_b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", losses.LOSS_AGGREGATIONS)
def test_packed_micro_batches_equal_padded_ones_for_every_loss_agg_mode(sdpa, unfused, batch, mode):
    seen = []
    hook = sdpa.model.embedding.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape)),
        with_kwargs=True,
    )
    try:
        packed = _step(sdpa, batch, packed=True, mode=mode)
    finally:
        hook.remove()
    lengths = batch.attention_mask.sum(-1).tolist()
    assert seen == [(1, lengths[0] + lengths[1]), (1, lengths[2] + lengths[3]), (1, lengths[4])]  # no padding
    padded = _step(sdpa, batch, packed=False, mode=mode)
    _assert_same(packed, padded)
    _assert_same(packed, _step(unfused, batch, packed=False, mode=mode))  # megatron's own attention, padded


def test_sdpa_core_attention_equals_megatron_unfused(sdpa, unfused):
    mine = sdpa.model.decoder.layers[0].self_attention.core_attention
    reference = unfused.model.decoder.layers[0].self_attention.core_attention
    assert type(mine).__name__ == "SDPAttention" and type(reference).__name__ == "DotProductAttention"
    g = torch.Generator().manual_seed(1)
    heads, groups, dim = 4, 2, 32  # the tiny model's grouped-query attention
    q = torch.randn(9, 3, heads, dim, generator=g, requires_grad=True)  # [s, b, heads, dim]
    k = torch.randn(9, 3, groups, dim, generator=g, requires_grad=True)
    v = torch.randn(9, 3, groups, dim, generator=g, requires_grad=True)
    out = mine(q, k, v, None)
    expected = reference(q, k, v, None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):  # sums of squares: up to ~50 here
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # packed (thd): sequences of 4, 9 and 2 tokens back to back, each alone equal to the unfused attention
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = [4, 9, 2]
    cu = torch.tensor([0, 4, 13, 15], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9)
    tq, tk, tv = (torch.cat([t[:n, i] for i, n in enumerate(lengths)]) for t in (q, k, v))
    packed = mine(tq, tk, tv, None, packed_seq_params=params)
    for i, n in enumerate(lengths):
        alone = reference(q[:n, i : i + 1], k[:n, i : i + 1], v[:n, i : i + 1], None)[:, 0]
        torch.testing.assert_close(packed[cu[i] : cu[i + 1]], alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="causal only"):
        mine(q, k, v, torch.ones(3, 1, 9, 9, dtype=torch.bool))


@pytest.mark.parametrize("saved_logits_bytes", [model.SAVED_LOGITS_BYTES, 0], ids=["logits-kept", "recomputed"])
def test_chunked_logprobs_equal_full_logits(sdpa, batch, monkeypatch, saved_logits_bytes):
    monkeypatch.setattr(model, "LOGPROB_CHUNK_TOKENS", 7)  # many chunks, one ending mid-row
    monkeypatch.setattr(model, "SAVED_LOGITS_BYTES", saved_logits_bytes)
    net = sdpa.model
    results = []
    for fn in (
        lambda: model.token_logprobs(net, batch.input_ids, batch.attention_mask, temperature=0.7),
        lambda: model.token_logprobs(net, batch.input_ids, batch.attention_mask, temperature=0.7, packed=True),
        lambda: losses.token_logprobs(net, batch.input_ids, batch.attention_mask, temperature=0.7),  # full logits
    ):
        net.zero_grad(set_to_none=True)
        logprobs = fn()
        (logprobs * batch.response_mask).sum().backward()
        results.append((logprobs.detach(), net.embedding.word_embeddings.weight.grad.clone()))
    for logprobs, grad in results[:2]:
        torch.testing.assert_close(logprobs, results[2][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, results[2][1], rtol=1e-5, atol=1e-5 * float(results[2][1].abs().max()))
    net.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprob_equals_megatrons_cross_entropy_with_its_gradient(megatron, dtype):
    """The fused logprob (logits kept as they are, the gradient made in one pass) against megatron's vocab-parallel
    cross entropy on fp32 logits: the same numbers in fp32, and within bf16 rounding of the gradient in bf16."""
    from megatron.core import tensor_parallel

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(37, 301, generator=g)).to(dtype)
    targets = torch.randint(0, 301, (37,), generator=g)
    weights = torch.randn(37, generator=g)
    results = []
    for fused in (True, False):
        x = logits.clone().requires_grad_(True)
        if fused:
            lp = model._TokenLogprob.apply(x, targets, 0.7, False)
        else:
            lp = -tensor_parallel.vocab_parallel_cross_entropy(x.float()[:, None] / 0.7, targets[:, None])[:, 0]
        (lp * weights).sum().backward()
        results.append((lp.detach(), x.grad))
    (lp_fused, grad_fused), (lp_ref, grad_ref) = results
    assert lp_fused.dtype == torch.float32 and grad_fused.dtype == dtype
    torch.testing.assert_close(lp_fused, lp_ref, rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: one rounding of each element
    torch.testing.assert_close(grad_fused.float(), grad_ref.float(), rtol=tol, atol=tol)


def test_logprobs_packed_skip_empty_rows(sdpa, batch):
    empty = batch.slice(0, 3)
    empty.attention_mask = empty.attention_mask.clone()
    empty.attention_mask[1] = 0
    sdpa.packed = True
    packed = sdpa.logprobs(empty)
    sdpa.packed = False
    padded = sdpa.logprobs(empty)
    assert packed[1].abs().sum() == 0
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)


def test_dynamic_batching_groups_rows_as_roll_and_changes_nothing(megatron, tiny_model, sdpa, batch):
    dynamic = Policy.from_hf(
        tiny_model, _optim(use_dynamic_batching=True, max_tokens_per_microbatch=32, sequence_length_round=8)
    )
    lengths = batch.attention_mask.sum(-1).tolist()  # 12, 8, 16, 5, 10
    groups = [index.tolist() for index, _, _ in dynamic._micro_batches(batch)]
    # sorted by length (5, 8, 10, 12, 16) -> rounded to 8: (8, 8, 16, 16, 16); rows x longest <= 32 tokens
    assert lengths == [12, 8, 16, 5, 10]
    assert groups == [[3, 1], [4, 0], [2]]
    assert [mb.input_ids.shape[1] for _, mb, _ in dynamic._micro_batches(batch)] == [8, 12, 16]  # trimmed to longest
    for packed in (True, False):
        _assert_same(_step(dynamic, batch, packed), _step(sdpa, batch, packed))
    too_small = Policy.from_hf(tiny_model, _optim(use_dynamic_batching=True, max_tokens_per_microbatch=12))
    with pytest.raises(ValueError, match=r"16 tokens \(128 rounded up.*max_tokens_per_microbatch_in_train=12"):
        too_small.train_step(batch)
    with pytest.raises(ValueError, match="use_dynamic_batching needs max_tokens_per_microbatch"):
        Policy.from_hf(tiny_model, _optim(use_dynamic_batching=True))


@pytest.mark.parametrize(
    "granularity, method, layers, expected",
    [("full", None, None, ("uniform", 1)), ("full", "block", 1, ("block", 1)), ("selective", None, None, (None, None))],
)
def test_activation_recompute_gives_the_same_gradients(
    megatron, tiny_model, sdpa, batch, granularity, method, layers, expected
):
    recomputed = Policy.from_hf(
        tiny_model, _optim(), recompute_granularity=granularity, recompute_method=method, recompute_num_layers=layers
    )
    config = recomputed.model.config
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == (
        granularity,
        *expected,
    )
    for packed in (True, False):
        _assert_same(_step(recomputed, batch, packed), _step(sdpa, batch, packed))


def test_unknown_attention_and_recompute_are_refused(megatron, tiny_model):
    with pytest.raises(ValueError, match="attention='flash' is unknown; use one of sdpa, unfused"):
        model.build_gpt_model(tiny_model, attention="flash")
    with pytest.raises(ValueError, match="recompute_granularity='layer' is unknown"):
        model.build_gpt_model(tiny_model, recompute_granularity="layer")
    net = model.build_gpt_model(tiny_model, attention="unfused")
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="packed sequences need the SDPA core attention"):
        model.token_logprobs(net, ids, torch.ones_like(ids), packed=True)


def test_roll_keys_reach_the_policy_config(tmp_path, tiny_model):
    from fabric.config import ConfigError
    from fabric.trainer.config import pipeline_config
    from fabric.trainer.server import optim_config
    from tests.config.configs import MEGATRON, dataset, load_roll

    base = [f"pretrain={tiny_model}", f"actor_train.data_args.file_name=[{dataset(tmp_path)}]"]
    keys = [
        "actor_train.use_dynamic_batching_in_train=true",
        "actor_train.max_tokens_per_microbatch_in_train=4096",
        "actor_train.sequence_length_round_in_train=64",
        "actor_train.strategy_args.strategy_config.recompute_granularity=full",
        "actor_train.strategy_args.strategy_config.recompute_method=block",
        "actor_train.strategy_args.strategy_config.recompute_num_layers=2",
    ]
    pc = pipeline_config(load_roll(MEGATRON, base + keys))
    assert (pc.recompute_granularity, pc.recompute_method, pc.recompute_num_layers) == ("full", "block", 2)
    optim = optim_config(pc)
    assert (optim.use_dynamic_batching, optim.max_tokens_per_microbatch, optim.sequence_length_round) == (
        True,
        4096,
        64,
    )
    plain = pipeline_config(load_roll(MEGATRON, base))
    assert plain.recompute_granularity is None and not optim_config(plain).use_dynamic_batching
    with pytest.raises(ConfigError, match="max_tokens_per_microbatch_in_train.*must be > 0"):
        pipeline_config(load_roll(MEGATRON, base + keys[:1]))
    with pytest.raises(ConfigError, match="recompute_method.*need granularity full"):
        pipeline_config(load_roll(MEGATRON, base + keys[-2:]))
    with pytest.raises(ConfigError, match="recompute_granularity.*'layer': use full or selective"):
        pipeline_config(
            load_roll(MEGATRON, base + ["actor_train.strategy_args.strategy_config.recompute_granularity=layer"])
        )
