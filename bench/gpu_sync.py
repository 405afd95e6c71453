"""GPU weight paths on a 2-GPU CUDA host (issue 13): `python -m bench.gpu_sync MODE OUT_DIR`.

Modes (each writes OUT_DIR/MODE.json and prints every figure as it comes; a part that fails is recorded, the rest runs):
  nccl-check   no vLLM: raw NCCL broadcast GPU0 -> GPU1 in 1 GiB buckets, and a rank stalling mid-broadcast (the other
               rank must give up at its deadline, abort the group and return)
  correctness  a rollout server (fabric serve rollout, vLLM) on GPU1 with a tiny fp32 Qwen2: pushes over NCCL from
               GPU0 and CUDA IPC from GPU1, greedy output against transformers fp32 on GPU; a sender killed
               mid-broadcast (the old version keeps serving, nothing hangs)
  layouts      bf16 Qwen2.5-0.5B / 3B / 7B shapes (random weights on the trainer's GPU, load_format dummy on the
               server): raw NCCL of the same bytes, the fabric's NCCL path, CUDA IPC on one GPU, the host path (tcp,
               pinned staging; smallest layout only), the update while generation runs, generation tokens/s, and
               sleep / wake (memory freed as GetServerInfo reports it)
  vllm-own     in-process vLLM on the 7B layout: vLLM's own NCCL weight-transfer engine (trainer on GPU0, packed
               1 GiB buckets) and generation tokens/s, on the same random weights as the fabric's pushes
  all          one call's worth (`all OUT [LAYOUTS] [BUDGET_S]`): correctness (quick), then per layout raw NCCL, the
               fabric's NCCL (bytes only, and the full update: first, then the median of 3 on the kept group), CUDA
               IPC colocated, tcp (0.5B), generation tokens/s through the fabric; vLLM's own NCCL engine and
               in-process generation on the same model and prompts; one table at the end. Parts past the budget
               are skipped and say so.

Every process here keeps NCCL's NVLink multicast off (NCCL_NVLS_ENABLE=0), as the GPU machines require.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(SAFE_ENV)
GiB = 1 << 30

LAYOUTS = {  # Qwen2.5 shapes
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False),
}  # fmt: skip
RESULTS: dict = {}


def record(key, value):
    RESULTS[key] = value
    print(f"RESULT {key} = {json.dumps(value)}", flush=True)


def guarded(name):
    def wrap(fn):
        def run(*a, **k):
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            except Exception as exc:  # noqa: BLE001 - one part failing must not cost the others
                record(f"{name}.error", f"{type(exc).__name__}: {exc}"[:2000])
                traceback.print_exc()
            finally:
                print(f"-- {name}: {time.perf_counter() - started:.1f} s", flush=True)

        return run

    return wrap


# ---- raw NCCL between two processes ----------------------------------------------------------------------------


def _rank1(address: str, total: int, bucket: int, rounds: int, stall: bool) -> None:
    """GPU1's rank: receives `rounds` x `total` bytes in buckets into one flat buffer."""
    from torch.distributed import PrefixStore

    from fabric.weights.transports import collective

    torch.cuda.set_device(1)
    host, port = collective._split(address)
    store = PrefixStore("raw/", collective._store(host, port, False, 60))
    group = collective.Group("nccl", store, 1, 2, 20 if stall else 60, host, torch.device("cuda", 1))
    flat = torch.empty(total, dtype=torch.uint8, device="cuda:1")
    started = time.monotonic()
    try:
        for _ in range(rounds):
            for lo, hi in collective.buckets(total, bucket):
                group.broadcast(flat[lo:hi])
            group.wait_all(time.monotonic() + (3 if stall else 60))
        print(json.dumps({"rank1": "ok"}), flush=True)
    except Exception as exc:  # noqa: BLE001
        print(json.dumps({"rank1": f"{type(exc).__name__}: {exc}", "after_s": time.monotonic() - started}), flush=True)
    group.close()


