"""Each client's example (TypeScript, C++, Go) against real servers: a vLLM rollout server and a reward server on
the tiny model. What the example prints must equal what the Python client (the generated stubs over grpc) gets:
sample count, greedy token ids, scores, and the errors with their codes and messages."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import grpc
import pytest

from fabric.v1 import reward_pb2, reward_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from tests.clients.conftest import run_example

# Prompts of the toy task; greedy, so the n samples of a prompt are equal and match Python's.
PROMPTS = ["Add 3 and 4.\n", "Add 12 and 30.\n", "Add 25 and 17.\n"]
SAMPLES_PER_PROMPT = 2
MAX_NEW_TOKENS = 16
REWARD_NAME = "math"

pytestmark = pytest.mark.slow


@dataclass
class Reference:
    """What the Python client got for the requests every example sends."""

    ground_truths: list[str] = field(default_factory=list)
    samples: dict[tuple[str, int], rollout_pb2.GenerateResponse] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    errors: dict[str, rollout_pb2.GenerateResponse] = field(default_factory=dict)
    abort_error: grpc.RpcError | None = None


def example_requests(bad_request: bool = True) -> list[rollout_pb2.GenerateRequest]:
    """The Generate requests the examples build from their flags (see clients/*/example)."""
    requests = [
        rollout_pb2.GenerateRequest(
            request_id=f"task-{i}",
            prompt=prompt,
            sampling=rollout_pb2.SamplingParams(
                max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=SAMPLES_PER_PROMPT, temperature=0.0
            ),
        )
        for i, prompt in enumerate(PROMPTS)
    ]
    if bad_request:
        requests.append(rollout_pb2.GenerateRequest(request_id="bad-0"))  # neither prompt nor prompt_token_ids
    return requests


@pytest.fixture(scope="module")
def reference(servers) -> Reference:
    ref = Reference()
    with grpc.insecure_channel(servers["rollout"]) as channel:
        rollout = rollout_pb2_grpc.RolloutServiceStub(channel)
        # The tiny model is untrained, so the true sums would score 0 everywhere. Ground truths taken from what it
        # writes (its last number, which math-verify reads as the answer) give scores of 1 too, for all but the last
        # prompt, which keeps its true sum: the comparison then covers both scores.
        greedy = {r.request_id: r.text for r in rollout.Generate(iter(example_requests(False)), timeout=120)}
        for i, prompt in enumerate(PROMPTS):
            numbers = re.findall(r"\d+", greedy[f"task-{i}"])
            a, b = map(int, re.findall(r"\d+", prompt))
            ref.ground_truths.append(numbers[-1] if numbers and i < len(PROMPTS) - 1 else str(a + b))
        for response in rollout.Generate(iter(example_requests()), timeout=120):
            if response.HasField("error"):
                ref.errors[response.request_id] = response
            else:
                ref.samples[(response.request_id, response.sample_index)] = response
        with pytest.raises(grpc.RpcError) as aborted:
            rollout.Abort(rollout_pb2.AbortRequest(request_ids=[]), timeout=30)
        ref.abort_error = aborted.value
    with grpc.insecure_channel(servers["reward"]) as channel:
        reward = reward_pb2_grpc.RewardServiceStub(channel)
        requests = [
            reward_pb2.ScoreRequest(
                request_id=f"{rid}/{index}",
                prompt=PROMPTS[int(rid.split("-")[1])],
                response=sample.text,
                ground_truth=ref.ground_truths[int(rid.split("-")[1])],
                reward_name=REWARD_NAME,
                response_token_ids=sample.token_ids,
            )
            for (rid, index), sample in ref.samples.items()
        ]
        for response in reward.Score(iter(requests), timeout=120):
            assert not response.HasField("error"), response.error.message
            ref.scores[response.request_id] = response.score
    assert len(ref.samples) == len(PROMPTS) * SAMPLES_PER_PROMPT
    assert 1.0 in ref.scores.values() and 0.0 in ref.scores.values(), (ref.ground_truths, greedy, ref.scores)
    assert set(ref.errors) == {"bad-0"} and ref.errors["bad-0"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert ref.abort_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    return ref


def example_args(servers, ground_truths: list[str], *extra: str) -> list[str]:
    args = ["--rollout", servers["rollout"], "--reward", servers["reward"], "--reward-name", REWARD_NAME]
    args += ["--n", str(SAMPLES_PER_PROMPT), "--max-new-tokens", str(MAX_NEW_TOKENS), "--temperature", "0"]
    for prompt, truth in zip(PROMPTS, ground_truths, strict=True):
        args += ["--prompt", prompt, "--ground-truth", truth]
    return [*args, *extra]


def test_example_streams_generate_and_score_as_the_python_client_does(client, servers, reference):
    run = run_example(client, example_args(servers, reference.ground_truths, "--bad-request"))
    assert run.returncode == 0, run.output

    samples = run.of("sample")
    assert len(samples) == len(PROMPTS) * SAMPLES_PER_PROMPT, run.output
    for sample in samples:
        key = (sample["request_id"], sample["sample_index"])
        expected = reference.samples[key]
        assert sample["token_ids"] == list(expected.token_ids), key
        assert sample["text"] == expected.text, key
        assert sample["finish_reason"] == rollout_pb2.FinishReason.Name(expected.finish_reason).removeprefix(
            "FINISH_REASON_"
        )
        assert sample["weight_version"] == expected.weight_version
        expected_score = reference.scores[f"{key[0]}/{key[1]}"]
        assert math.isclose(sample["score"], expected_score, rel_tol=1e-6, abs_tol=1e-9), (key, sample["score"])

    # The refused item arrives as the client's native error with its code, and the stream went on.
    [item_error] = run.of("error")
    expected_error = reference.errors["bad-0"].error
    assert (item_error["rpc"], item_error["request_id"]) == ("Generate", "bad-0")
    assert item_error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] == expected_error.code
    assert item_error["message"] == expected_error.message

    # A call-level status (Abort without ids) surfaces as the native error type too.
    [call_error] = run.of("call_error")
    assert call_error["rpc"] == "Abort"
    assert call_error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert call_error["message"] == reference.abort_error.details()

    [summary] = run.of("summary")
    assert summary == {"event": "summary", "samples": len(samples), "scored": len(samples), "errors": 1}


def test_example_honours_the_deadline(client, servers):
    run = run_example(client, example_args(servers, ["7", "42", "42"], "--timeout-s", "0.001"))
    assert run.returncode == 1, run.output
    [fatal] = run.of("fatal")
    assert fatal["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], run.output
    assert not run.of("sample")
