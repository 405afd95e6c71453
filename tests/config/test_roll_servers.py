"""Real servers from a ROLL-shaped config, started the way users start them (`fabric serve`), once per module:
the rollout server serves the model the top-level `pretrain` names with the actor_infer block as written, and the
reward server scores with ROLL's worker classes mapped to the fabric's scorers."""

from __future__ import annotations

import asyncio
import json

import pytest

from fabric.procs import start_all
from fabric.reward.client import RewardClient
from fabric.rollout.client import GenerateRequest, RolloutClient, SamplingParams
from tests.config.configs import AGENTIC, ENVS_FRAGMENT, MEGATRON, SEARCH, write
from tests.servers import serve, server_process

pytestmark = pytest.mark.slow
EAGER = "actor_infer.strategy_args.strategy_config.enforce_eager"


@pytest.fixture(scope="module")
def rollouts(tiny_model, tmp_path_factory):
    """The module's two rollout servers, started at once (their engines load side by side): the ROLL block's and
    an agentic config's (env managers, custom_envs, an unset-until-now `${now:...}`)."""
    tmp = tmp_path_factory.mktemp("agentic")
    write(tmp, "config/envs.yaml", ENVS_FRAGMENT)
    agentic = write(tmp, "agentic/agent.yaml", AGENTIC)
    # enforce_eager: the agentic config leaves vLLM to compile the model (about 30 s of CPU here), which is not what
    # its test is about; every other key of its actor_infer is served as written.
    overrides = [f"pretrain={tiny_model}", "actor_infer.device_mapping=null", f"{EAGER}=true"]
    servers = {
        "roll": server_process("rollout", MEGATRON, [*SEARCH, f"pretrain={tiny_model}"]),
        "agentic": server_process("rollout", agentic, ["--config-search-path", str(tmp / "config"), *overrides]),
    }
    start_all(list(servers.values()), timeout=600)
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def roll_rollout(rollouts):
    return rollouts["roll"]


@pytest.fixture(scope="module")
def roll_reward(tiny_model):
    server = serve("reward", MEGATRON, [*SEARCH, f"pretrain={tiny_model}"])
    yield server
    server.stop()


def test_rollout_server_serves_the_roll_block(roll_rollout, tiny_model):
    async def go():
        async with RolloutClient(roll_rollout.address) as client:
            info = await client.info()
            request = GenerateRequest(request_id="q", prompt="1+1=", sampling=SamplingParams(seed=1))
            samples = [s async for s in client.generate([request])]
        return info, samples

    info, samples = asyncio.run(go())
    assert info.model == tiny_model and info.infer_batch_size == 8
    engine = json.loads(info.engine_config_json)
    assert "VLLM_USE_V1" not in engine and "sleep_level" not in engine and engine["max_model_len"] == 256
    assert json.loads(info.generating_args_json)["num_return_sequences"] == 2
    assert len(samples) == 2 and all(0 < len(s.token_ids) <= 16 for s in samples)  # max_new_tokens: response_length


def test_reward_server_scores_with_roll_worker_classes(roll_reward):
    async def go():
        async with RewardClient(roll_reward.address) as client:
            return await client.score([
                {"reward_name": "math_rule", "response": "so the answer is \\boxed{4}", "ground_truth": "4"},
                {"reward_name": "math_rule", "response": "\\boxed{5}", "ground_truth": "4"},
                {"reward_name": "crossthinkqa", "response": "<think>hmm</think>\\boxed{B}", "ground_truth": "B"},
                {"reward_name": "crossthinkqa", "response": "The answer is C", "ground_truth": "B"},
            ])  # fmt: skip

    responses = asyncio.run(go())
    scores = [r.score for r in responses]
    assert scores[0] == 1.0 and scores[1] == 0.0
    assert scores[2] == pytest.approx(1.0) and scores[3] == pytest.approx(-1.0)  # soft: boxed+right, unboxed+wrong
    assert [r.correct for r in responses] == [1.0, 0.0, 1.0, 0.0] and all(r.HasField("correct") for r in responses)


def test_rollout_server_serves_an_agentic_configs_actor_infer(rollouts, tiny_model):
    """A role reads its own section: `fabric serve rollout` on an agentic config (env managers, custom_envs, an
    unset-until-now `${now:...}`) serves its actor_infer."""

    async def go():
        async with RolloutClient(rollouts["agentic"].address) as client:
            request = GenerateRequest(request_id="a", prompt="1+1=", sampling=SamplingParams(seed=1))
            return await client.info(), [s async for s in client.generate([request])]

    info, samples = asyncio.run(go())
    assert info.model == tiny_model and len(samples) == 1 and 0 < len(samples[0].token_ids) <= 64
    engine = json.loads(info.engine_config_json)  # its own section: the agentic config's, not the defaults
    assert engine["gpu_memory_utilization"] == 0.3 and engine["enforce_eager"] is True