def raw_nccl(total: int, bucket: int = GiB, rounds: int = 3, stall: bool = False) -> dict:
    from torch.distributed import PrefixStore

    from fabric.weights.transports import collective

    torch.cuda.set_device(0)
    master = collective._store("127.0.0.1", 0, True, 60)
    peer = subprocess.Popen(
        [sys.executable, "-m", "bench.gpu_sync", "_rank1", f"127.0.0.1:{master.port}", str(total), str(bucket),
         str(rounds + 1), "1" if stall else "0"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, **SAFE_ENV},
    )  # fmt: skip
    group = collective.Group("nccl", PrefixStore("raw/", master), 0, 2, 60, "127.0.0.1", torch.device("cuda", 0))
    send = torch.empty(min(bucket, total), dtype=torch.uint8, device="cuda:0")
    times = []
    out: dict = {}
    try:
        for r in range(rounds + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i, (lo, hi) in enumerate(collective.buckets(total, bucket)):
                if stall and i == 1:
                    out["stalled_sender_sleeps_s"] = 8
                    time.sleep(8)
                    raise RuntimeError("stalled on purpose")
                group.broadcast(send[: hi - lo])
            group.wait_all(time.monotonic() + 60)
            if r:
                times.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001
        out["rank0"] = f"{type(exc).__name__}: {exc}"
        group.abort()
    group.close()
    line = peer.communicate(timeout=120)[0].strip().splitlines()
    out["rank1"] = json.loads(line[-1]) if line else None
    if times:
        best = min(times)
        out.update(bytes=total, seconds=best, gbps=total / best / 1e9)
    return out


# ---- rollout servers -------------------------------------------------------------------------------------------


def write_config(path: Path, model: str, dtype: str, util: float, dummy: bool, max_len: int = 1024) -> str:
    extra = ", load_format: dummy" if dummy else ""
    path.write_text(
        "actor_infer:\n"
        f"  pretrain: {model}\n"
        "  generating_args: {max_new_tokens: 16, temperature: 0.0}\n"
        "  strategy_args:\n"
        "    strategy_name: vllm\n"
        f"    strategy_config: {{dtype: {dtype}, max_model_len: {max_len}, enforce_eager: true,\n"
        f"                      gpu_memory_utilization: {util}{extra}}}\n"
        "  infer_batch_size: 512\n"
    )
    return str(path)


def start_server(config: str, log: Path, gpu: str = "1"):
    from fabric.procs import ServerProcess

    env = {**SAFE_ENV, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    server = ServerProcess("rollout", config, name="rollout", log_path=log, env=env)
    started = time.perf_counter()
    server.start()
    server.wait_ready(400)
    return server, time.perf_counter() - started


def stub(address):
    import grpc

    from fabric.v1 import rollout_pb2_grpc

    return rollout_pb2_grpc.RolloutServiceStub(
        grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 30)])
    )


def generate(address, prompts, max_new, ids=False):
    from fabric.v1 import rollout_pb2

    reqs = []
    for i, p in enumerate(prompts):
        r = rollout_pb2.GenerateRequest(
            request_id=str(i), sampling=rollout_pb2.SamplingParams(max_new_tokens=max_new, temperature=0)
        )
        if ids:
            r.prompt_token_ids.extend(p)
        else:
            r.prompt = p
        reqs.append(r)
    t0 = time.perf_counter()
    out = list(stub(address).Generate(iter(reqs), timeout=600))
    seconds = time.perf_counter() - t0
    errors = [o.error.message for o in out if o.HasField("error")]
    by_id = {o.request_id: o for o in out}
    tokens = [list(by_id[str(i)].token_ids) if str(i) in by_id else [] for i in range(len(prompts))]
    return tokens, seconds, {o.weight_version for o in out}, errors


def wstatus(address):
    from fabric.v1 import rollout_pb2

    return stub(address).GetWeightsStatus(rollout_pb2.GetWeightsStatusRequest(), timeout=30)


def push(source, target, version, transport):
    from fabric.weights.sender import push_weights

    t0 = time.perf_counter()
    report = asyncio.run(push_weights(source, [target], version=version, transport=transport, timeout=600))
    seconds = time.perf_counter() - t0
    r = report.results[0] if report.results else None
    return {
        "ok": report.ok, "seconds": seconds, "transport": r.transport if r else "",
        "reason": r.transport_reason if r else "",
        "server_seconds": r.seconds if r else 0, "commit_s": r.commit_seconds if r else 0,
        "transfer_s": getattr(report, "transfer_seconds", 0.0), "group_s": getattr(report, "group_seconds", 0.0),
        "sender": getattr(report, "collective_timings", {}), "error": r.error.message if r else "",
    }  # fmt: skip


