"""llm_judge (ROLL's LLMJudgeRewardWorker) asking fabric rollout servers over gRPC: a served fake engine that judges
deterministically (the verdicts), and the tiny model behind vLLM (the plumbing: its verdicts are noise)."""

from __future__ import annotations

import asyncio

import pytest

from fabric.config import ConfigError, load_config
from fabric.reward.config import load_reward_configs
from fabric.reward.judge import judge_verdict
from fabric.reward.scorer import ScoreItem, ScoreResult, build_scorer
from fabric.rollout.engine import FinishReason, Sample
from tests.reward.test_server import score
from tests.rollout.fake_engine import FakeEngine
from tests.rollout.test_servicer import serving
from tests.servers import serve

SOLUTION = "**Solution Process (Final Step Only):**"
REFERENCE = "**Reference Answer:**"


class JudgeEngine(FakeEngine):
    """A perfect judge: YES when the solution in ROLL's judge prompt contains the reference answer, else NO."""

    def __init__(self, seconds: float = 0.0):
        super().__init__()
        self.seconds = seconds  # how long each verdict takes
        self.texts: dict[tuple[int, ...], str] = {}  # prompt token ids -> the prompt text they came from
        self.asked: list[tuple[str, int]] = []  # (prompt, max_new_tokens) per request

    def tokenize(self, text: str) -> list[int]:
        ids = super().tokenize(text)
        self.texts[tuple(ids)] = text
        return ids

    async def generate(self, engine_id, prompt_token_ids, sampling, index) -> Sample:
        prompt = self.texts[tuple(prompt_token_ids)]
        self.asked.append((prompt, sampling.max_new_tokens))
        await asyncio.sleep(self.seconds)
        solution = prompt.split(SOLUTION)[1].split(REFERENCE)[0]
        reference = prompt.split(REFERENCE)[1].split("**Output:**")[0].strip()
        return Sample([1], "YES" if reference in solution else "NO", [], FinishReason.STOP)


def judge_config(tmp_path, addresses, **keys):
    path = tmp_path / "judge.yaml"
    path.write_text(
        "rewards:\n  judge:\n    worker_cls: roll.pipeline.rlvr.rewards.llm_judge_reward_worker.LLMJudgeRewardWorker\n"
        "    judge_prompt: Qwen2.5-7B-Instruct-RLVR-prompt\n    judge_model_type: inference\n"
        "    generating_args: {max_new_tokens: 5, temperature: 0.8}\n"
    )
    overrides = [f"rewards.judge.judge_address=[{','.join(addresses)}]"]
    overrides += [f"rewards.judge.{key}={value}" for key, value in keys.items()]
    return load_reward_configs(load_config(path, overrides))["judge"]


async def judged(config, items: list[ScoreItem]) -> list[ScoreResult | BaseException]:
    scorer = build_scorer(config)
    await scorer.start()
    try:
        return await scorer.score_batch(items)
    finally:
        await scorer.close()


CHAT = "system\nYou are a chatbot who can solve problems.\nuser\nWhat is 6 times 7?\nassistant\n"
ITEMS = [
    ScoreItem("right", CHAT, "6 times 7 is 42. Therefore, the answer is 42", "42"),
    ScoreItem("wrong", CHAT, "6 times 7 is 36. Therefore, the answer is 36", "42"),
    ScoreItem("capital", "Name the capital of France.", "Therefore, the answer is Paris", "Paris"),
    ScoreItem("unsure", "Name the capital of France.", "I am not sure.", "Paris"),
]


def test_a_served_judge_scores_as_roll_with_roll_prompt(tmp_path):
    async def go():
        engine = JudgeEngine()
        async with serving(engine) as (server, _):
            results = await judged(judge_config(tmp_path, [server.address]), ITEMS)
        return engine, results

    engine, results = asyncio.run(go())
    assert [(r.score, r.correct) for r in results] == [(1.0, 1.0), (0.0, 0.0), (1.0, 1.0), (0.0, 0.0)]
    assert [r.info for r in results] == ["judge: YES", "judge: NO", "judge: YES", "judge: NO"]
    first = next(prompt for prompt, _ in engine.asked if "is 42." in prompt)
    # ROLL's question: the last user turn of the prompt; ROLL's template around it; generating_args as sampling
    assert "**Question:**  \nWhat is 6 times 7?\nassistant" in first and "You are a chatbot" not in first
    assert first.startswith("\nGiven a problem, determine whether the final answer")
    assert {tokens for _, tokens in engine.asked} == {5}


