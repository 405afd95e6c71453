"""Builds the tiny Qwen2 model the tests and the embedded default use, offline and deterministically.

A byte-level BPE is trained with `tokenizers` on the toy task's text, and a randomly initialised (seeded)
Qwen2ForCausalLM is saved as an ordinary HF model directory that transformers and vLLM both load.
"""

from __future__ import annotations

import json
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, so conversion code meets the general case
    head_dim=32,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
    initializer_range=0.1,  # wide enough that two seeds greedy-decode differently (0.02 collapses to one token)
)


def train_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from fabric.tasks import arithmetic

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(arithmetic.corpus(), trainer=trainer)
    return tokenizer


def make_tiny_model(out_dir: str | Path, seed: int = 0, vocab_size: int = 320, **overrides) -> Path:
    """Writes config.json, model.safetensors and the tokenizer files to out_dir; returns it."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size), eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert isinstance(eos_id, int)  # one token in, one id out
    padded_vocab = -(-len(tokenizer) // 64) * 64  # round up: friendlier shapes for the kernels
    config = Qwen2Config(
        vocab_size=padded_vocab,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype="float32",  # `torch_dtype` before transformers 5; config.json holds "dtype" either way
        **{**TINY_CONFIG, **overrides},
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "fabric_tiny.json").write_text(json.dumps({"seed": seed, "vocab_size": vocab_size}) + "\n")
    return out_dir


def cli_main(args) -> int:
    out = make_tiny_model(args.dir, seed=args.seed)
    print(f"tiny model written to {out}")
    return 0
