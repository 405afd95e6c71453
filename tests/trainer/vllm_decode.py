"""Greedy completions of a model directory with vLLM, and samples at a temperature with each sampled token's logprob,
from one engine, as JSON on stdout (run as a script: vLLM spawns an engine). The logprobs mode is the one the
fabric's rollout engine asks for (it changes what logprobs are returned, not what greedy picks)."""

from __future__ import annotations

import json
import sys


def main() -> None:
    model_dir, max_tokens, temperature = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    prompts = json.loads(sys.stdin.read())
    from vllm import LLM, SamplingParams

    from fabric.config import load_config
    from fabric.rollout.config import load_rollout_config
    from fabric.rollout.vllm.engine import build_engine_args

    cfg = load_config(None, base={"actor_infer": {"pretrain": model_dir, "strategy_args": {"strategy_name": "vllm"}}})
    mode = build_engine_args(load_rollout_config(cfg, "actor_infer"))["logprobs_mode"]
    llm = LLM(
        model=model_dir, block_size=32, max_model_len=128, enforce_eager=True, dtype="float32", logprobs_mode=mode
    )
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    params = [
        SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=k, logprobs=0) for k in range(len(prompts))
    ]
    rows = []
    for result in llm.generate(prompts, params, use_tqdm=False):
        out = result.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(out.logprobs, out.token_ids, strict=True)]
        rows.append({"prompt": result.prompt_token_ids, "tokens": list(out.token_ids), "logprobs": logprobs})
    result = {"greedy": [r.outputs[0].text for r in greedy], "mode": mode, "rows": rows}
    print("FABRIC_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