def test_a_batch_is_spread_over_every_judge_server(tmp_path):
    async def go():
        engines = [JudgeEngine(), JudgeEngine()]
        async with serving(engines[0]) as (a, _), serving(engines[1]) as (b, _):
            results = await judged(judge_config(tmp_path, [a.address, b.address]), ITEMS)
        return engines, results

    engines, results = asyncio.run(go())
    assert [r.score for r in results] == [1.0, 0.0, 1.0, 0.0]
    assert [len(e.asked) for e in engines] == [2, 2]


def test_an_unreachable_judge_fails_each_item_with_unavailable(tmp_path):
    results = asyncio.run(judged(judge_config(tmp_path, ["127.0.0.1:1"], timeout_s=5), ITEMS[:2]))
    assert all(isinstance(r, Exception) and "UNAVAILABLE" in str(r) for r in results), results
    assert all(getattr(r, "code", None) is not None and r.code.name == "UNAVAILABLE" for r in results)


def test_a_judge_refusal_keeps_its_status_so_the_pool_can_retry_it(tmp_path):
    # Verdicts slow enough that the four items are in flight together: one in the engine, one queued, two refused
    # (an instant judge answered each before the next came, and nothing was refused).
    async def go():
        async with serving(JudgeEngine(seconds=0.5), infer_batch_size=1, max_queue_length=1) as (server, _):
            return await judged(judge_config(tmp_path, [server.address]), ITEMS)

    results = asyncio.run(go())
    refused = [r for r in results if not isinstance(r, ScoreResult)]
    assert refused and all(r.code.name == "RESOURCE_EXHAUSTED" and "queue full" in str(r) for r in refused), results
    expected = [1.0, 0.0, 1.0, 0.0]
    assert all(r.score == expected[k] for k, r in enumerate(results) if isinstance(r, ScoreResult))


@pytest.mark.parametrize("reply, verdict", [("YES", 1.0), ("Yes.", 1.0), ("NO", 0.0), ("no", 0.0), ("maybe", 0.0)])
def test_the_verdict_is_roll_yes_no_parse(reply, verdict):
    assert judge_verdict(reply) == verdict


@pytest.mark.parametrize(
    "keys, bad_key, words",
    [
        ({"judge_address": "null"}, "judge_address", "rollout servers serving the judge model"),
        ({"judge_model_type": "api"}, "judge_model_type", "API judges are not supported"),
        ({"judge_prompt": "my-prompt"}, "judge_prompt", "Qwen2.5-7B-Instruct-RLVR-prompt"),
        ({"judge_prompt": "'Is {response} right? {oops}'"}, "judge_prompt", "{question}, {response}"),
        ({"generating_args.num_beams": 4}, "generating_args.num_beams", "must be 1"),
        ({"judge_promt": "x"}, "judge_promt", "did you mean 'judge_prompt'?"),
    ],
)
def test_judge_config_errors_name_the_key(tmp_path, keys, bad_key, words):
    from fabric.reward.config import unknown_options

    with pytest.raises(ConfigError) as err:
        config = judge_config(tmp_path, ["127.0.0.1:1"], **keys)
        build_scorer(config)
        unknown_options(config)
    assert f"rewards.judge.{bad_key}" in str(err.value) and words in str(err.value), str(err.value)


@pytest.mark.slow
def test_the_judge_asks_the_tiny_model_through_a_served_reward(tiny_model, rollout_cluster, tmp_path):
    # One of the session's rollout servers (tests/conftest.py) serves the judge: the judge only generates, whatever
    # weights earlier tests pushed (its verdicts are noise either way), and its prompts (<= 147 tokens + 4 new) fit
    # the cluster's max_model_len of 256. A server of its own cost a vLLM start.
    judge = rollout_cluster.procs[0].address
    reward_config = tmp_path / "reward.yaml"
    reward_config.write_text(  # a template of the config's own: ROLL's is longer than the tiny model's context
        "rewards:\n  judge:\n    worker_cls: llm_judge\n"
        '    judge_prompt: "Q: {question}\\nA: {response}\\nReference: {reference}\\nSame answer? "\n'
        f"    judge_address: {judge}\n    model_args: {{model_name_or_path: {tiny_model}}}\n"
        "    generating_args: {max_new_tokens: 4, temperature: 1.0}\n    infer_batch_size: 4\n"
    )
    reward = serve("reward", reward_config)
    try:
        items = [{"prompt": i.prompt, "response": i.response, "ground_truth": i.ground_truth,
                  "reward_name": "judge"} for i in ITEMS * 2]  # fmt: skip
        responses = score(reward.address, items)
    finally:
        reward.stop()
    assert [r.HasField("error") for r in responses] == [False] * 8, [r.error.message for r in responses]
    assert all(r.score in (0.0, 1.0) and r.info.startswith("judge:") for r in responses)
    # the verdict is ROLL's parse of whatever the model said
    assert [r.score for r in responses] == [judge_verdict(r.info.removeprefix("judge: ")) for r in responses]
