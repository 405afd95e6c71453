"""Asynchronous RL on the embedded task: the demo (examples/default.yaml) with max_staleness k = 0, 1, 2, same seed,
side by side: steps per minute of the RL loop, wall time until the 5-step mean reward reaches 0.45 (or the best the
synchronous run reaches, if lower), mean staleness, and how long generation overlapped training and syncing.

    python -m bench.async_rl [--steps N] [--ks 0,1,2] [--out DIR]     # runs `fabric run` once per k
    python -m bench.async_rl --analyze DIR                             # the table from runs already in DIR/k{k}

Times are the trainer's own (metrics.jsonl `extra.elapsed_seconds`: from the first push to each step's end), so the
servers' start-up and the supervised warm-up (identical for every k) are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

TARGET = 0.45
WINDOW = 5


def run_one(k: int, steps: int, out: Path) -> Path:
    run_dir = out / f"k{k}"
    shared = out / "task"  # the tiny model and dataset, built once (seeded: the same for every k)
    cmd = [
        sys.executable, "-m", "fabric.cli", "run", "--config", "examples/default.yaml",
        f"output_dir={run_dir}", f"max_steps={steps}", f"async_training.max_staleness={k}",
        f"task.model_dir={shared}/base_model", f"task.dataset={shared}/data/train.jsonl",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with (out / f"k{k}.log").open("w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    return run_dir


def moving(values: list[float], window: int = WINDOW) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def summarize(run_dir: Path, target: float) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    elapsed = [r["extra"]["elapsed_seconds"] for r in rows]
    reward = moving([r["reward_mean"] for r in rows])
    reached = next((t for t, m in zip(elapsed, reward, strict=True) if m >= target), None)
    n = len(rows)
    return {
        "steps": n,
        "steps_per_min": 60.0 * n / elapsed[-1],
        "time_to_target_s": reached,
        "best_reward_5": max(reward),
        "last_reward_5": reward[-1],
        "staleness_mean": sum(r["extra"]["staleness_mean"] for r in rows) / n,
        "overlap_s_per_step": sum(r["extra"]["overlap_seconds"] for r in rows) / n,
        "generate_s": sum(r["generate_seconds"] for r in rows) / n,
        "train_s": sum(r["train_seconds"] for r in rows) / n,
        "sync_s": sum(r["weight_sync_seconds"] for r in rows) / n,
        "wait_s": sum(r["extra"]["wait_seconds"] for r in rows) / n,
        "spanning": sum(r["extra"]["spanning_samples"] for r in rows),
    }


def table(out: Path, ks: list[int]) -> None:
    base = summarize(out / f"k{ks[0]}", TARGET)
    target = min(TARGET, base["best_reward_5"])
    print(f"target: 5-step mean reward >= {target:.3f}")
    header = "k  steps  steps/min  speedup  time-to-target  best5  last5  staleness  overlap/step  gen  train  sync  wait  spanning"  # noqa: E501
    print(header)
    for k in ks:
        s = summarize(out / f"k{k}", target)
        reach = f"{s['time_to_target_s']:.0f} s" if s["time_to_target_s"] is not None else "not reached"
        print(
            f"{k}  {s['steps']:5d}  {s['steps_per_min']:9.1f}  {s['steps_per_min'] / base['steps_per_min']:6.2f}x"
            f"  {reach:>14}  {s['best_reward_5']:.3f}  {s['last_reward_5']:.3f}  {s['staleness_mean']:9.2f}"
            f"  {s['overlap_s_per_step']:10.2f} s  {s['generate_s']:.2f}  {s['train_s']:.2f}  {s['sync_s']:.2f}"
            f"  {s['wait_s']:.2f}  {s['spanning']:.0f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--ks", default="0,1,2")
    parser.add_argument("--out", default="runs/bench-async")
    parser.add_argument("--analyze", help="only print the table for the runs already in this folder")
    args = parser.parse_args(argv if argv is not None else [])
    ks = [int(k) for k in args.ks.split(",")]
    out = Path(args.analyze or args.out)
    if not args.analyze:
        out.mkdir(parents=True, exist_ok=True)
        for k in ks:
            print(f"running k={k} ({args.steps} steps) -> {out}/k{k}", flush=True)
            run_one(k, args.steps, out)
    table(out, ks)


if __name__ == "__main__":
    main(sys.argv[1:])
