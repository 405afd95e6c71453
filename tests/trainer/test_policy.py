"""Policy: train steps lower the loss, micro-batching changes nothing, checkpoints load in transformers."""

from __future__ import annotations

import pytest
import torch

from fabric.trainer import losses
from fabric.trainer.model import read_hf_state_dict
from fabric.trainer.policy import LossConfig, OptimConfig, Policy, TrainBatch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def rl_batch_ids(model_dir: str) -> TrainBatch:
    """Two groups of two samples of different lengths; rewards favour the correct answers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["Add 2 and 3.\n", "Add 2 and 3.\n", "Add 10 and 7.\n", "Add 10 and 7.\n"]
    responses = ["<answer>5</answer>", "<answer>6</answer>", "<answer>17</answer>", "<answer>1</answer>"]
    batch = TrainBatch.from_token_lists(
        [tokenizer.encode(p) for p in prompts],
        [tokenizer.encode(r) + [tokenizer.eos_token_id] for r in responses],
        pad_id=tokenizer.pad_token_id,
    )
    batch.advantages = losses.grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), group_size=2)
    return batch


def test_batch_from_token_lists_right_pads_and_masks_responses():
    batch = TrainBatch.from_token_lists([[5, 6], [7]], [[8], [9, 10, 11]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 8, 0], [7, 9, 10, 11]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 0], [0, 1, 1, 1]]
    batch.validate()
    batch.old_logprobs = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(2, 3\), input_ids \(2, 4\)"):
        batch.validate()
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        TrainBatch.from_token_lists([[]], [[1]], pad_id=0)


def test_train_steps_lower_the_loss_on_a_fixed_batch(megatron, tiny_model, tokenizer):
    policy = Policy.from_hf(tiny_model, OptimConfig(lr=1e-4), LossConfig(kl_coef=0.05))
    reference = policy.frozen_copy()
    batch = rl_batch_ids(tiny_model)
    batch.old_logprobs = policy.logprobs(batch)
    batch.ref_logprobs = reference.logprobs(batch)
    torch.testing.assert_close(batch.old_logprobs, batch.ref_logprobs, rtol=0, atol=0)
    first = policy.train_step(batch)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    history = [first] + [policy.train_step(batch) for _ in range(4)]
    assert history[-1]["loss"] < first["loss"] - 0.03
    assert history[-1]["kl"] > 0 and history[-1]["weight_version"] == 5.0
    # the policy moved towards the rewarded answers: their logprob rose, the others' fell
    moved = (policy.logprobs(batch) - batch.old_logprobs) * batch.response_mask
    assert moved[0].sum() > 0 and moved[2].sum() > 0 and moved[1].sum() < 0 and moved[3].sum() < 0
    assert torch.equal(reference.logprobs(batch), batch.ref_logprobs)  # the reference stayed frozen
    with pytest.raises(RuntimeError, match="frozen"):
        reference.train_step(batch)


def test_micro_batches_give_the_same_step_as_the_whole_batch(megatron, tiny_model, tokenizer):
    batch = rl_batch_ids(tiny_model)
    whole = Policy.from_hf(tiny_model, OptimConfig(lr=1e-3))
    split = Policy.from_hf(tiny_model, OptimConfig(lr=1e-3, micro_batch_size=1))
    batch.old_logprobs = whole.logprobs(batch) - 0.1  # ratio != 1, so clipping is in play
    a, b = whole.train_step(batch), split.train_step(batch)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    split_params = dict(split.model.named_parameters())
    for name, param in whole.model.named_parameters():  # the gradients stay after the step
        torch.testing.assert_close(split_params[name].grad, param.grad, rtol=1e-4, atol=1e-7)


def test_train_step_refuses_incomplete_batches(megatron, tiny_model, tokenizer):
    policy = Policy.from_hf(tiny_model, OptimConfig(lr=1e-3), LossConfig(kl_coef=0.1))
    batch = rl_batch_ids(tiny_model)
    with pytest.raises(ValueError, match="ref_logprobs is None"):
        policy.train_step(batch)
    batch.advantages = None
    with pytest.raises(ValueError, match="advantages is None"):
        policy.train_step(batch)
    assert policy.weight_version == 0


def test_saved_checkpoint_loads_in_transformers_with_the_trained_weights(megatron, tiny_model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = Policy.from_hf(tiny_model, OptimConfig(lr=1e-2))
    batch = rl_batch_ids(tiny_model)
    policy.sft_step(batch)
    out = policy.save(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    original = read_hf_state_dict(tiny_model)
    trained = {name: tensor.cpu() for name, tensor in policy.hf_weights()}
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert not torch.equal(trained["model.norm.weight"], original["model.norm.weight"])  # it did train
    with torch.no_grad():
        expected = losses.logprobs_from_logits(loaded(batch.input_ids).logits, batch.input_ids) * batch.attention_mask
    torch.testing.assert_close(policy.logprobs(batch), expected, rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out).encode("Add 2 and 3.\n") == tokenizer.encode("Add 2 and 3.\n")
    assert (out / "generation_config.json").is_file()


def test_sft_warmup_teaches_the_answer_format(megatron, tiny_model, tokenizer):
    from fabric.tasks import arithmetic
    from fabric.trainer.sft import GreedyEvaluator, sft_warmup

    rows = list(arithmetic.examples(seed=0))
    held_out, training = rows[:32], rows[32:]
    policy = Policy.from_hf(tiny_model, OptimConfig(lr=1e-5))
    evaluator = GreedyEvaluator(policy, tokenizer)
    before = evaluator.accuracy(held_out, arithmetic.extract_answer)
    history = sft_warmup(policy, [(r["prompt"], r["response"]) for r in training], steps=30, batch_size=32, lr=3e-3)
    after = evaluator.accuracy(held_out, arithmetic.extract_answer)
    assert len(history) == 30 and history[-1]["loss"] < history[0]["loss"] / 2
    assert before["format"] < 0.2 and after["format"] >= 0.9
    assert policy.optimizer.param_groups[0]["lr"] == 1e-5  # the warm-up lr was temporary
