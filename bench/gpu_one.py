"""The fabric on one GPU, beside in-process vLLM (issue 20): `python -m bench.gpu_one OUT_DIR [LAYOUTS] [BUDGET_S]`.

First, correctness: a tiny fp32 Qwen2 served from checkpoint a; checkpoints b, a, b pushed over CUDA IPC from this
process on the same GPU; after each, greedy output must equal transformers' on that checkpoint (the worker loads
straight into its parameters by default: FABRIC_LAYERWISE_RELOAD=1 takes vLLM's layerwise reload instead).

Per layout (Qwen2.5 shapes in bf16, `load_format: dummy`, eager, default 0.5B and 7B), on GPU 0:
  generation   256 prompts x 128 new tokens, greedy, token ids in, through `fabric serve rollout` over gRPC (one
               GenerateBatch stream, as the trainer's pool; two rounds over Generate for the record), with the
               sampled token's logprob (what the trainer asks) and without, in rounds
               alternating with the same prompts and samplings through vLLM's AsyncLLM in this process (both
               engines alive, each at UTIL of the GPU; AsyncLLM at its fastest: final output only, no
               detokenizing); then, with the server stopped, vLLM's offline LLM in a child process. Both in-process
               engines take the fabric's own engine arguments (sleep mode, processed logprobs, the LLM class's
               batch defaults, no stats logging). Dummy weights are seeded the same way in every engine, so all
               generate the same tokens (the totals are printed). Ratios: fabric / each in-process way.
  ipc          the trainer's side in this process (random bf16 tensors on GPU 0), the server colocated on GPU 0:
               six pushes over CUDA IPC in one event loop with the control channels kept (as the trainer pushes),
               each a full update (status, pack, transfer, pause, commit, resume), with the sender's phases and the
               server's own from its log; the version it serves afterwards.
Everything lands in OUT_DIR/gpu_one.json and one table at the end; a part that fails is recorded, the rest runs.
The fabric's own side runs as users get it: the config's defaults except the engine arguments named here.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench.gpu_sync import (
    SAFE_ENV,
    generate,
    hf_greedy_gpu,
    make_layout_dir,
    random_source,
    server_timings,
    source_from_dir,
)

os.environ.update(SAFE_ENV)
NUM_PROMPTS, PROMPT_LEN, MAX_NEW = 256, 64, 128
ROUNDS = int(os.environ.get("GPU_ONE_ROUNDS", "4"))  # timed rounds of each way
# Distinct prompts of printable ASCII in the layouts' byte-level tokenizer (ids 1-93), so that they decode to whole
# characters as a user's prompts do (ids of stray bytes would send each sample's text down the slow decode path).
PROMPTS = [
    [i % 93 + 1, i // 93 + 1] + [(7 * i + j) % 93 + 1 for j in range(PROMPT_LEN - 2)] for i in range(NUM_PROMPTS)
]
ENGINE = {"dtype": "bfloat16", "max_model_len": 1024, "enforce_eager": True, "load_format": "dummy"}
UTIL = 0.35  # of the GPU for each engine: room for the trainer's tensors and the staging buffers beside it
RESULTS: dict = {}
SPREAD: dict[str, list] = {}  # (first sample back, last) of each generation round, seconds: how staggered they finish


def record(key: str, value) -> None:
    RESULTS[key] = value
    print(f"{key}: {json.dumps(value, default=str)}", flush=True)


def guarded(key: str, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # one part failing must not cost the rest of the device call
        record(f"{key}.error", f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        return None


def write_config(path: Path, model: Path) -> Path:
    engine = ", ".join(f"{k}: {v if not isinstance(v, bool) else str(v).lower()}" for k, v in ENGINE.items())
    path.write_text(
        "actor_infer:\n"
        f"  pretrain: {model}\n"
        "  strategy_args:\n"
        "    strategy_name: vllm\n"
        f"    strategy_config: {{{engine}, gpu_memory_utilization: {UTIL}}}\n"
        f"  infer_batch_size: {NUM_PROMPTS}\n"
    )
    return path


def rates(rounds: list[tuple[float, int]]) -> dict:
    per_s = [tokens / seconds for seconds, tokens in rounds]
    return {
        "best_tok_s": max(per_s),
        "median_tok_s": statistics.median(per_s),
        "tokens": sorted({t for _, t in rounds}),
    }


# ---- the fabric: a rollout server, gRPC generation and IPC pushes --------------------------------------------------


async def grpc_round(address: str, logprobs: bool = True, batch: bool = True) -> tuple[float, int]:
    """One round through the rollout server: every prompt on one GenerateBatch stream, as the trainer's pool sends
    them (batch=False: one Generate message per request, as a plain client may)."""
    from fabric.rollout.client import GenerateRequest, RolloutClient, SamplingParams

    sampling = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, logprobs=logprobs)
    requests = [
        GenerateRequest(request_id=str(i), prompt_token_ids=p, sampling=sampling) for i, p in enumerate(PROMPTS)
    ]
    start = time.perf_counter()
    tokens, first = 0, None
    async with RolloutClient(address) as client:
        async for response in client.generate_batch(requests) if batch else client.generate(requests):
            tokens += len(response.token_ids)
            first = first or time.perf_counter() - start
    seconds = time.perf_counter() - start
    SPREAD.setdefault("fabric" if batch else "fabric_generate", []).append((round(first or 0, 3), round(seconds, 3)))
    return seconds, tokens


def start_async_engine(config_path: Path):
    """vLLM's AsyncLLM built from the fabric's own engine arguments, in this process (call inside the event loop)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from fabric.config import load_config
    from fabric.rollout.config import load_rollout_config
    from fabric.rollout.vllm.engine import build_engine_args, check_engine_args

    config = load_rollout_config(load_config(str(config_path)), "actor_infer")
    args = build_engine_args(config)
    return AsyncLLM.from_vllm_config(check_engine_args(config, args), disable_log_stats=args["disable_log_stats"])


