"""The megatron trainer model against transformers on the same tiny model and batch, side by side.

Times one optimizer step (forward + backward + AdamW, cross entropy on response tokens), a no-grad logprob
pass, and the full HF-layout weight export (what a weight sync streams); prints the megatron / HF ratios.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch


def _interleaved_seconds(fn_a, fn_b, repeats: int) -> tuple[list[float], list[float]]:
    """Alternates the two, so load from other processes on a shared machine hits both alike."""
    fn_a(), fn_b()  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times_a, times_b


def main(batch_size: int = 32, repeats: int = 20) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fabric.models.tiny import make_tiny_model
    from fabric.tasks import arithmetic
    from fabric.trainer import losses
    from fabric.trainer.policy import OptimConfig, Policy
    from fabric.trainer.sft import make_sft_batch

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_tiny_model(f"{tmp}/tiny", seed=0))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        rows = list(arithmetic.examples(seed=0, count=batch_size))
        batch = make_sft_batch(tokenizer, [(r["prompt"], r["response"]) for r in rows])
        tokens = int(batch.attention_mask.sum())
        policy = Policy.from_hf(model_dir, OptimConfig(lr=1e-5))
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        hf_optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-5)

        def hf_step():
            hf.train()
            hf_optimizer.zero_grad(set_to_none=True)
            logits = hf(batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = losses.sft_loss(losses.logprobs_from_logits(logits, batch.input_ids), batch.response_mask)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            hf_optimizer.step()

        @torch.no_grad()
        def hf_logprobs():
            hf.eval()
            return losses.logprobs_from_logits(
                hf(batch.input_ids, attention_mask=batch.attention_mask).logits, batch.input_ids
            )

        def hf_export():
            return {n: t.detach().clone() for n, t in hf.state_dict().items()}

        rows_out = [
            ("train step (fwd+bwd+AdamW)", lambda: policy.sft_step(batch), hf_step),
            ("logprobs (no grad)", lambda: policy.logprobs(batch), hf_logprobs),
            ("export HF state dict", lambda: list(policy.hf_weights()), hf_export),
        ]
        print(
            f"tiny Qwen2 (2 layers, hidden 128), batch {batch_size} x {batch.input_ids.shape[1]} ({tokens} tokens), "
            f"{torch.get_num_threads()} threads, {repeats} interleaved runs: min (median)"
        )
        print(f"{'':28s} {'megatron':>20s} {'transformers':>20s} {'megatron/HF':>12s}")
        for name, megatron_fn, hf_fn in rows_out:
            mg, hf_times = _interleaved_seconds(megatron_fn, hf_fn, repeats)
            cells = [f"{min(t) * 1e3:7.2f} ({statistics.median(t) * 1e3:7.2f}) ms" for t in (mg, hf_times)]
            print(f"{name:28s} {cells[0]:>20s} {cells[1]:>20s} {min(mg) / min(hf_times):11.2f}x")


if __name__ == "__main__":
    main()
