"""What a run leaves for people: metrics.jsonl, a PNG plot of reward and phase times per step, a summary table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

PHASES = ("generate_seconds", "reward_seconds", "train_seconds", "weight_sync_seconds")


def append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def write_plot(rows: Sequence[dict], path: Path) -> Path | None:
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (top, bottom, lag) = plt.subplots(3, 1, figsize=(9, 9.5), sharex=True)
    top.plot(steps, [r["reward_mean"] for r in rows], marker="o", label="reward mean")
    if all("accuracy" in r.get("extra", {}) for r in rows):
        top.plot(steps, [r["extra"]["accuracy"] for r in rows], marker=".", label="accuracy")
    for domain in domains(rows):  # a multi-domain run: each reward domain's mean reward
        key = f"reward/{domain}"
        top.plot(steps, [r.get("extra", {}).get(key, float("nan")) for r in rows], linestyle="--", label=key)
    top.set_ylabel("reward")
    top.grid(alpha=0.3)
    top.legend()
    top.set_title("reward per step")
    base = [0.0] * len(rows)
    for phase in PHASES:
        values = [r.get(phase, 0.0) for r in rows]
        bottom.bar(steps, values, bottom=base, label=phase.removesuffix("_seconds").replace("_", " "))
        base = [b + v for b, v in zip(base, values, strict=True)]
    bottom.set_ylabel("seconds")
    bottom.legend(ncol=4, fontsize="small")
    bottom.set_title("time per step, by phase (asynchronous: phases overlap, see below)")
    extra = [r.get("extra", {}) for r in rows]
    lag.plot(steps, [e.get("overlap_seconds", 0.0) for e in extra], marker=".", label="generation || training (s)")
    lag.plot(steps, [r.get("step_seconds", 0.0) for r in rows], marker=".", label="step wall time (s)")
    lag.set_ylabel("seconds")
    versions = lag.twinx()
    versions.step(steps, [e.get("staleness_mean", 0.0) for e in extra], where="mid", color="tab:red", label="staleness")
    versions.set_ylabel("staleness (versions)")
    handles = lag.get_legend_handles_labels()[0] + versions.get_legend_handles_labels()[0]
    lag.legend(handles=handles, fontsize="small")
    lag.set_xlabel("step")
    lag.set_title("overlap of generation with training, and staleness (mean versions behind the policy)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def domains(rows: Sequence[dict]) -> list[str]:
    """The reward domains of a multi-domain run's rows ("reward/<domain>" in extra), in order of appearance."""
    keys = (k for r in rows for k in r.get("extra", {}) if k.startswith("reward/"))
    return [k.removeprefix("reward/") for k in dict.fromkeys(keys)]


def domain_cell(r: dict) -> str:
    extra = r.get("extra", {})
    cells = [f"{k.removeprefix('reward/')} {v:.2f}" for k, v in sorted(extra.items()) if k.startswith("reward/")]
    return " ".join(cells) or "-"


def summary_table(rows: Sequence[dict], title: str = "run summary"):
    from rich.table import Table

    table = Table(title=title)
    for column in (
        "step",
        "version",
        "reward",
        "acc",
        "loss",
        "KL",
        "mismatch",
        "tok/s",
        "gen s",
        "reward s",
        "train s",
        "sync s",
        "stale",
        "staleness",
        "overlap s",
        "reward by domain",
    ):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(*step_cells(r))
    return table


def step_cells(r: dict) -> list[str]:
    extra = r.get("extra", {})
    return [str(r["step"]), str(r["weight_version"]), f"{r['reward_mean']:.3f}",
            f"{extra['accuracy']:.2f}" if "accuracy" in extra else "-", f"{r['loss']:+.4f}", f"{r['kl']:.4f}",
            f"{r['logprob_mismatch']:.1e}", f"{r['tokens_per_second']:.0f}", f"{r['generate_seconds']:.2f}",
            f"{r['reward_seconds']:.2f}", f"{r['train_seconds']:.2f}", f"{r['weight_sync_seconds']:.2f}",
            str(r["stale_samples"]), f"{extra.get('staleness_mean', 0.0):.2f}",
            f"{extra.get('overlap_seconds', 0.0):.2f}", domain_cell(r)]  # fmt: skip


def first_last(rows: Sequence[dict], k: int = 5) -> tuple[float, float]:
    """Mean reward of the first and of the last k steps."""
    if not rows:
        return 0.0, 0.0
    head, tail = rows[:k], rows[-k:]
    return sum(r["reward_mean"] for r in head) / len(head), sum(r["reward_mean"] for r in tail) / len(tail)


def to_proto(metrics: dict):
    """A step's metrics dict as fabric.v1.StepMetrics (keys without a field of their own go under `extra`)."""
    from fabric.v1 import trainer_pb2

    fields = set(trainer_pb2.StepMetrics.DESCRIPTOR.fields_by_name) - {"extra"}
    message = trainer_pb2.StepMetrics(**{k: v for k, v in metrics.items() if k in fields})
    message.extra.update(metrics.get("extra", {}))
    return message