async def async_round(engine, tag: str, logprobs: bool = True) -> tuple[float, int]:
    """One round in-process: every prompt to AsyncLLM.generate at once, at its fastest settings (final output only,
    no detokenizing), the way a user drives it in their own event loop."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=0 if logprobs else None,
                            output_kind=RequestOutputKind.FINAL_ONLY, detokenize=False)  # fmt: skip

    finished: list[float] = []

    async def one(i: int, ids: list[int]) -> int:
        (prompt,) = engine.renderer.render_cmpl([TokensPrompt(prompt_token_ids=ids)])
        async for output in engine.generate(prompt, params, f"{tag}-{i}"):
            final = output
        finished.append(time.perf_counter() - start)
        return len(final.outputs[0].token_ids)

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))))
    SPREAD.setdefault("async", []).append((round(min(finished), 3), round(max(finished), 3)))
    return time.perf_counter() - start, tokens


def generation_rounds(address: str, config_path: Path, name: str, profiler_for) -> None:
    """The fabric and in-process AsyncLLM, both alive on the GPU, in alternating rounds (fabric, AsyncLLM, with and
    without logprobs), so that neither gets a quieter minute of the machine than the other."""

    async def main() -> dict[str, list]:
        engine = start_async_engine(config_path)
        rounds: dict[str, list] = {"fabric": [], "fabric_nolp": [], "async": [], "async_nolp": [], "generate": []}
        try:
            await grpc_round(address)  # warm-up, both
            await async_round(engine, "warm")
            profiler = profiler_for()  # py-spy on the server during the next fabric rounds
            for r in range(ROUNDS):
                rounds["fabric"].append(await grpc_round(address))
                rounds["async"].append(await async_round(engine, f"lp{r}"))
                rounds["fabric_nolp"].append(await grpc_round(address, False))
                rounds["async_nolp"].append(await async_round(engine, f"nolp{r}", False))
                if r < 2:  # the one-message-per-request RPC, for the record
                    rounds["generate"].append(await grpc_round(address, True, batch=False))
            if profiler is not None:
                profiler.wait(60)
        finally:
            engine.shutdown()
        return rounds

    rounds = asyncio.run(main())
    record(f"{name}.fabric_grpc", rates(rounds["fabric"]))
    record(f"{name}.fabric_grpc_nolp", rates(rounds["fabric_nolp"]))
    record(f"{name}.fabric_grpc_generate_rpc", rates(rounds["generate"]))
    record(f"{name}.inprocess_async", rates(rounds["async"]))
    record(f"{name}.inprocess_async_nolp", rates(rounds["async_nolp"]))
    record(f"{name}.first_and_last_sample_s", dict(SPREAD))
    SPREAD.clear()


def profile(pid: int, path: Path):
    """py-spy (FABRIC_BENCH_PYSPY: its binary) samples the rollout server's Python threads that hold the GIL
    during the generation rounds, as collapsed stacks."""
    binary = os.environ.get("FABRIC_BENCH_PYSPY")
    if not binary:
        return None
    if not os.path.exists(binary):  # a profile is a bonus: its absence must not cost the measurement
        record("pyspy.error", f"FABRIC_BENCH_PYSPY={binary} does not exist: no profile")
        return None
    return subprocess.Popen([binary, "record", "--pid", str(pid), "--duration", "4", "--rate", "250", "--gil",
                             "--format", "raw", "--output", str(path), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def top_frames(path: Path, n: int = 25) -> list:
    """The functions most often on the GIL-holding stack (inclusive), with their share of the samples."""
    if not path.exists():
        return ["no profile"]
    total, counts = 0, {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for frame in set(stack.split(";")):
            counts[frame] = counts.get(frame, 0) + int(count)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return [f"{c / max(total, 1):.2f} {frame[:150]}" for frame, c in ranked]


def fabric_part(out: Path, name: str, model: Path) -> None:
    from fabric.procs import ServerProcess
    from fabric.weights.channels import ChannelCache
    from fabric.weights.sender import push_weights, weights_status

    log = out / f"rollout-{name}.log"
    env = {"CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    server = ServerProcess("rollout", write_config(out / f"rollout-{name}.yaml", model), log_path=log, env=env)
    started = time.perf_counter()
    server.start()
    try:
        server.wait_ready(600)
        record(f"{name}.server_start_s", time.perf_counter() - started)
        spy_path = out / f"pyspy-{name}.txt"
        generation_rounds(server.address, out / f"rollout-{name}.yaml", name,
                          lambda: profile(server.process.pid, spy_path))  # fmt: skip
        if spy_path.exists():
            record(f"{name}.server_profile_top", top_frames(spy_path))

        source = random_source(model, "cuda:0")

        async def pushes_in_one_loop(source) -> list:
            # as the trainer pushes: one event loop, its control channels kept from one version to the next
            done = []
            channels = ChannelCache()
            try:
                for version in range(1, 7):
                    t0 = time.perf_counter()
                    report = await push_weights(
                        source, [server.address], version=version, transport="ipc", channels=channels
                    )
                    done.append({"seconds": time.perf_counter() - t0, "ok": report.ok, "transport": report.transport,
                                 "phases": {k: round(v, 5) for k, v in report.phases.items()},
                                 "errors": [r.error.message for r in report.failed]})  # fmt: skip
            finally:
                await channels.close()
            return done

        pushes = asyncio.run(pushes_in_one_loop(source))
        record(f"{name}.ipc_pushes", pushes)
        record(f"{name}.ipc_serving_version", asyncio.run(weights_status(server.address)).serving_version)
        record(f"{name}.ipc_server_timings", server_timings(log, "ipc"))
        commits = [line.split("commit of version", 1)[1].strip() for line in log.read_text().splitlines()
                   if "commit of version" in line]  # fmt: skip
        record(f"{name}.commit_phases", commits[-3:])
        ok = [p["seconds"] for p in pushes[1:] if p["ok"]]
        record(f"{name}.ipc_full_update_median_s", statistics.median(ok) if ok else None)
        del source
    finally:
        server.stop()


def correctness(out: Path) -> None:
    from fabric.models.tiny import make_tiny_model
    from fabric.procs import ServerProcess
    from fabric.weights.sender import push_weights

    prompts = ["Add 3 and 4.\n", "Add 12 and 30.\n", "hello"]
    a, b = make_tiny_model(out / "tiny-a", seed=0), make_tiny_model(out / "tiny-b", seed=1)
    want = {"a": hf_greedy_gpu(str(a), prompts, 16), "b": hf_greedy_gpu(str(b), prompts, 16)}
    config = out / "tiny.yaml"
    config.write_text(
        f"actor_infer:\n  pretrain: {a}\n  strategy_args:\n    strategy_name: vllm\n"
        "    strategy_config: {dtype: float32, max_model_len: 256, enforce_eager: true, gpu_memory_utilization: 0.1}\n"
    )
    env = {"CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    server = ServerProcess("rollout", config, log_path=out / "tiny.log", env=env).start()
    try:
        server.wait_ready(300)
        initial, *_ = generate(server.address, prompts, 16)
        checks = {"initial_equals_hf_a": initial == want["a"]}
        for version, name in enumerate("bab", start=1):
            source = source_from_dir(a if name == "a" else b, "cuda:0")
            report = asyncio.run(push_weights(source, [server.address], version=version, transport="ipc"))
            tokens, _, versions, errors = generate(server.address, prompts, 16)
            checks[f"v{version}_{name}"] = {"ok": report.ok, "transport": report.transport,
                                            "equals_hf": tokens == want[name], "versions": sorted(versions),
                                            "equals_initial": tokens == initial if name == "a" else None,
                                            "errors": errors}  # fmt: skip
        record("correctness.ipc", checks)
    finally:
        server.stop()


# ---- in-process vLLM, in a child process of its own per engine --------------------------------------------------


def native_main(config_path: str) -> None:
    """Child: vLLM's offline LLM (the in-process engine ROLL drives) with the fabric's own engine arguments (sleep
    mode, processed logprobs, its weight-transfer backend), a warm-up, then ROUNDS rounds with the sampled token's
    logprob (as the fabric's trainer asks) and ROUNDS without; prints one JSON line {"lp": rounds, "nolp": rounds}."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from fabric.config import load_config
    from fabric.rollout.config import load_rollout_config
    from fabric.rollout.vllm.engine import build_engine_args

    config = load_rollout_config(load_config(config_path), "actor_infer")
    llm = LLM(**build_engine_args(config))
    prompts = [TokensPrompt(prompt_token_ids=p) for p in PROMPTS]
    rounds: dict[str, list] = {"lp": [], "nolp": []}
    for variant in ("lp", "nolp"):
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=0 if variant == "lp" else None)
        for r in range(ROUNDS + 1):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            if r:
                tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                rounds[variant].append((time.perf_counter() - start, tokens))
    print("RESULT " + json.dumps(rounds), flush=True)


