"""The optimizer: AdamW on fp32 main params against hand-computed steps in fp32 and bf16, no weight decay on biases
and norms, a bf16 policy that learns at lr 1e-6, a fresh optimizer after the supervised warm-up, SFT at T = 1."""

from __future__ import annotations

import pytest
import torch

from fabric.trainer import losses
from fabric.trainer.policy import LossConfig, MainParamsAdamW, OptimConfig, Policy
from tests.trainer.test_policy import rl_batch_ids


class Tiny(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([[0.02, -0.5], [1.0, 0.25]], dtype=dtype))
        self.bias = torch.nn.Parameter(torch.tensor([0.02, 1.0], dtype=dtype))


def adamw_first_step(w: torch.Tensor, g: torch.Tensor, lr: float, wd: float, eps: float = 1e-8) -> torch.Tensor:
    """AdamW's first step by hand: bias-corrected m = g and v = g^2, so the step is lr * g / (|g| + eps)."""
    return w * (1 - lr * wd) - lr * g / (g.abs() + eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_on_fp32_main_params_by_hand(megatron, dtype):
    model = Tiny(dtype)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    grads = {"weight": torch.tensor([[1.0, -2.0], [0.5, 0.0]]), "bias": torch.tensor([3.0, -1.0])}
    optimizer = MainParamsAdamW(model, OptimConfig(lr=1e-3, weight_decay=0.1, grad_clip=None))
    for name, param in model.named_parameters():
        param.grad = grads[name].to(dtype)
    grad_norm, skipped = optimizer.step()
    assert not skipped and grad_norm == pytest.approx(float(torch.cat([g.flatten() for g in grads.values()]).norm()))
    mains = dict(zip(["weight", "bias"], optimizer.main_params, strict=True))
    expected_weight = adamw_first_step(start["weight"], grads["weight"], 1e-3, 0.1)
    expected_bias = adamw_first_step(start["bias"], grads["bias"], 1e-3, 0.0)  # 1-D: no weight decay
    torch.testing.assert_close(mains["weight"].detach(), expected_weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mains["bias"].detach(), expected_bias, rtol=1e-6, atol=1e-7)
    assert all(m.dtype == torch.float32 for m in optimizer.main_params)
    for name, param in model.named_parameters():  # the model's weights: the main params rounded to its dtype
        assert param.dtype == dtype and torch.equal(param.detach(), mains[name].detach().to(dtype))


def test_bf16_weights_follow_small_steps_that_plain_bf16_adamw_loses(megatron):
    """lr 1e-6 on weights of 0.02: each step is far below half a bf16 ulp (6.1e-5 there), so AdamW on the bf16
    weights themselves never moves them; the fp32 main params accumulate every step and the bf16 weights follow."""
    lr, steps = 1e-6, 100
    plain = Tiny(torch.bfloat16)
    plain_adamw = torch.optim.AdamW(plain.parameters(), lr=lr, weight_decay=0.0)
    model = Tiny(torch.bfloat16)
    start = model.weight.detach().clone()
    optimizer = MainParamsAdamW(model, OptimConfig(lr=lr, grad_clip=None))
    for _ in range(steps):
        for m in (plain, model):
            m.weight.grad = torch.ones_like(m.weight)
            m.bias.grad = torch.ones_like(m.bias)
        plain_adamw.step()
        optimizer.step()
    assert torch.equal(plain.weight.detach()[0, 0], start[0, 0])  # the fault: 100 steps lost
    main = optimizer.main_params[0].detach()
    torch.testing.assert_close(main, start.float() - steps * lr, rtol=1e-5, atol=1e-8)  # every step kept
    assert model.weight[0, 0] < start[0, 0]  # 1e-4 down: more than half an ulp: it moved


def test_a_bf16_policy_learns(megatron, tiny_model):
    policy = Policy.from_hf(tiny_model, OptimConfig(lr=1e-6), LossConfig(), dtype=torch.bfloat16)
    assert {p.dtype for p in policy.model.parameters() if p.ndim == 2} == {torch.bfloat16}
    names = [n for n, _ in policy.model.named_parameters()]
    before = {n: m.detach().clone() for n, m in zip(names, policy.optimizer.main_params, strict=True)}
    batch = rl_batch_ids(tiny_model)
    batch.old_logprobs = policy.logprobs(batch)
    for _ in range(10):
        metrics = policy.train_step(batch)
        assert metrics["skipped"] == 0.0
    moved = total = 0
    for name, param, main in zip(names, policy.model.parameters(), policy.optimizer.main_params, strict=True):
        assert torch.equal(param.detach(), main.detach().to(param.dtype)), name  # (megatron keeps norms fp32)
        if "word_embeddings" not in name:  # rows of tokens not in the batch get no gradient
            moved += int((main.detach() != before[name]).sum())
            total += main.numel()
    assert moved / total > 0.99  # plain AdamW on these bf16 weights moved 1.9% of them


def test_fresh_optimizer_after_sft_and_sft_at_temperature_one(megatron, tiny_model):
    from transformers import AutoTokenizer

    from fabric.trainer.sft import make_sft_batch

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    policy = Policy.from_hf(tiny_model, OptimConfig(lr=1e-3), LossConfig(temperature=0.5))
    pairs = [("Add 2 and 3.\n", "<answer>5</answer>"), ("Add 1 and 1.\n", "<answer>2</answer>")]
    sft = make_sft_batch(tokenizer, pairs)
    with torch.no_grad():
        at_one = losses.token_logprobs(policy.model, sft.input_ids, sft.attention_mask, temperature=1.0)
    expected = float(losses.sft_loss(at_one, sft.response_mask))
    assert policy.sft_step(sft)["loss"] == pytest.approx(expected, rel=1e-5)  # T = 1, not the sampler's 0.5
    for _ in range(2):
        policy.sft_step(sft)

    batch = rl_batch_ids(tiny_model)
    batch.advantages = torch.zeros(len(batch))  # no RL signal: a fresh AdamW must not move anything
    carried = [p.detach().clone() for p in policy.model.parameters()]
    policy.reset_optimizer()
    assert not policy.optimizer.state
    policy.train_step(batch)
    assert all(torch.equal(p.detach(), c) for p, c in zip(policy.model.parameters(), carried, strict=True))
