"""Checks a finished `fabric run` as `make gpu-check` needs it: `python -m bench.check_run OUT_DIR [MIN_REWARD]`.

Every step trained with no stale sample, every rollout server committed every version the trainer pushed (from
the servers' own logs), and the reward of the last 5 steps is at least MIN_REWARD (default 0.4). Prints one line
per check and exits 1 if any fails.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    floor = float(argv[1]) if len(argv) > 1 else 0.4
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    failures = []
    stale = sum(m.get("stale_samples", 0) for m in steps)
    print(f"steps: {len(steps)}; stale samples: {stale}")
    if not steps or stale:
        failures.append("stale samples (or no step)")
    versions = set(range(1, max((m["weight_version"] for m in steps), default=0) + 1))
    for log in sorted((out / "logs").glob("rollout-*.log")):
        committed = {int(v) for v in re.findall(r"commit of version (\d+)", log.read_text(errors="replace"))}
        missing = sorted(versions - committed)
        print(f"{log.stem}: committed {len(committed & versions)} of {len(versions)} versions"
              + (f"; missing {missing[:10]}" if missing else ""))  # fmt: skip
        if missing:
            failures.append(f"{log.stem} missed versions")
    first = sum(m["reward_mean"] for m in steps[:5]) / max(len(steps[:5]), 1)
    last = sum(m["reward_mean"] for m in steps[-5:]) / max(len(steps[-5:]), 1)
    print(f"reward, first 5 steps -> last 5: {first:.3f} -> {last:.3f} (at least {floor} asked)")
    if last < floor:
        failures.append("reward below the floor")
    extra = steps[-1].get("extra", {}) if steps else {}
    memory = {k: round(v, 2) for k, v in extra.items() if "gib" in k}
    if memory:
        print(f"memory (GiB) at the last step: {memory}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