def hf_greedy_gpu(model_dir, prompts, max_new):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to("cuda:0").eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids.to("cuda:0")
            o = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.eos_token_id)
            outs.append(o[0, ids.shape[1] :].tolist())
    return outs


def source_from_dir(model_dir, device):
    from fabric.weights.sender import WeightSource

    src = WeightSource.from_hf_checkpoint(model_dir)
    return WeightSource(((n, t.to(device)) for n, t in zip(src.names, src.tensors, strict=True)))


SENDER = """
import asyncio, sys, time
from fabric.weights.sender import WeightSource, push_weights
from fabric.weights.transports import collective
def hook(i):
    if i == 2:
        print("BUCKET", i, flush=True); time.sleep(600)
collective.AFTER_BUCKET = hook
s = WeightSource.from_hf_checkpoint(sys.argv[1])
s = WeightSource((n, t.to("cuda:0")) for n, t in zip(s.names, s.tensors))
asyncio.run(push_weights(s, [sys.argv[3]], version=int(sys.argv[2]), transport="nccl"))
"""


def correctness(out: Path, quick: bool = False) -> None:
    from fabric.models.tiny import make_tiny_model

    prompts = ["Add 3 and 4.\n", "Add 12 and 30.\n", "hello"]
    a, b = make_tiny_model(out / "tiny-a", seed=0), make_tiny_model(out / "tiny-b", seed=1)
    ref = {"a": hf_greedy_gpu(str(a), prompts, 16), "b": hf_greedy_gpu(str(b), prompts, 16)}
    server, start_s = start_server(
        write_config(out / "tiny.yaml", str(a), "float32", 0.2, False, 256), out / "tiny.log"
    )
    record("correctness.server_start_s", start_s)
    try:
        addr = server.address
        offers = [o.name for o in wstatus(addr).transports]
        record("correctness.offers", offers)
        tokens, _, versions, errors = generate(addr, prompts, 16)
        record("correctness.initial_equals_hf_a", tokens == ref["a"])
        initial = tokens  # model a as vLLM loaded it from disk: what an IPC push of a must reproduce
        r = push(source_from_dir(b, "cuda:0"), addr, 1, "nccl")
        record("correctness.nccl_push", r)
        tokens, _, versions, errors = generate(addr, prompts, 16)
        record(
            "correctness.nccl_greedy_equals_hf_b",
            {"equal": tokens == ref["b"], "versions": sorted(versions), "errors": errors},
        )
        r = push(source_from_dir(a, "cuda:1"), addr, 2, "ipc")
        record("correctness.ipc_push", r)
        tokens, _, versions, errors = generate(addr, prompts, 16)
        record("correctness.ipc_greedy_equals_hf_a", {
            "equal": tokens == ref["a"], "equals_initial": tokens == initial, "versions": sorted(versions),
        })  # fmt: skip
        if quick:  # again on the kept group and the cached handles, then nothing else
            src_b, src_a = source_from_dir(b, "cuda:0"), source_from_dir(a, "cuda:1")
            for v, (src, transport, want) in enumerate(
                [(src_b, "nccl", "b"), (src_a, "ipc", "a"), (src_b, "nccl", "b"), (src_a, "ipc", "a")], start=3
            ):
                r = push(src, addr, v, transport)
                tokens, _, versions, errors = generate(addr, prompts, 16)
                record(f"correctness.again_v{v}_{transport}", {
                    "ok": r["ok"], "formed": r["sender"].get("formed"), "seconds": r["seconds"],
                    "equals_hf": tokens == ref[want], "equals_initial": tokens == initial if want == "a" else None,
                    "versions": sorted(versions), "error": r["error"],
                })  # fmt: skip
            return
        # a sender killed mid-broadcast
        env = {**os.environ, **SAFE_ENV, "FABRIC_BUCKET_BYTES": str(64 * 1024), "FABRIC_COLLECTIVE_TIMEOUT_S": "10"}
        sender = subprocess.Popen(
            [sys.executable, "-c", SENDER, str(b), "3", addr], stdout=subprocess.PIPE, text=True, env=env
        )
        line = sender.stdout.readline()
        sender.kill()
        sender.wait()
        killed = time.monotonic()
        while wstatus(addr).staged_version and time.monotonic() - killed < 60:
            time.sleep(0.1)
        st = wstatus(addr)
        tokens, _, versions, errors = generate(addr, prompts, 16)
        record("correctness.sender_killed_mid_broadcast", {
            "sender_said": line.strip(), "server_gave_up_after_s": time.monotonic() - killed,
            "serving_version": st.serving_version, "staged_version": st.staged_version,
            "old_version_output_equals_hf_a": tokens == ref["a"], "versions": sorted(versions),
        })  # fmt: skip
        r = push(source_from_dir(b, "cuda:0"), addr, 3, "nccl")
        tokens, _, versions, _ = generate(addr, prompts, 16)
        record("correctness.next_nccl_push_after_kill", {**r, "equals_hf_b": tokens == ref["b"]})
    finally:
        server.stop()