def native_part(out: Path, name: str, model: Path) -> None:
    """vLLM's offline LLM in a child process (native_main), after the fabric's server has stopped."""
    config = out / f"rollout-{name}.yaml"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_one", "native", str(config)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    (out / f"native-llm-{name}.log").write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"in-process LLM failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    rounds = json.loads(lines[-1][7:])
    record(f"{name}.inprocess_llm", {**rates(rounds["lp"]), "wall_s": time.perf_counter() - started})
    record(f"{name}.inprocess_llm_nolp", rates(rounds["nolp"]))


# ---- the run ----------------------------------------------------------------------------------------------------


def summary(names: list[str]) -> None:
    print("\n| layout | logprobs | fabric gRPC tok/s | AsyncLLM in-process | LLM offline | fabric / AsyncLLM | "
          "fabric / LLM | IPC full update (median of 5) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")

    def f(x, spec=".0f"):
        return format(x, spec) if x else "-"

    for name in names:
        ipc = RESULTS.get(f"{name}.ipc_full_update_median_s")
        for suffix, label in (("", "sampled token's"), ("_nolp", "none")):
            fab = (RESULTS.get(f"{name}.fabric_grpc{suffix}") or {}).get("best_tok_s")
            asy = (RESULTS.get(f"{name}.inprocess_async{suffix}") or {}).get("best_tok_s")
            llm = (RESULTS.get(f"{name}.inprocess_llm{suffix}") or {}).get("best_tok_s")
            ratio_a = fab / asy if fab and asy else None
            ratio_l = fab / llm if fab and llm else None
            print(f"| {name} | {label} | {f(fab)} | {f(asy)} | {f(llm)} | {f(ratio_a, '.3f')} | {f(ratio_l, '.3f')} | "
                  f"{f(ipc, '.4f')} s |")  # fmt: skip


