"""The fabric's trainer (megatron-core `Policy`) against plain transformers, same model, weights and batch.

On CUDA (one GPU, e.g. an H200), one command, about 3-5 minutes (the compiled rows' warm-up steps compile):

    PYTHONPATH=. python -m bench.trainer              # Qwen2.5-1.5B layout, real vocabulary (151,936), random weights
    PYTHONPATH=. python -m bench.trainer --smoke      # the same rows on a tiny model (CPU or GPU), for a dry run

Rows, each built from the same initial weights, run (1 warm-up step, then timed steps) and freed before the next;
a row that fails prints its error and the others still run:
- transformers: fp32 weights, bf16 autocast, SDPA attention, fused AdamW, full-vocabulary log-softmax (the
  twenty-line baseline);
- the fabric's Policy: bf16 weights, fp32 main params, fused AdamW; SDPA core attention, megatron's unfused
  attention (the reference), SDPA with full activation recompute, SDPA with compiled layers (FABRIC_TRAINER_COMPILE
  =layers: each decoder layer one torch.compile'd graph; its warm-up step is the compile);
- a variable-length RL batch (padding as rollouts leave it): transformers padded, the Policy padded, packed, and
  packed with ROLL's dynamic batching; compiled layers padded and with dynamic batching (padded: packed micro-batches
  would run the eager layers);
- the no-grad logprob pass and the HF-layout weight export (what a weight sync streams).
Each step is one optimizer step over the whole batch in micro-batches (the SFT loss on response tokens, token mean:
a loss that depends on the weights, so the rows' losses can be compared). TFLOP/s count 6 x parameters x real tokens
(the tied embedding once, as the output matmul; attention's own FLOPs not counted); MFU is against the bf16 dense
peak given by --peak-tflops (989 for an H200). On the CPU without --smoke, the old tiny comparison runs.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

QWEN25_15B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
SMOKE = dict(QWEN25_15B, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4)
SMOKE.update(num_key_value_heads=2, vocab_size=512)


@dataclass
class Row:
    name: str
    seconds: list[float] = field(default_factory=list)  # timed runs
    phases: dict[str, float] = field(default_factory=dict)  # setup phases, seconds
    optimizer_seconds: list[float] = field(default_factory=list)  # of each timed step
    loss: float | None = None  # first step's loss (from the initial weights)
    peak_gb: float | None = None
    tokens: int = 0
    flops_per_param_token: float = 6.0  # forward + backward; 2: forward only; 0: no model FLOPs (an export)
    error: str | None = None


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _hf_config(shape: dict):
    from transformers import Qwen2Config

    return Qwen2Config(**shape, dtype="float32")


def _random_state(hf_config, device) -> dict[str, torch.Tensor]:
    """transformers' random initial weights (seed 0) on the CPU: every row starts from them."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        reference = Qwen2ForCausalLM(hf_config)
    state = {k: v.detach().to("cpu", copy=True) for k, v in reference.state_dict().items()}
    del reference
    _free(device)
    return state