def make_layout_dir(out: Path, name: str) -> Path:
    from transformers import Qwen2Config

    from fabric.models.tiny import make_tiny_model

    tiny = make_tiny_model(out / "tok")
    d = out / f"qwen2.5-{name}"
    d.mkdir(exist_ok=True)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (d / f.name).write_bytes(f.read_bytes())
    cfg = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, torch_dtype="bfloat16",
                      bos_token_id=0, eos_token_id=0, **LAYOUTS[name])  # fmt: skip
    cfg.save_pretrained(d)
    return d


def random_source(model_dir: Path, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from fabric.weights.sender import WeightSource

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    named = []
    for n, p in model.named_parameters():
        t = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
        t.normal_(0, 0.02, generator=g)
        named.append((n, t))
    return WeightSource(named)


def layouts(out: Path, names) -> None:
    for name in names:
        run_layout(out, name)


@guarded("layout")
def run_layout(out: Path, name: str) -> None:
    d = make_layout_dir(out, name)
    source = random_source(d, "cuda:0")
    size = source.total_bytes
    key = f"{name}"
    record(f"{key}.bytes", size)
    record(f"{key}.raw_nccl", raw_nccl(size))
    util = 0.45
    server, start_s = start_server(
        write_config(out / f"{name}.yaml", str(d), "bfloat16", util, True), out / f"{name}.log"
    )
    record(f"{key}.server_start_s", start_s)
    try:
        addr = server.address
        pushes = [push(source, addr, v, "nccl") for v in (1, 2, 3)]
        record(f"{key}.nccl_push", pushes)
        best = min(p["seconds"] for p in pushes)
        raw = RESULTS[f"{key}.raw_nccl"].get("seconds")
        transfer = min(p["transfer_s"] for p in pushes)
        record(f"{key}.nccl_summary", {
            "full_update_s": best, "transfer_s": transfer, "transfer_gbps": size / transfer / 1e9 if transfer else 0,
            "transfer_share_of_raw": raw / transfer if raw and transfer else None,
            "full_update_gbps": size / best / 1e9,
        })  # fmt: skip
        # the update while generation runs
        prompts = [[(7 * i + j) % 300 + 1 for j in range(64)] for i in range(256)]
        result = {}
        gen = threading.Thread(target=lambda: result.update(g=generate(addr, prompts, 256, ids=True)))
        gen.start()
        time.sleep(1.0)
        busy = push(source, addr, 4, "nccl")
        gen.join()
        toks, gs, versions, errors = result["g"]
        record(
            f"{key}.nccl_push_while_generating", {**busy, "gen_versions": sorted(versions), "gen_errors": errors[:3]}
        )
        # colocated CUDA IPC: the trainer's copy on the server's GPU
        colocated = random_source(d, "cuda:1")
        ipcs = [push(colocated, addr, v, "ipc") for v in (5, 6)]
        record(f"{key}.ipc_push", ipcs)
        del colocated
        torch.cuda.empty_cache()
        if name == "0.5B":
            record(f"{key}.tcp_push", push(source, addr, 7, "tcp"))
        # generation through the fabric
        toks, gs, versions, errors = generate(addr, prompts, 128, ids=True)
        n = sum(len(t) for t in toks)
        record(f"{key}.fabric_generation", {"tokens": n, "seconds": gs, "tokens_per_s": n / gs, "errors": errors[:3]})
        # sleep / wake
        record(f"{key}.sleep_wake", sleep_wake(addr, source))
    finally:
        server.stop()
    del source
    torch.cuda.empty_cache()


def sleep_wake(addr, source) -> dict:
    from fabric.v1 import rollout_pb2

    s = stub(addr)

    def info():
        i = s.GetServerInfo(rollout_pb2.RolloutServiceGetServerInfoRequest(), timeout=30)
        return i.device_memory_free_bytes / 1e9

    out = {"free_gb_awake": info()}
    for level in (1, 2):
        t0 = time.perf_counter()
        s.Sleep(rollout_pb2.SleepRequest(level=level), timeout=300)
        out[f"l{level}_sleep_s"] = time.perf_counter() - t0
        out[f"l{level}_free_gb_asleep"] = info()
        t0 = time.perf_counter()
        s.WakeUp(rollout_pb2.WakeUpRequest(tags=["weights"]), timeout=300)
        out[f"l{level}_wake_weights_s"] = time.perf_counter() - t0
        out[f"l{level}_free_gb_weights_only"] = info()
        if level == 2:  # weights were dropped: sync them before the KV cache comes back
            version = wstatus(addr).serving_version + 1
            out["l2_push_after_wake"] = push(source, addr, version, "nccl")
        t0 = time.perf_counter()
        s.WakeUp(rollout_pb2.WakeUpRequest(tags=["kv_cache"]), timeout=300)
        out[f"l{level}_wake_kv_s"] = time.perf_counter() - t0
        out[f"l{level}_free_gb_awake_again"] = info()
    return out


VLLM_OWN = r"""
import json, os, sys, time, threading, torch
from vllm import LLM, SamplingParams
model = sys.argv[1]
llm = LLM(model=model, load_format="dummy", dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.45,
          max_model_len=1024, weight_transfer_config={"backend": "nccl"})
prompts = [{"prompt_token_ids": [(7 * i + j) % 300 + 1 for j in range(64)]} for i in range(256)]
sp = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
llm.generate(prompts[:4], sp)
t0 = time.perf_counter(); outs = llm.generate(prompts, sp); dt = time.perf_counter() - t0
n = sum(len(o.outputs[0].token_ids) for o in outs)
print("RESULT vllm_inprocess_generation", json.dumps({"tokens": n, "seconds": dt, "tokens_per_s": n / dt}), flush=True)
"""


@guarded("vllm-own")
def vllm_own(out: Path) -> None:
    d = make_layout_dir(out, "7B")
    env = {**os.environ, **SAFE_ENV, "CUDA_VISIBLE_DEVICES": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    p = subprocess.run([sys.executable, "-c", VLLM_OWN, str(d)], capture_output=True, text=True, env=env, timeout=400)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            _, key, value = line.split(" ", 2)
            record(key, json.loads(value))
    if p.returncode:
        record("vllm_own.stderr_tail", p.stderr[-3000:])


# ---- all: one call's worth, with a budget ----------------------------------------------------------------------

T0 = time.monotonic()
BUDGET_S = 480.0


def left() -> float:
    return BUDGET_S - (time.monotonic() - T0)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def server_timings(log: Path, transport: str) -> list[dict]:
    """The receiver's own timings per update, from the rollout server's log."""
    import re

    out = []
    pattern = re.compile(rf"{transport} (?:update to )?version (\d+): (.*)$")
    for line in log.read_text(errors="replace").splitlines():
        m = pattern.search(line)
        if m:
            row = {"version": int(m.group(1))}
            for part in m.group(2).split(", "):
                k, _, v = part.partition(" ")
                row[k] = float(v)
            out.append(row)
    return out


PROMPTS_GEN = [[(7 * i + j) % 300 + 1 for j in range(64)] for i in range(256)]
MAX_NEW_GEN = 128


def first_tokens(addr) -> list:
    return generate(addr, PROMPTS_GEN[:4], 8, ids=True)[0]


@guarded("fabric")
def fabric_layout(out: Path, name: str, d: Path, source) -> None:
    """IPC and NCCL pushes in an order that separates their costs: IPC before any NCCL group, NCCL with a group per
    update (FABRIC_COLLECTIVE_KEEP=0), IPC again, NCCL on the kept group, IPC again. A path whose push takes more
    than SLOW_S is not repeated."""
    util = 0.45
    log = out / f"{name}.log"
    server, start_s = start_server(write_config(out / f"{name}.yaml", str(d), "bfloat16", util, True), log)
    record(f"{name}.server_start_s", start_s)
    version = [0]

    def pushes(label, src, transport, n, keep="1"):
        os.environ["FABRIC_COLLECTIVE_KEEP"] = keep
        got = []
        for _ in range(n):
            version[0] += 1
            got.append(push(src, addr, version[0], transport))
            if got[-1]["seconds"] > SLOW_S or not got[-1]["ok"]:
                break
        record(f"{name}.{label}", got)
        return got

    try:
        addr = server.address
        colocated = random_source(d, "cuda:1")  # the same values as `source` (same seed)
        ipc0 = pushes("ipc_before_any_nccl", colocated, "ipc", 2)
        tokens_ipc = first_tokens(addr)
        once = pushes("nccl_group_per_update", source, "nccl", 3, keep="0")
        tokens_nccl = first_tokens(addr)
        record(f"{name}.same_tokens_after_ipc_and_nccl", tokens_ipc == tokens_nccl)
        ipc1 = pushes("ipc_after_group_per_update", colocated, "ipc", 1)
        kept = pushes("nccl_kept_group", source, "nccl", 4)
        ipc2 = pushes("ipc_after_kept_group", colocated, "ipc", 2)
        record(f"{name}.server_nccl_timings", server_timings(log, "nccl"))
        record(f"{name}.server_ipc_timings", server_timings(log, "ipc"))
        record(f"{name}.server_commit_timings", server_timings(log, "commit of"))
        ok = [p for p in kept if p["ok"]]
        record(f"{name}.nccl_summary", {
            "first_s": kept[0]["seconds"] if kept else None,
            "full_update_median_s": median([p["seconds"] for p in ok[1:]]) if len(ok) > 1 else None,
            "transfer_median_s": median([p["transfer_s"] for p in ok]) if ok else None,
            "group_per_update_median_s": median([p["seconds"] for p in once if p["ok"]]),
            "group_per_update_first_s": once[0]["seconds"] if once else None,
            "formed": [p["sender"].get("formed") for p in kept],
        })  # fmt: skip
        ipcs = [p for p in ipc0 + ipc1 + ipc2 if p["ok"]]
        record(f"{name}.ipc_summary", {
            "first_s": ipc0[0]["seconds"] if ipc0 else None,
            "full_update_median_s": median([p["seconds"] for p in ipcs[1:]]) if len(ipcs) > 1 else None,
        })  # fmt: skip
        del colocated
        torch.cuda.empty_cache()
        if name == "0.5B":
            pushes("tcp_push", source, "tcp", 2)
        # the weights vLLM's own engine gets too, then generation through the fabric
        last = pushes("last_nccl", source, "nccl", 1)
        record(f"{name}.last_push_ok", bool(last and last[-1]["ok"]))
        toks, gs, versions, errors = generate(addr, PROMPTS_GEN, MAX_NEW_GEN, ids=True)
        n = sum(len(t) for t in toks)
        record(f"{name}.fabric_generation", {
            "tokens": n, "seconds": gs, "tokens_per_s": n / gs, "errors": errors[:3], "versions": sorted(versions),
            "first_tokens": toks[0][:8],
        })  # fmt: skip
    finally:
        os.environ["FABRIC_COLLECTIVE_KEEP"] = "1"
        server.stop()
        torch.cuda.empty_cache()


SLOW_S = 3.0


VLLM_OWN_CHILD = r"""
import json, os, sys, time
from vllm import LLM, SamplingParams
model, port, rounds, util = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
t0 = time.perf_counter()
llm = LLM(model=model, load_format="dummy", dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=util,
          max_model_len=1024, weight_transfer_config={"backend": "nccl"})
print("READY", time.perf_counter() - t0, flush=True)
spec = json.loads(sys.stdin.readline())
llm.init_weight_transfer_engine({"init_info": dict(master_address="127.0.0.1", master_port=port, rank_offset=1,
                                                   world_size=2)})
times = []
for r in range(rounds):
    sys.stdin.readline()
    t = time.perf_counter()
    llm.start_weight_update()
    llm.update_weights({"update_info": dict(names=spec["names"], dtype_names=spec["dtype_names"],
                                            shapes=spec["shapes"], packed=True)})
    llm.finish_weight_update()
    times.append(time.perf_counter() - t)
    print("DONE", flush=True)
print("RESULT update_s", json.dumps(times), flush=True)
prompts = [{"prompt_token_ids": p} for p in json.loads(sys.argv[5])]
sp = SamplingParams(max_tokens=int(sys.argv[6]), temperature=0)
llm.generate(prompts[:4], SamplingParams(max_tokens=8, temperature=0))
t = time.perf_counter(); outs = llm.generate(prompts, sp); dt = time.perf_counter() - t
n = sum(len(o.outputs[0].token_ids) for o in outs)
print("RESULT generation", json.dumps({"tokens": n, "seconds": dt, "tokens_per_s": n / dt,
                                        "first_tokens": list(outs[0].outputs[0].token_ids[:8])}), flush=True)
"""


@guarded("vllm-own")
def vllm_own_layout(out: Path, name: str, d: Path, source, rounds: int = 4) -> None:
    """vLLM 0.25.1's own NCCL weight-transfer engine: this process is the trainer (GPU0), an LLM on GPU1."""
    import socket

    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerSendWeightsArgs, NCCLWeightTransferEngine

    torch.cuda.set_device(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **SAFE_ENV, "CUDA_VISIBLE_DEVICES": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", VLLM_OWN_CHILD, str(d), str(port), str(rounds), "0.45", json.dumps(PROMPTS_GEN),
         str(MAX_NEW_GEN)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(out / f"vllm-own-{name}.log", "w"), text=True,
        env=env,
    )  # fmt: skip
    try:
        line = child.stdout.readline()
        while line and not line.startswith("READY"):  # vLLM logs on stdout too
            line = child.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError("vLLM did not start (see its log)")
        record(f"{name}.vllm_own_start_s", float(line.split()[1]))
        spec = {
            "names": source.names,
            "dtype_names": [str(t.dtype).removeprefix("torch.") for t in source.tensors],
            "shapes": [list(t.shape) for t in source.tensors],
        }
        child.stdin.write(json.dumps(spec) + "\n")
        child.stdin.flush()
        group = NCCLWeightTransferEngine.trainer_init(dict(master_address="127.0.0.1", master_port=port, world_size=2))
        sender = []
        for _ in range(rounds):
            child.stdin.write("go\n")
            child.stdin.flush()
            t = time.perf_counter()
            NCCLWeightTransferEngine.trainer_send_weights(
                iter(zip(source.names, source.tensors, strict=True)),
                NCCLTrainerSendWeightsArgs(group=group, packed=True),
            )
            torch.cuda.synchronize()
            done = child.stdout.readline()
            while done and not done.startswith("DONE"):
                done = child.stdout.readline()
            sender.append(time.perf_counter() - t)
            if not done.startswith("DONE"):
                raise RuntimeError(f"vLLM update failed: {done!r}")
        child.stdin.close()
        for line in child.stdout:
            if line.startswith("RESULT "):
                _, key, value = line.split(" ", 2)
                record(f"{name}.vllm_own_{key}", json.loads(value))
        record(f"{name}.vllm_own_sender_s", sender)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        tail = (out / f"vllm-own-{name}.log").read_text(errors="replace")[-1500:]
        if child.returncode:
            record(f"{name}.vllm_own_log_tail", tail)


def summary(names) -> None:
    rows = []
    for name in names:
        size = RESULTS.get(f"{name}.bytes")
        if not size:
            continue
        gb = size / 1e9
        raw = (RESULTS.get(f"{name}.raw_nccl") or {}).get("seconds")

        def row(what, seconds, note="", name=name, raw=raw, gb=gb):
            if not seconds:
                rows.append((name, what, "-", "-", "-", note))
                return
            share = f"{raw / seconds:.2f}" if raw else "-"
            rows.append((name, what, f"{seconds:.4f}", f"{gb / seconds:.1f}", share, note))

        row("raw NCCL broadcast (best of 3)", raw)
        nccl = RESULTS.get(f"{name}.nccl_summary") or {}
        row("fabric NCCL bytes only (median)", nccl.get("transfer_median_s"))
        row("fabric NCCL full update, first", nccl.get("first_s"), f"formed {nccl.get('formed')}")
        row("fabric NCCL full update (median of 3)", nccl.get("full_update_median_s"))
        row("fabric NCCL, a group per update, first", nccl.get("group_per_update_first_s"))
        row("fabric NCCL, a group per update (median)", nccl.get("group_per_update_median_s"))
        own = RESULTS.get(f"{name}.vllm_own_update_s") or []
        own_med = median(own[1:]) if len(own) > 1 else None
        row("vLLM own NCCL engine, first", own[0] if own else None)
        row("vLLM own NCCL engine (median of 3)", own_med)
        ipc = RESULTS.get(f"{name}.ipc_summary") or {}
        row("fabric IPC colocated, first", ipc.get("first_s"))
        row("fabric IPC colocated (median of 3)", ipc.get("full_update_median_s"))
        tcp = RESULTS.get(f"{name}.tcp_push") or []
        if tcp:
            row("fabric tcp host path (best of 2)", min(p["seconds"] for p in tcp))
        if own_med and nccl.get("full_update_median_s"):
            rows.append((name, "ratio vLLM-own / fabric NCCL update time", "", "", "",
                         f"{own_med / nccl['full_update_median_s']:.2f} (>= 1: fabric as fast or faster)"))  # fmt: skip
        fab = (RESULTS.get(f"{name}.fabric_generation") or {}).get("tokens_per_s")
        inproc = (RESULTS.get(f"{name}.vllm_own_generation") or {}).get("tokens_per_s")
        if fab:
            rows.append((name, "generation through the fabric, tokens/s", "", f"{fab:.0f}", "", ""))
        if inproc:
            rows.append((name, "generation in-process vLLM, tokens/s", "", f"{inproc:.0f}", "", ""))
        if fab and inproc:
            rows.append((name, "ratio fabric / in-process tokens/s", "", "", "", f"{fab / inproc:.3f}"))
    widths = [max(len(str(r[i])) for r in rows + [("layout", "path", "seconds", "GB/s", "x raw", "note")])
              for i in range(6)]  # fmt: skip
    print("\nSUMMARY (GB/s over the layout's bytes; x raw = raw NCCL time / this time)")
    for r in [("layout", "path", "seconds", "GB/s", "x raw", "note"), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)), flush=True)
    RESULTS["summary_rows"] = rows