def main(argv: list[str]) -> None:
    if argv and argv[0] == "native":
        native_main(argv[1])
        return
    out = Path(argv[0] if argv else "runs/gpu_one")
    # "0.5B,7B" runs every way on both; "0.5B:fabric,7B:fabric+llm" picks ways per layout (fabric: the server,
    # AsyncLLM alternating with it, the IPC pushes; llm: the offline LLM)
    plan = {}
    for item in (argv[1] if len(argv) > 1 else "0.5B,7B").split(","):
        name, _, ways = item.partition(":")
        plan[name] = set(ways.split("+")) if ways else {"fabric", "llm"}
    names = list(plan)
    budget = float(argv[2]) if len(argv) > 2 else 560.0
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget
    if os.environ.get("GPU_ONE_CORRECTNESS", "1") != "0":  # 0: a device call spent on speed only
        guarded("correctness", correctness, out)
    for name in names:
        model = make_layout_dir(out, name)
        for part, fn, args in (
            ("fabric", fabric_part, (out, name, model)),
            ("inprocess_llm", native_part, (out, name, model)),
        ):
            if part.removeprefix("inprocess_") not in plan[name]:
                continue
            if time.monotonic() > deadline:
                record(f"{name}.{part}.skipped", "device-call budget spent")
                continue
            guarded(f"{name}.{part}", fn, *args)
    (out / "gpu_one.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    summary(names)


if __name__ == "__main__":
    main(sys.argv[1:])
