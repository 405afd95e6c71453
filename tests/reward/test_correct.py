"""Every rule scorer reports its 0/1 correctness beside the reward (ScoreResult.correct), which can differ from it."""

from __future__ import annotations

import asyncio

from fabric.config import load_config
from fabric.reward.config import load_reward_configs
from fabric.reward.scorer import ScoreItem, build_scorer

CONFIG = """rewards:
  math: {worker_cls: math_rule, num_workers: 1}
  tag: {worker_cls: answer_tag}
  mcq: {worker_cls: crossthinkqa_rule, reward_type: soft}
"""


def scored(tmp_path, name: str, items: list[tuple[str, str]]):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    scorer = build_scorer(load_reward_configs(load_config(path))[name])

    async def go():
        await scorer.start()
        try:
            return await scorer.score_batch([ScoreItem(str(i), "q", r, t) for i, (r, t) in enumerate(items)])
        finally:
            await scorer.close()

    return [(r.score, r.correct) for r in asyncio.run(go())]


def test_math_rule_correct_is_its_score(tmp_path):
    assert scored(tmp_path, "math", [(r"\boxed{\frac{1}{2}}", "0.5"), (r"\boxed{3}", "0.5")]) == [(1, 1), (0, 0)]


def test_answer_tag_counts_only_the_right_answer_correct(tmp_path):
    items = [("<answer>7</answer>", "7"), ("<answer>8</answer>", "7"), ("7", "7")]
    assert scored(tmp_path, "tag", items) == [(1.0, 1.0), (0.1, 0.0), (0.0, 0.0)]


def test_crossthinkqa_correct_ignores_its_penalties(tmp_path):
    (right, right_ok), (wrong, wrong_ok) = scored(tmp_path, "mcq", [("The answer is B", "B"), (r"\boxed{C}", "B")])
    assert (right, right_ok) == (0.5, 1.0) and (wrong, wrong_ok) == (-0.5, 0.0)  # soft: unboxed right, boxed wrong