def _batch(rows: int, length: int, vocab: int, variable: bool, seed: int = 0):
    """Random token ids; prompt = the first quarter. variable: lengths uniform in [length/4, length], right-padded."""
    from fabric.trainer.policy import TrainBatch

    g = torch.Generator().manual_seed(seed)
    lengths = [length] * rows
    if variable:
        lengths = torch.randint(length // 4, length + 1, (rows,), generator=g).tolist()
    prompts, responses = [], []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        prompts.append(ids[: max(1, n // 4)])
        responses.append(ids[max(1, n // 4) :])
    return TrainBatch.from_token_lists(prompts, responses, pad_id=0)


def _timed(fn: Callable, device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _run_row(row: Row, device, setup: Callable, repeats: int) -> None:
    """setup() -> (step, optimizer_times or None, keep-alive); step() returns the loss. Fills row, frees all."""
    _free(device)
    try:
        start = time.perf_counter()
        step, optimizer_times, keep = setup()
        _sync(device)
        row.phases["build+load"] = time.perf_counter() - start
        start = time.perf_counter()
        loss = step()
        row.loss = None if loss is None else float(loss)
        _sync(device)
        row.phases["warm-up step"] = time.perf_counter() - start
        if optimizer_times is not None:
            optimizer_times.clear()
        row.seconds = _timed(step, device, repeats)
        if optimizer_times is not None:
            row.optimizer_seconds = list(optimizer_times)
        if torch.device(device).type == "cuda":
            row.peak_gb = torch.cuda.max_memory_allocated() / 2**30
        del keep
    except Exception as exc:  # one failing row must not hide the others
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        traceback.print_exc(limit=4)
    finally:
        step = None
        _free(device)
    state = f"error: {row.error}" if row.error else f"{min(row.seconds):.3f} s"
    print(f"  [{row.name}] {state}; phases " + ", ".join(f"{k} {v:.1f} s" for k, v in row.phases.items()), flush=True)


def _hf_setup(hf_config, state, batch, micro: int, device, logprobs_only: bool = False):
    """transformers, fp32 weights, bf16 autocast (on CUDA), SDPA attention, fused AdamW."""
    from transformers import Qwen2ForCausalLM

    from fabric.trainer import losses

    hf_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen2ForCausalLM(hf_config)  # fp32: the default dtype
    model.load_state_dict(state, strict=False)  # lm_head.weight is tied to embed_tokens
    model.tie_weights()
    batch = batch.to(device)
    autocast = torch.autocast(
        torch.device(device).type, dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"
    )
    is_cuda = torch.device(device).type == "cuda"
    if logprobs_only:

        @torch.no_grad()
        def logprobs():
            model.eval()
            parts = []
            for i in range(0, len(batch), micro):
                mb = batch.slice(i, i + micro)
                with autocast:
                    logits = model(mb.input_ids, attention_mask=mb.attention_mask).logits
                parts.append(losses.logprobs_from_logits(logits, mb.input_ids) * mb.attention_mask)
            out = torch.cat(parts)
            return float((out * batch.response_mask).sum() / batch.response_mask.sum())

        return logprobs, None, model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=is_cuda or None)
    optimizer_times: list[float] = []
    num_tokens = batch.response_mask.sum().float()

    def step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for i in range(0, len(batch), micro):
            mb = batch.slice(i, i + micro)
            with autocast:
                logits = model(mb.input_ids, attention_mask=mb.attention_mask).logits
            logprobs = losses.logprobs_from_logits(logits, mb.input_ids)
            loss = losses.sft_loss(logprobs, mb.response_mask, num_tokens=num_tokens)
            loss.backward()
            total += loss.detach()
        _sync(device)
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        _sync(device)
        optimizer_times.append(time.perf_counter() - start)
        return total

    return step, optimizer_times, (model, optimizer)


def _policy_setup(hf_config, state, batch, device, dtype, optim_kw: dict, attention="sdpa", packed=True, **build):
    """The fabric's Policy: megatron GPTModel (bf16 on CUDA), fp32 main params, fused AdamW (on CUDA)."""
    from fabric.trainer.model import build_gpt_model, load_hf_into_megatron
    from fabric.trainer.policy import OptimConfig, Policy

    model = build_gpt_model(hf_config, dtype, device, attention, **build)
    load_hf_into_megatron(model, state)
    policy = Policy(model, None, OptimConfig(lr=1e-6, **optim_kw))
    policy.packed = packed
    optimizer_times: list[float] = []
    optimizer_step = policy.optimizer.step

    def timed_optimizer_step():
        _sync(device)
        start = time.perf_counter()
        result = optimizer_step()
        _sync(device)
        optimizer_times.append(time.perf_counter() - start)
        return result

    policy.optimizer.step = timed_optimizer_step  # type: ignore[method-assign]
    return (lambda: policy.sft_step(batch)["loss"]), optimizer_times, policy


def _count_params(hf_config) -> int:
    h, f, layers, v = (
        hf_config.hidden_size,
        hf_config.intermediate_size,
        hf_config.num_hidden_layers,
        hf_config.vocab_size,
    )
    head_dim = h // hf_config.num_attention_heads
    kv = hf_config.num_key_value_heads * head_dim
    attention = h * (h + 2 * kv) + (h + 2 * kv) + h * h  # qkv with bias, output projection
    mlp = 3 * h * f
    norms = 2 * h
    embeddings = v * h * (1 if hf_config.tie_word_embeddings else 2)
    return layers * (attention + mlp + norms) + h + embeddings


def _print_table(title: str, rows: list[Row], reference: Row, params: int, peak_tflops: float) -> None:
    print(f"\n{title}")
    header = f"{'':44s} {'step s (min/med)':>18s} {'optim s':>8s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GB':>8s}"
    print(header + f" {'speed vs ref':>12s} {'loss':>10s} {'Δloss':>9s}")
    ref_time = min(reference.seconds) if reference.seconds else math.nan
    for row in rows:
        if row.error or not row.seconds:
            print(f"{row.name:44s} FAILED: {row.error}")
            continue
        best = min(row.seconds)
        tflops = row.flops_per_param_token * params * row.tokens / best / 1e12
        optim = f"{statistics.median(row.optimizer_seconds):.3f}" if row.optimizer_seconds else "-"
        peak = f"{row.peak_gb:.1f}" if row.peak_gb is not None else "-"
        loss = f"{row.loss:.5f}" if row.loss is not None else "-"
        known = row.loss is not None and reference.loss is not None
        delta = f"{row.loss - reference.loss:+.1e}" if known else "-"
        cells = f"{best:7.3f}/{statistics.median(row.seconds):7.3f}"
        rate = f"{tflops:8.1f} {tflops / peak_tflops:6.1%}" if tflops else f"{'-':>8s} {'-':>6s}"
        print(
            f"{row.name:44s} {cells:>18s} {optim:>8s} {rate} {peak:>8s}"
            f" {ref_time / best:11.2f}x {loss:>10s} {delta:>9s}"
        )


def gpu_main(smoke: bool = False, peak_tflops: float = 989.0, repeats: int = 3, budget_s: float = 420.0) -> None:
    from fabric.trainer.compat import init_megatron

    started = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    init_megatron(seed=0)
    shape = SMOKE if smoke else QWEN25_15B
    rows_n, length, micro = (16, 1024, 4) if not smoke else (8, 64, 2)
    hf_config = _hf_config(shape)
    start = time.perf_counter()
    state = _random_state(hf_config, device)
    params = _count_params(hf_config)
    print(
        f"{'smoke: tiny' if smoke else 'Qwen2.5-1.5B layout'} (hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}, {params / 1e9:.3f} B params), "
        f"{device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, torch {torch.__version__}, "
        f"Policy dtype {dtype}; random weights made in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    fixed = _batch(rows_n, length, shape["vocab_size"], variable=False)
    varlen = _batch(rows_n, length, shape["vocab_size"], variable=True, seed=1)
    policy_dtype = dtype

    def policy(batch, **kw):
        return lambda: _policy_setup(hf_config, state, batch, device, policy_dtype, **kw)

    mb = dict(micro_batch_size=micro)
    fixed_rows = [
        (Row("transformers fp32+autocast, fused AdamW"), lambda: _hf_setup(hf_config, state, fixed, micro, device)),
        (Row("Policy, default (auto: compiled layers on CUDA)"), policy(fixed, optim_kw=mb)),
        (Row("Policy eager (FABRIC_TRAINER_COMPILE=off)"), policy(fixed, optim_kw=mb, torch_compile="off")),
        (Row("Policy, fusions only (logprob, SwiGLU)"), policy(fixed, optim_kw=mb, torch_compile="fusions")),
        (
            Row("Policy eager, unfused attention (megatron's)"),
            policy(fixed, optim_kw=mb, attention="unfused", packed=False, torch_compile="off"),
        ),
        (Row("Policy, default, recompute full"), policy(fixed, optim_kw=mb, recompute_granularity="full")),
    ]
    budget = micro * length
    dynamic = dict(use_dynamic_batching=True, max_tokens_per_microbatch=budget)
    varlen_rows = [
        (Row("transformers padded"), lambda: _hf_setup(hf_config, state, varlen, micro, device)),
        (Row("Policy, default (compiled layers, padded)"), policy(varlen, optim_kw=mb, packed=False)),
        (Row("Policy eager, packed"), policy(varlen, optim_kw=mb, torch_compile="off")),
        (Row(f"Policy, default, dynamic batching {budget} tok"), policy(varlen, optim_kw=dynamic, packed=False)),
    ]
    logprob_rows = [
        (
            Row("logprobs: transformers (autocast)", flops_per_param_token=2.0),
            lambda: _hf_setup(hf_config, state, fixed, micro, device, logprobs_only=True),
        ),
        (
            Row("logprobs: Policy, default", flops_per_param_token=2.0),
            lambda: _policy_logprobs_setup(hf_config, state, fixed, device, dtype, micro),
        ),
        (
            Row("logprobs: Policy eager", flops_per_param_token=2.0),
            lambda: _policy_logprobs_setup(hf_config, state, fixed, device, dtype, micro, torch_compile="off"),
        ),
    ]
    export_rows = [
        (
            Row("export: transformers state_dict clone", flops_per_param_token=0.0),
            lambda: _hf_export_setup(hf_config, state, device),
        ),
        (
            Row("export: Policy hf_weights (HF layout)", flops_per_param_token=0.0),
            lambda: _policy_export_setup(hf_config, state, device, dtype),
        ),
    ]
    sections = [
        (f"train step, {rows_n} x {length} tokens, micro-batches of {micro}", fixed_rows, fixed),
        (
            f"train step, variable lengths ({int(varlen.attention_mask.sum())} real tokens, padded to {length})",
            varlen_rows,
            varlen,
        ),
        (f"logprob pass (no grad), {rows_n} x {length} tokens, micro-batches of {micro}", logprob_rows, fixed),
        ("weight export: every tensor copied out in HF layout, in the Policy's dtype", export_rows, fixed),
    ]
    for title, rows, batch in sections:
        print(f"\n{title}:", flush=True)
        for row, setup in rows:
            row.tokens = int(batch.attention_mask.sum())
            if time.perf_counter() - started > budget_s:
                row.error = f"skipped: past the {budget_s:.0f} s budget"
                continue
            _run_row(row, device, setup, repeats)
    for title, rows, _ in sections:
        reference_row = rows[0][0]
        _print_table(title, [r for r, _ in rows], reference_row, params, peak_tflops)
    print(
        "\nspeed vs ref: the section's first row's time / this row's; Δloss: this row's first loss - the first row's "
        "(logprob rows: the mean response logprob). TFLOP/s: 6 x params x real tokens / step time (logprob rows: 2 x). "
        f"Total {time.perf_counter() - started:.0f} s."
    )


def _policy_logprobs_setup(hf_config, state, batch, device, dtype, micro, torch_compile=None):
    from fabric.trainer.model import build_gpt_model, load_hf_into_megatron
    from fabric.trainer.policy import OptimConfig, Policy

    model = build_gpt_model(hf_config, dtype, device, torch_compile=torch_compile)
    load_hf_into_megatron(model, state)
    policy = Policy(model, None, None)
    policy.optim = OptimConfig(micro_batch_size=micro)  # a frozen policy: no optimizer, only the micro-batch size

    def logprobs():
        out = policy.logprobs(batch)
        return float((out * batch.response_mask).sum() / batch.response_mask.sum())

    return logprobs, None, policy


def _hf_export_setup(hf_config, state, device):
    from transformers import Qwen2ForCausalLM

    with torch.device(device):
        model = Qwen2ForCausalLM(hf_config).to(torch.bfloat16)  # the dtype the Policy's weights have on CUDA
    model.load_state_dict(state, strict=False)
    return (lambda: _none({n: t.detach().clone() for n, t in model.state_dict().items()})), None, model


def _policy_export_setup(hf_config, state, device, dtype):
    from fabric.trainer.model import build_gpt_model, iter_hf_weights, load_hf_into_megatron

    model = build_gpt_model(hf_config, dtype, device)
    load_hf_into_megatron(model, state)
    return (lambda: _none([t.clone() for _, t in iter_hf_weights(model)])), None, model


def _none(_) -> None:
    return None  # an export has no loss to compare


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


def cpu_main(batch_size: int = 32, repeats: int = 20) -> None:
    """The tiny model on the CPU, the two interleaved (a shared machine's load hits both alike)."""
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


def profile_main(peak_tflops: float = 989.0) -> None:
    """One step of the Policy and of transformers under torch.profiler (the 1.5B layout, real vocabulary): the
    kernels and ops that take the GPU time, and how much of the step the GPU was busy."""
    from torch.profiler import ProfilerActivity, profile

    from fabric.trainer.compat import init_megatron

    init_megatron(seed=0)
    device = torch.device("cuda", torch.cuda.current_device())
    hf_config = _hf_config(QWEN25_15B)
    state = _random_state(hf_config, device)
    batch = _batch(16, 1024, QWEN25_15B["vocab_size"], variable=False)
    setups = {
        "Policy, default (auto: compiled layers)": lambda: _policy_setup(
            hf_config, state, batch, device, torch.bfloat16, optim_kw=dict(micro_batch_size=4)
        ),
        "Policy eager": lambda: _policy_setup(
            hf_config, state, batch, device, torch.bfloat16, optim_kw=dict(micro_batch_size=4), torch_compile="off"
        ),
        "transformers": lambda: _hf_setup(hf_config, state, batch, 4, device),
    }
    for name, setup in setups.items():
        _free(device)
        step, _, keep = setup()
        step()
        step()
        _sync(device)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            _sync(device)
        wall = time.perf_counter() - start
        events = prof.key_averages()
        gpu_total = sum(e.self_device_time_total for e in events) / 1e6
        print(f"\n=== {name}: step {wall:.3f} s under the profiler, GPU busy {gpu_total:.3f} s "
              f"({gpu_total / wall:.0%})", flush=True)  # fmt: skip
        print(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70), flush=True)
        del step, keep
    _free(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the GPU rows on a tiny model (CPU or GPU): a dry run")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak (H200: 989)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per row (after one warm-up step)")
    parser.add_argument(
        "--budget", type=float, help="seconds; rows not started by then are skipped (420; none with --smoke: a dry run)"
    )
    parser.add_argument("--profile", action="store_true", help="CUDA: one step of each under torch.profiler")
    args = parser.parse_args(argv or [])
    if args.profile:
        profile_main(args.peak_tflops)
    elif torch.cuda.is_available() or args.smoke:
        budget = args.budget if args.budget is not None else math.inf if args.smoke else 420.0
        gpu_main(args.smoke, args.peak_tflops, args.repeats, budget)
    else:
        cpu_main()


if __name__ == "__main__":
    main(sys.argv[1:])
