"""Generation throughput on the tiny model, three ways, with the same prompts, seeded sampling and engine settings:

  fabric      `fabric serve rollout` + RolloutClient: every prompt on one GenerateBatch stream (the trainer's path)
  in-process  the same vLLM AsyncLLM called directly (what the fabric's engine adapter does, minus gRPC), in a
              child process of its own
  http        vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`), /v1/completions,
              all prompts concurrently (what TRL, slime and AReaL users call today)

The three are started one after another and then measured in interleaved rounds: each cycle runs one round of
each, one after another (never two at once; an idle vLLM engine waits without using CPU). This machine is shared
and its load swings by several times within minutes, so back-to-back figures taken minutes apart are not
comparable; rounds seconds apart are. Reported per way: the fastest round and the median round; the ratios are the
median over cycles of each cycle's ratio. Sampling is seeded per prompt, so all three generate the same tokens (the
totals are printed to show it).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUM_PROMPTS = 128
MAX_NEW_TOKENS = 128
CYCLES = 15
# max_num_seqs pinned: vLLM's default differs between the engine (256) and the HTTP server (128 on CPU).
ENGINE = {"block_size": 32, "dtype": "float32", "max_model_len": 256, "enforce_eager": True,
          "gpu_memory_utilization": 0.3, "max_num_seqs": NUM_PROMPTS}  # fmt: skip
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": MAX_NEW_TOKENS}


def prompts() -> list[str]:
    from fabric.tasks import arithmetic

    return [row["prompt"] for row in arithmetic.examples(seed=1, count=NUM_PROMPTS)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}  # fmt: skip


def _timed(run_round) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = run_round()
    return time.perf_counter() - start, tokens


class FabricWay:
    """`fabric serve rollout` in a subprocess; the client runs here."""

    def __init__(self, model: str, workdir: Path):
        from tests.rollout.configs import write_config
        from tests.servers import serve

        config = write_config(workdir / "rollout.yaml", model, strategy_config=ENGINE, infer_batch_size=NUM_PROMPTS)
        self.server = serve("rollout", config)

    def round(self) -> tuple[float, int]:
        from fabric.rollout.client import GenerateRequest, RolloutClient, SamplingParams

        requests = [
            GenerateRequest(request_id=str(i), prompt=p, sampling=SamplingParams(seed=i, **SAMPLING))
            for i, p in enumerate(prompts())
        ]

        async def go() -> int:
            async with RolloutClient(self.server.address) as client:
                return sum([len(r.token_ids) async for r in client.generate_batch(requests)])

        return _timed(lambda: asyncio.run(go()))

    def close(self) -> None:
        self.server.stop()


class InProcessWay:
    """An AsyncLLM in a child process (`python -m bench.generation in-process MODEL`), driven over stdin: each
    `round` line runs one round there and answers with one JSON line {seconds, tokens}."""

    def __init__(self, model: str, workdir: Path):
        self.log = open(workdir / "in-process.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.generation", "in-process", model],
            cwd=ROOT, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
        )  # fmt: skip
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"in-process engine did not start; see {workdir / 'in-process.log'}")

    def round(self) -> tuple[float, int]:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline())
        return result["seconds"], result["tokens"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(120)
        self.log.close()


def _in_process_main(model: str) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    texts = prompts()
    # stdout carries the protocol; vLLM (and its engine process) log to stdout, so send fd 1 to stderr.
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    async def main() -> None:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **ENGINE))
        tokenizer = engine.get_tokenizer()
        rounds = 0

        async def one(i: int, text: str) -> int:
            params = SamplingParams(
                max_tokens=MAX_NEW_TOKENS, temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"], seed=i,
                logprobs=0, flat_logprobs=True, output_kind=RequestOutputKind.FINAL_ONLY,
            )  # fmt: skip
            (prompt,) = engine.renderer.render_cmpl([TokensPrompt(prompt_token_ids=tokenizer.encode(text))])
            async for output in engine.generate(prompt, params, f"r{rounds}-{i}"):
                final = output
            return len(final.outputs[0].token_ids)

        print("ready", file=protocol, flush=True)
        loop = asyncio.get_running_loop()
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "round":
            rounds += 1
            start = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one(i, t) for i, t in enumerate(texts))))
            print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}), file=protocol, flush=True)
        engine.shutdown()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpWay:
    """vLLM's OpenAI-compatible server in a subprocess, called with aiohttp from here."""

    def __init__(self, model: str, workdir: Path):
        import aiohttp

        self.model, self.workdir = model, workdir
        self.base = f"http://127.0.0.1:{_free_port()}"
        flags = []
        for name, value in ENGINE.items():  # the same engine arguments, as command-line flags
            flags += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
        self.log = open(workdir / "http.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
             "--port", self.base.rsplit(":", 1)[1], *flags],
            cwd=ROOT, env=_env(), stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

        async def wait_ready() -> None:
            deadline = time.monotonic() + 600
            async with aiohttp.ClientSession() as session:
                while time.monotonic() < deadline:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"HTTP server exited; see {workdir / 'http.log'}")
                    try:
                        async with session.get(f"{self.base}/health") as response:
                            if response.status == 200:
                                return
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.5)
            raise RuntimeError("HTTP server did not become ready")

        asyncio.run(wait_ready())

    def round(self) -> tuple[float, int]:
        import aiohttp

        async def go() -> int:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=NUM_PROMPTS)) as session:

                async def one(i: int, text: str) -> int:
                    body = {"model": self.model, "prompt": text, "max_tokens": MAX_NEW_TOKENS, "seed": i, "logprobs": 0,
                            "temperature": SAMPLING["temperature"], "top_p": SAMPLING["top_p"]}  # fmt: skip
                    async with session.post(f"{self.base}/v1/completions", json=body) as response:
                        response.raise_for_status()
                        return (await response.json())["usage"]["completion_tokens"]

                return sum(await asyncio.gather(*(one(i, t) for i, t in enumerate(prompts()))))

        return _timed(lambda: asyncio.run(go()))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def main() -> None:
    from fabric.models.tiny import make_tiny_model

    names = ("fabric GenerateBatch stream", "vLLM in-process", "vLLM OpenAI HTTP server")
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        workdir = Path(tmp)
        model = str(make_tiny_model(workdir / "model", seed=0))
        print(f"{NUM_PROMPTS} prompts x up to {MAX_NEW_TOKENS} new tokens, seeded sampling, logprobs on; "
              f"{CYCLES} interleaved cycles after a warm-up round each", flush=True)  # fmt: skip
        ways = []
        try:
            for name, way in zip(names, (FabricWay, InProcessWay, HttpWay), strict=True):
                print(f"starting {name} ...", flush=True)
                ways.append(way(model, workdir))
                ways[-1].round()  # warm-up
            rounds: list[list[tuple[float, int]]] = [[] for _ in ways]
            for cycle in range(CYCLES):
                order = [(cycle + k) % len(ways) for k in range(len(ways))]  # rotate who goes first
                for k in order:
                    rounds[k].append(ways[k].round())
                rates = "  ".join(f"{tokens / seconds:6.0f}" for seconds, tokens in (r[-1] for r in rounds))
                print(f"  cycle {cycle + 1}: tokens/s {rates}", flush=True)
        finally:
            for way in ways:
                way.close()

    for name, per_way in zip(names, rounds, strict=True):
        tokens = {t for _, t in per_way}
        rates = sorted(t / s for s, t in per_way)
        print(f"{name:<26} best {rates[-1]:7.0f} tokens/s   median {statistics.median(rates):7.0f} tokens/s   "
              f"({'/'.join(map(str, sorted(tokens)))} tokens per round)")  # fmt: skip

    def ratio(a: int, b: int) -> float:
        return statistics.median(
            (rounds[a][c][1] / rounds[a][c][0]) / (rounds[b][c][1] / rounds[b][c][0]) for c in range(CYCLES)
        )

    print(f"fabric / in-process: {ratio(0, 1):.3f}  (goal >= 0.95; median of per-cycle ratios)")
    print(f"fabric / http:       {ratio(0, 2):.3f}  (goal > 1)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "in-process":
        _in_process_main(sys.argv[2])
    else:
        main()
