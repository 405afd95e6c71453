"""Asynchronous RL (issue 17): the Trainer's whole loop over real gRPC to fake rollout servers (tests/rollout's
FakeEngine behind the real servicer and weight receiver; real pushes, real in-flight updates), with a policy
stand-in and in-process rewards. What is checked: k = 0 is the loop in turn; no sample beyond k versions is trained
on; a weight update while samples stream loses none and delivers none twice; the versions each sample carries are
the ones the engine generated it under; a rollout server killed during an asynchronous run is survived."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack, asynccontextmanager
from types import SimpleNamespace

import pytest
import torch

from fabric.config import ConfigError, load_config
from fabric.trainer.algorithm import off_policy_weights
from fabric.trainer.config import PipelineConfig, pipeline_config
from fabric.trainer.loop import Trainer
from fabric.v1 import reward_pb2
from tests.rollout.fake_engine import FakeEngine
from tests.rollout.test_servicer import serving
from tests.test_examples import EXAMPLES
from tests.trainer.test_loop import sample
from tests.weights.test_versions import checkpoint


class TruthEngine(FakeEngine):
    """Records, per (wire request id, sample index), the versions it really generated the sample under."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.truth: dict[tuple[str, int], tuple[int, int]] = {}

    async def generate(self, engine_id, prompt_token_ids, sampling, index):
        first = self.weight_version
        result = await super().generate(engine_id, prompt_token_ids, sampling, index)
        self.truth[(engine_id.split("/", 2)[2], index)] = (first, self.weight_version)
        return result


class StandInPolicy:
    """The Policy's surface the loop uses; train_step takes `train_seconds` (in a thread, as the real one)."""

    def __init__(self, train_seconds: float = 0.0):
        self.train_seconds = train_seconds
        self.batches = []
        self.seed = 0

    def logprobs(self, batch):
        return torch.full(batch.input_ids.shape, -1.0)  # the fake engine's logprob: on-policy ratio 1

    def train_step(self, batch):
        import time

        time.sleep(self.train_seconds)
        self.batches.append(batch)
        self.seed += 1
        return {"loss": 0.0, "grad_norm": 1.0, "lr": 1e-3, "clip_frac": 0.0}

    def hf_weights(self):
        return iter(checkpoint(self.seed).items())

    def save(self, path):
        return path


class InProcessRewards:
    def __init__(self, *args, **kwargs):
        self.calls = []

    async def score(self, items):
        self.calls.append(len(items))
        await asyncio.sleep(0.005)
        return [reward_pb2.ScoreResponse(score=float(len(item["response"]) % 3 == 0)) for item in items]

    async def close(self):
        pass


@asynccontextmanager
async def rollout_server(engine: FakeEngine, **config):
    async with serving(engine, grace=0, **config) as (server, _):
        yield server


def make_trainer(tmp_path, steps=4, k=0, train_seconds=0.05, **pc_overrides) -> Trainer:
    pc = PipelineConfig(output_dir=str(tmp_path / "run"), group_size=4, rollout_batch_size=2, max_steps=steps)
    pc.rewards = {"rule": {"weight": 1.0, "tags": []}}
    pc.sampling = {"max_new_tokens": 6, "num_return_sequences": 4}
    pc.max_staleness = k
    for key, value in pc_overrides.items():
        setattr(pc, key, value)
    dataset = [{"prompt": f"{a}+{a}", "ground_truth": str(2 * a)} for a in range(10, 30)]
    return Trainer(pc, StandInPolicy(train_seconds), StandInPolicy(), SimpleNamespace(pad_token_id=0), dataset)


def run(trainer: Trainer, engines: list[FakeEngine], during=None, **config) -> list:
    async def go():
        async with AsyncExitStack() as stack:
            servers = [await stack.enter_async_context(rollout_server(e, **config)) for e in engines]
            task = asyncio.create_task(trainer.run([s.address for s in servers], ["unused:1"]))
            if during is not None:
                await during(trainer, servers)
            await task
            return servers

    asyncio.run(go())
    return trainer.history


def trained_rows(trainer: Trainer):
    """Per optimizer step: how many rows entered the loss."""
    return [int((b.response_mask.sum(1) > 0).sum()) for b in trainer.policy.batches]


def test_k0_is_the_loop_in_turn(env):
    trainer = make_trainer(env, steps=4, k=0)
    engine = TruthEngine(token_seconds=0.005)
    history = run(trainer, [engine])
    assert [m["step"] for m in history] == [1, 2, 3, 4] and trainer.version == 5
    for m in history:  # every sample from the version the step trains with: nothing stale, nothing overlaps
        assert m["stale_samples"] == 0 and m["extra"]["staleness_max"] == 0
        assert m["extra"]["overlap_seconds"] == 0.0 and m["extra"]["spanning_samples"] == 0
        assert m["extra"]["off_policy_samples"] == 0
    assert engine.commits == [1, 2, 3, 4, 5]
    assert {first for first, _ in engine.truth.values()} == {1, 2, 3, 4}  # step s generated by version s only
    assert trained_rows(trainer) == [8] * 4
    # each step trained on samples of its own version only, all of them generated before its training started
    for m in history:
        assert m["generate_seconds"] > 0 and m["extra"]["wait_seconds"] >= m["generate_seconds"] * 0.9


@pytest.mark.parametrize("k", [1, 2])
def test_no_sample_beyond_k_versions_is_trained_on_and_generation_overlaps_training(env, k):
    trainer = make_trainer(env, steps=6, k=k, train_seconds=0.15)
    engine = TruthEngine(token_seconds=0.01)
    history = run(trainer, [engine], infer_batch_size=16)
    assert [m["step"] for m in history] == list(range(1, 7))
    assert max(m["extra"]["staleness_max"] for m in history) <= k
    assert any(m["extra"]["staleness_max"] > 0 for m in history)  # it did run ahead
    assert sum(m["extra"]["overlap_seconds"] for m in history) > 0.1
    assert all(m["stale_samples"] == 0 for m in history)
    assert trained_rows(trainer) == [8] * 6