def run_all(out: Path, names, budget: float) -> None:
    global BUDGET_S
    BUDGET_S = budget
    if os.environ.get("GPU_SYNC_CORRECTNESS", "1") == "1":
        guarded("correctness")(correctness)(out, quick=True)
    for name in names:
        if name != names[0] and left() < 150:
            record(f"{name}.skipped", f"budget: {left():.0f} s left")
            continue
        d = make_layout_dir(out, name)
        source = random_source(d, "cuda:0")
        record(f"{name}.bytes", source.total_bytes)
        record(f"{name}.raw_nccl", raw_nccl(source.total_bytes))
        fabric_layout(out, name, d, source)
        if name == names[0] or left() > 90:
            vllm_own_layout(out, name, d, source)
        else:
            record(f"{name}.vllm_own_skipped", f"budget: {left():.0f} s left")
        del source
        torch.cuda.empty_cache()
    summary(names)


def main(argv: list[str] | None = None) -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        print("gpu_sync: skipped, needs 2 CUDA devices (python -m bench.gpu_sync MODE OUT_DIR on a GPU host)")
        return
    argv = argv or ["layouts", "runs/gpu_sync"]
    mode, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    record("device", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    try:
        if mode == "nccl-check":
            guarded("raw_nccl_8GiB")(lambda: record("raw_nccl_8GiB", raw_nccl(8 * GiB)))()
            guarded("stall")(lambda: record("nccl_stall_deadline", raw_nccl(2 * GiB, rounds=1, stall=True)))()
        elif mode == "correctness":
            guarded("correctness")(correctness)(out)
        elif mode == "layouts":
            layouts(out, argv[2].split(",") if len(argv) > 2 else ["7B", "0.5B", "3B"])
        elif mode == "vllm-own":
            vllm_own(out)
        elif mode == "all":
            names = argv[2].split(",") if len(argv) > 2 else ["7B", "0.5B"]
            run_all(out, names, float(argv[3]) if len(argv) > 3 else BUDGET_S)
    finally:
        (out / f"{mode}.json").write_text(json.dumps(RESULTS, indent=2))


if __name__ == "__main__":
    if sys.argv[1] == "_rank1":
        _rank1(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1")
    else:
        main(sys.argv[1:])
