"""Generation throughput on the tiny model, three ways, one after another with the same prompts, sampling and
engine settings:

  fabric      `fabric serve rollout` + RolloutClient: every prompt on one Generate stream
  in-process  the same vLLM AsyncLLM called directly (what the fabric's engine adapter does, minus gRPC)
  http        vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`), /v1/completions,
              all prompts concurrently (what TRL, slime and AReaL users call today)

Each gets a warm-up round, then REPEATS timed rounds; the fastest round counts (this machine is shared: the fastest
round is the one least disturbed by other work; the median is printed beside it). Sampling is seeded per prompt, so
all three generate the same tokens (the totals are printed to show it). Prints tokens/s of each and the ratios
fabric / in-process (goal >= 0.95) and fabric / http (goal > 1).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUM_PROMPTS = 128
MAX_NEW_TOKENS = 128
REPEATS = 5
# max_num_seqs pinned: vLLM's default differs between the engine (256) and the HTTP server (128 on CPU).
ENGINE = {"block_size": 32, "dtype": "float32", "max_model_len": 256, "enforce_eager": True,
          "gpu_memory_utilization": 0.3, "max_num_seqs": NUM_PROMPTS}  # fmt: skip
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": MAX_NEW_TOKENS}


def prompts() -> list[str]:
    from fabric.tasks import arithmetic

    return [row["prompt"] for row in arithmetic.examples(seed=1, count=NUM_PROMPTS)]


def summarize(rounds: list[tuple[float, int]]) -> dict:
    """(seconds, tokens) per round -> the fastest round's figures, and the median tokens/s."""
    rounds = sorted(rounds)
    seconds, tokens = rounds[0]
    median_seconds, median_tokens = rounds[len(rounds) // 2]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "median_tokens_per_s": median_tokens / median_seconds}  # fmt: skip


def timed_rounds(run_round) -> dict:
    """Warm-up, then REPEATS rounds of `run_round() -> tokens`."""
    run_round()
    rounds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        tokens = run_round()
        rounds.append((time.perf_counter() - start, tokens))
    return summarize(rounds)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}  # fmt: skip


# ---- fabric ----


def bench_fabric(model: str, workdir: Path) -> dict:
    from fabric.rollout.client import GenerateRequest, RolloutClient, SamplingParams
    from tests.rollout.process import start_rollout_server, write_config

    config = write_config(workdir / "rollout.yaml", model, strategy_config=ENGINE, infer_batch_size=NUM_PROMPTS)
    server = start_rollout_server(config)
    texts = prompts()

    async def one_round() -> int:
        requests = [
            GenerateRequest(request_id=str(i), prompt=p, sampling=SamplingParams(seed=i, **SAMPLING))
            for i, p in enumerate(texts)
        ]
        async with RolloutClient(server.address) as client:
            return sum([len(r.token_ids) async for r in client.generate(requests)])

    try:
        return timed_rounds(lambda: asyncio.run(one_round()))
    finally:
        server.terminate()


# ---- in-process (runs in a child process: `python -m bench.generation in-process MODEL`) ----


def bench_in_process(model: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "bench.generation", "in-process", model],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise RuntimeError("in-process run failed:\n" + result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def _in_process_main(model: str) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    texts = prompts()

    async def main() -> dict:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **ENGINE))
        tokenizer = engine.get_tokenizer()

        async def one(i: int, text: str) -> int:
            params = SamplingParams(
                max_tokens=MAX_NEW_TOKENS, temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"], seed=i,
                logprobs=0, flat_logprobs=True, output_kind=RequestOutputKind.FINAL_ONLY,
            )  # fmt: skip
            (prompt,) = engine.renderer.render_cmpl([TokensPrompt(prompt_token_ids=tokenizer.encode(text))])
            async for output in engine.generate(prompt, params, f"r{i}-{time.monotonic_ns()}"):
                final = output
            return len(final.outputs[0].token_ids)

        async def one_round() -> int:
            return sum(await asyncio.gather(*(one(i, t) for i, t in enumerate(texts))))

        await one_round()
        rounds = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            tokens = await one_round()
            rounds.append((time.perf_counter() - start, tokens))
        engine.shutdown()
        return summarize(rounds)

    print(json.dumps(asyncio.run(main())), flush=True)


# ---- vLLM's OpenAI-compatible HTTP server ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_http(model: str, workdir: Path) -> dict:
    import aiohttp

    port = _free_port()
    flags = []
    for name, value in ENGINE.items():  # the same engine arguments, as command-line flags
        flags += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    log = open(workdir / "http.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
         "--port", str(port), *flags],
        cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    texts = prompts()

    async def wait_ready():
        deadline = time.monotonic() + 600
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if server.poll() is not None:
                    raise RuntimeError(f"HTTP server exited; see {workdir / 'http.log'}")
                try:
                    async with session.get(f"{base}/health") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError("HTTP server did not become ready")

    async def one_round() -> int:
        connector = aiohttp.TCPConnector(limit=NUM_PROMPTS)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(i: int, text: str) -> int:
                body = {"model": model, "prompt": text, "max_tokens": MAX_NEW_TOKENS, "seed": i, "logprobs": 0,
                        "temperature": SAMPLING["temperature"], "top_p": SAMPLING["top_p"]}  # fmt: skip
                async with session.post(f"{base}/v1/completions", json=body) as response:
                    response.raise_for_status()
                    return (await response.json())["usage"]["completion_tokens"]

            return sum(await asyncio.gather(*(one(i, t) for i, t in enumerate(texts))))

    try:
        asyncio.run(wait_ready())
        return timed_rounds(lambda: asyncio.run(one_round()))
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def main() -> None:
    from fabric.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        workdir = Path(tmp)
        model = str(make_tiny_model(workdir / "model", seed=0))
        print(f"{NUM_PROMPTS} prompts x up to {MAX_NEW_TOKENS} new tokens, seeded sampling, logprobs on; "
              f"warm-up + {REPEATS} rounds each, median round", flush=True)  # fmt: skip
        results = {}
        for name, run in (
            ("fabric Generate stream", lambda: bench_fabric(model, workdir)),
            ("vLLM in-process", lambda: bench_in_process(model)),
            ("vLLM OpenAI HTTP server", lambda: bench_http(model, workdir)),
        ):
            print(f"running {name} ...", flush=True)
            results[name] = run()
            r = results[name]
            print(f"  {name:<26} {r['tokens_per_s']:8.0f} tokens/s  ({r['tokens']} tokens in {r['seconds']:.2f} s; "
                  f"median round {r['median_tokens_per_s']:.0f} tokens/s)", flush=True)  # fmt: skip
    fabric, in_process, http = results.values()
    print(f"fabric / in-process: {fabric['tokens_per_s'] / in_process['tokens_per_s']:.3f}  (goal >= 0.95)")
    print(f"fabric / http:       {fabric['tokens_per_s'] / http['tokens_per_s']:.3f}  (goal > 1)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "in-process":
        _in_process_main(sys.argv[2])
    else:
        main()
