"""Greedy completions of a model directory with vLLM, as JSON on stdout (run as a script: vLLM spawns an engine)."""

from __future__ import annotations

import json
import sys


def main() -> None:
    model_dir, max_tokens = sys.argv[1], int(sys.argv[2])
    prompts = json.loads(sys.stdin.read())
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, block_size=32, max_model_len=128, enforce_eager=True, dtype="float32")
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    print("FABRIC_RESULT " + json.dumps([r.outputs[0].text for r in results]), flush=True)


if __name__ == "__main__":
    main()