def test_a_sample_beyond_the_bound_is_left_out_and_older_ones_within_it_are_weighted():
    from tests.trainer.test_loop import make_trainer as unit_trainer

    trainer = unit_trainer(__import__("pathlib").Path("/tmp"), per_device_train_batch_size=8)
    trainer.pc.max_staleness, trainer.version = 1, 3
    versions = [3, 3, 2, 1, 3, 3, 2, 2]
    samples = [sample(k // 4, "x", version=v) for k, v in enumerate(versions)]
    for n, s in enumerate(samples):
        s.reward = float(n % 2)
        s.response.logprobs[:] = [-0.5, -0.5]  # the policy stand-in says 0: w = e^0.5 for the older samples
    metrics = trainer.train(samples)
    (batch,) = trainer.policy.batches
    assert batch.response_mask[3].sum() == 0 and metrics["stale_samples"] == 1  # version 1: 2 behind, k = 1
    assert metrics["extra"]["staleness_max"] == 2 and metrics["extra"]["off_policy_samples"] == 3
    reference = unit_trainer(__import__("pathlib").Path("/tmp"), per_device_train_batch_size=8)
    reference.pc.max_staleness, reference.pc.off_policy_correction, reference.version = 1, "none", 3
    reference.train(samples)
    plain = reference.policy.batches[0].advantages
    ratio = torch.exp(torch.tensor(0.5))
    assert torch.allclose(batch.advantages[2], plain[2] * ratio) and torch.equal(batch.advantages[0], plain[0])


def test_off_policy_weights_tis_truncates_and_decoupled_masks():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    rollout = torch.tensor([[0.0, -0.5, -2.0]])  # w = 1, e^0.5, e^2
    mask = torch.ones(1, 3)
    tis, _ = off_policy_weights(rollout, old, mask, torch.tensor([True]), "tis", 2.0)
    dec, _ = off_policy_weights(rollout, old, mask, torch.tensor([True]), "decoupled", 2.0)
    on, _ = off_policy_weights(rollout, old, mask, torch.tensor([False]), "tis", 2.0)
    assert tis.tolist()[0] == pytest.approx([1.0, 1.6487213, 2.0])
    assert dec.tolist()[0] == pytest.approx([1.0, 1.6487213, 0.0])
    assert torch.equal(on, torch.ones(1, 3))


@pytest.mark.parametrize("partial", ["keep", "regenerate"])
def test_an_update_mid_stream_loses_no_sample_delivers_none_twice_and_versions_are_true(env, partial):
    trainer = make_trainer(env, steps=5, k=1, train_seconds=0.02, partial_rollout=partial)
    engine = TruthEngine(token_seconds=0.03)
    seen: list = []
    original = trainer.train

    def spy(samples):
        seen.extend((s.response.request_id, s.response.sample_index, s.response) for s in samples)
        return original(samples)

    trainer.train = spy  # type: ignore[method-assign]
    history = run(trainer, [engine], infer_batch_size=16)
    keys = [(rid, j) for rid, j, _ in seen]
    assert len(keys) == len(set(keys)) == 5 * 8  # every (step, prompt, sample) once
    spanning = sum(m["extra"]["spanning_samples"] for m in history)
    assert spanning > 0  # updates did land mid-sample
    for rid, j, response in seen:
        truth_key = (rid, j) if "-j" not in rid else (rid, 0)
        assert (response.first_weight_version, response.last_weight_version) == engine.truth[truth_key]
        if partial == "regenerate":
            assert response.first_weight_version == response.last_weight_version
    if partial == "regenerate":
        assert sum(m["extra"]["regenerated_samples"] for m in history) == spanning
    else:
        assert any(r.first_weight_version != r.last_weight_version for _, _, r in seen)


def test_a_rollout_server_killed_during_an_async_run_is_survived(env):
    trainer = make_trainer(env, steps=5, k=2, train_seconds=0.05)
    engines = [TruthEngine(token_seconds=0.02), TruthEngine(token_seconds=0.02)]

    async def kill_one(trainer, servers):
        while trainer.step < 2:
            await asyncio.sleep(0.01)
        await servers[1].stop(grace=0)

    history = run(trainer, engines, kill_one, infer_batch_size=16)
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5]
    assert history[-1]["extra"]["rollout_servers_alive"] == 1.0
    assert trained_rows(trainer) == [8] * 5
    assert any("lost" in e for e in trainer.rollouts.events)


def test_async_generation_ratio_maps_onto_max_staleness():
    pc = pipeline_config(load_config(EXAMPLES / "roll_qwen2.5-7b_rlvr.yaml", ["async_generation_ratio=0.5"]))
    assert pc.max_staleness == 1
    assert pipeline_config(load_config(EXAMPLES / "default.yaml")).max_staleness == 0  # the demo's measured default
    pc = pipeline_config(load_config(EXAMPLES / "default.yaml", ["async_training.max_staleness=2"]))
    assert pc.max_staleness == 2 and pc.partial_rollout == "keep" and pc.off_policy_correction == "tis"
    with pytest.raises(ConfigError, match="contradicts"):
        pipeline_config(
            load_config(EXAMPLES / "default.yaml", ["async_generation_ratio=2", "async_training.max_staleness=1"])
        )
    with pytest.raises(ConfigError, match="partial_rollout"):
        pipeline_config(load_config(EXAMPLES / "default.yaml", ["async_training.partial_rollout=abort"]))
