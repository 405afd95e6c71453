"""Reference outputs the tests compare servers against: transformers' float32 greedy decoding of a checkpoint."""

from __future__ import annotations

from collections.abc import Sequence


def hf_greedy(model_dir: str, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """The greedy continuation of each prompt: what a server serving this checkpoint must generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)  # fmt: skip
            outputs.append(out[0, ids.shape[1] :].tolist())
    return outputs
