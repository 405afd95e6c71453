"""Supervised warm-up: teacher-forced cross entropy on response tokens, so a fresh model learns the task's format
before RL, and a greedy-decoding check of how well it does (with transformers, as a user would load it).

`python -m fabric.trainer.sft` measures the tiny model on the arithmetic task: steps and seconds to accuracy.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence

import torch

from fabric.trainer.model import export_hf_state_dict
from fabric.trainer.policy import Policy, TrainBatch

log = logging.getLogger(__name__)


def _tokenizer(policy: Policy, tokenizer=None):
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy.hf_dir)


def make_sft_batch(tokenizer, pairs: Sequence[tuple[str, str]]) -> TrainBatch:
    """Prompt and response tokenized apart (as at rollout time), the response closed by EOS and masked for loss."""
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p, _ in pairs]
    responses = [tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for _, r in pairs]
    return TrainBatch.from_token_lists(prompts, responses, pad_id=tokenizer.pad_token_id)


def sft_warmup(
    policy: Policy,
    pairs: Sequence[tuple[str, str]],
    steps: int,
    batch_size: int = 32,
    lr: float | None = None,
    seed: int = 0,
    tokenizer=None,
    on_step: Callable[[int, dict[str, float]], bool | None] | None = None,
    log_every: int = 10,
) -> list[dict[str, float]]:
    """`steps` optimizer steps of cross entropy on (prompt, response) pairs, batches drawn in shuffled passes.

    lr, when given, replaces the policy's learning rate for the warm-up and is restored after. on_step(step, metrics)
    is called after every step (1-based); returning True stops early. Returns every step's metrics.
    """
    if not pairs:
        raise ValueError("sft_warmup needs at least one (prompt, response) pair")
    tokenizer = _tokenizer(policy, tokenizer)
    rng = random.Random(seed)
    order: list[int] = []
    if policy.optimizer is None:
        raise ValueError("sft_warmup needs a trainable policy; this one is frozen (no optimizer)")
    previous_lr = policy.optimizer.param_groups[0]["lr"]
    if lr is not None:
        policy.set_lr(lr)
    history = []
    try:
        for step in range(1, steps + 1):
            if len(order) < batch_size:  # next shuffled pass over the data
                order += rng.sample(range(len(pairs)), len(pairs))
            chosen, order = order[:batch_size], order[batch_size:]
            metrics = policy.sft_step(make_sft_batch(tokenizer, [pairs[i] for i in chosen]))
            history.append(metrics)
            if log_every and step % log_every == 0:
                log.info("sft step %d/%d loss %.4f (%.2f s/step)", step, steps, metrics["loss"], metrics["seconds"])
            if on_step is not None and on_step(step, metrics):
                break
    finally:
        policy.set_lr(previous_lr)
    return history


class GreedyEvaluator:
    """Greedy decoding with transformers on the policy's current weights (copied in-memory; no checkpoint)."""

    def __init__(self, policy: Policy, tokenizer=None, max_new_tokens: int = 16):
        from transformers import AutoModelForCausalLM

        self.policy = policy
        self.tokenizer = _tokenizer(policy, tokenizer)
        self.tokenizer.padding_side = "left"  # generation continues every prompt from its last token
        self.max_new_tokens = max_new_tokens
        self.hf_model = AutoModelForCausalLM.from_config(policy.model.hf_config, dtype=torch.float32).eval()

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], batch_size: int = 128) -> list[str]:
        weights = export_hf_state_dict(self.policy.model)
        missing, unexpected = self.hf_model.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"exported weights do not fit the HF model: missing {missing}, unexpected {unexpected}")
        outputs = []
        for start in range(0, len(prompts), batch_size):
            encoded = self.tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            generated = self.hf_model.generate(
                **encoded,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            outputs += self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return outputs

    def accuracy(self, rows: Sequence[dict], extract_answer: Callable[[str], str | None]) -> dict[str, float]:
        """{"format": share with a parsable answer, "accuracy": share whose answer equals row["ground_truth"]}."""
        answers = [extract_answer(text) for text in self.generate([row["prompt"] for row in rows])]
        parsed = sum(a is not None for a in answers)
        correct = sum(a == row["ground_truth"] for a, row in zip(answers, rows, strict=True))
        return {"format": parsed / len(rows), "accuracy": correct / len(rows)}


def main(steps: int = 300, eval_every: int = 25, batch_size: int = 64, lr: float = 3e-3, held_out: int = 200) -> dict:
    """Warm-up of the tiny model on the arithmetic task; prints accuracy on held-out prompts as it goes."""
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fabric.models.tiny import make_tiny_model
    from fabric.tasks import arithmetic
    from fabric.trainer.policy import OptimConfig

    rows = list(arithmetic.examples(seed=0))
    evaluation, training = rows[:held_out], rows[held_out:]
    pairs = [(row["prompt"], row["response"]) for row in training]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(f"{tmp}/tiny", seed=0)
        policy = Policy.from_hf(str(model_dir), OptimConfig(lr=lr, grad_clip=1.0))
        evaluator = GreedyEvaluator(policy)
        started = time.perf_counter()
        train_seconds = 0.0
        first_reached: dict[str, tuple[int, float]] = {}
        print(f"sft warm-up: {len(pairs)} training pairs, {held_out} held-out prompts, batch {batch_size}, lr {lr}")

        def on_step(step: int, metrics: dict[str, float]) -> bool:
            nonlocal train_seconds
            train_seconds += metrics["seconds"]
            if step % eval_every:
                return False
            scores = evaluator.accuracy(evaluation, arithmetic.extract_answer)
            print(
                f"step {step:4d}  loss {metrics['loss']:.4f}  format {scores['format']:.0%}  "
                f"accuracy {scores['accuracy']:.1%}  train {train_seconds:.1f} s  "
                f"wall {time.perf_counter() - started:.1f} s",
                flush=True,
            )
            for threshold in (0.9, 0.99):
                if scores["format"] >= threshold:
                    first_reached.setdefault(f"format>={threshold:.0%}", (step, train_seconds))
            for threshold in (0.05, 0.2, 0.5):
                if scores["accuracy"] >= threshold:
                    first_reached.setdefault(f"accuracy>={threshold:.0%}", (step, train_seconds))
            return scores["accuracy"] >= 0.5

        sft_warmup(policy, pairs, steps, batch_size=batch_size, on_step=on_step, log_every=0)
    for name, (step, seconds) in first_reached.items():
        print(f"{name}: step {step}, {seconds:.1f} s of training")
    return first_reached


if __name__ == "__main__":
    main()
