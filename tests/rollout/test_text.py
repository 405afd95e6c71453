"""The server's end-of-sample text (fabric.rollout.vllm.engine.stream_text) against tokenizers' DecodeStream primed
with the prompt, which vLLM's incremental detokenizer runs: the same text for whole-character samples (one decode)
and for samples cut inside a character or holding stray continuation bytes (the stream itself)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from fabric.rollout.vllm.engine import _decode_stream, stream_text


def _stream(backend, prompt, ids) -> str:
    stream = _decode_stream(backend, prompt)
    return "".join(piece for t in ids if (piece := stream.step(backend, t)))


@pytest.fixture(scope="module")
def backend(tiny_model):
    return Tokenizer.from_file(f"{tiny_model}/tokenizer.json")


def test_stream_text_equals_the_prompt_primed_decode_stream(backend):
    rng = random.Random(0)
    vocab = backend.get_vocab_size()
    texts = ["Add 3 and 4.\n", "The answer is \\boxed{7}.", "数学 ü é — ok", "x = 1/2; y = 3"]
    samples = [backend.encode(t).ids for t in texts]
    words = ["Add", " 3", " and", " 4", ".", "\n", " The", " answer", " is", " \\boxed{7}", " 数学", " ü", " —"]
    samples += [backend.encode("".join(rng.choices(words, k=rng.randrange(1, 12)))).ids for _ in range(100)]
    samples += [[rng.randrange(vocab) for _ in range(rng.randrange(1, 40))] for _ in range(300)]
    cut = backend.encode("数学 ü").ids
    samples += [cut[:k] for k in range(1, len(cut))]  # ends inside a character: the stream withholds its bytes
    prompts = [backend.encode(t).ids for t in texts]  # whole characters, as real prompts
    clean, partial = 0, 0
    for n, ids in enumerate(samples):
        if n % 2:
            prompt = prompts[n % len(prompts)]
        else:  # random ids: broken bytes in the prompt too
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
        expected = _stream(backend, prompt, ids)
        assert stream_text(backend, prompt, ids) == expected, (prompt, ids)
        whole = [backend.decode(x, skip_special_tokens=True) for x in (prompt, ids)]
        clean += not any("\ufffd" in w for w in whole)
        partial += "\ufffd" in whole[1]
    assert clean > 50 and partial > 10  # both paths taken: the one decode and the stream
