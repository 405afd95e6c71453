"""A rollout server dies mid-rollout (SIGKILL of its whole process group, or a link that goes silent): the step
still gets every sample exactly once from the survivors, the run goes on, and the server, once back, is admitted
only after it is brought to the current weight version. Reward servers: a failed call is retried elsewhere, never
scored 0."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from fabric.routing import RewardPool, RolloutPool
from fabric.trainer.config import PipelineConfig
from fabric.trainer.loop import Trainer
from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from tests.rollout.fake_engine import fingerprint
from tests.rollout.fake_server import fake_rollout_process

from .conftest import server_info, weights_status
from .proxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class CheckpointPolicy:
    """The trainer's weight source, read from an HF checkpoint: the loop's push and re-admission code runs as in a
    real run, without megatron (what is tested here is the routing and the weight sync, not the training)."""

    def __init__(self, directory: str):
        self.directory = directory

    def hf_weights(self):
        from safetensors import safe_open

        for path in sorted(Path(self.directory).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)


def make_trainer(checkpoint: str, addresses: list[str], tmp_path) -> Trainer:
    pc = PipelineConfig(output_dir=str(tmp_path), chunk_mib=0.25, rpc_timeout_s=10, push_timeout_s=60)
    trainer = Trainer(pc, CheckpointPolicy(checkpoint), None, None, [])
    trainer.rollouts = RolloutPool(addresses, stream_timeout=120)
    trainer.version = max(weights_status(a).serving_version for a in addresses)
    return trainer


def long_requests(prefix: str, prompts: int, samples: int, max_new_tokens: int) -> list[rollout_pb2.GenerateRequest]:
    sampling = rollout_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, num_return_sequences=samples)
    return [
        rollout_pb2.GenerateRequest(request_id=f"{prefix}-{k}", prompt=f"Add {k} and {k + 7}.\n", sampling=sampling)
        for k in range(prompts)
    ]


def expected_keys(requests) -> set[tuple[str, int]]:
    return {(r.request_id, i) for r in requests for i in range(r.sampling.num_return_sequences)}


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_sigkill_mid_step_loses_and_duplicates_nothing_and_restart_is_readmitted(
    rollout_servers, tiny_model_b, tmp_path
):
    """The survivor is one of the session's vLLM servers; the victim, whose death is the subject, is a fake-engine
    server in a process of its own (tests/rollout/fake_server.py: real gRPC, real weight checks and staging), so the
    kill and the restart cost no vLLM start."""
    survivor = rollout_servers[0]
    # One request at a time, 2 s each: the victim still owes most of its share when its first samples arrive.
    options = ["--infer-batch-size", "1", "--token-seconds", "0.01"]
    env = {"FABRIC_SHM_DIR": str(tmp_path)}
    victim = fake_rollout_process(tiny_model_b, "victim", 0, *options)
    victim.env.update(env)
    victim.start().wait_ready(120)
    addresses = [survivor.address, victim.address]
    servers = [victim]

    async def scenario():
        trainer = make_trainer(tiny_model_b, addresses, tmp_path)
        await trainer.push_weights()  # both serve checkpoint b as the next version
        version = trainer.version
        pool = trainer.rollouts

        # 1. A step with many long requests in flight on both servers; SIGKILL one once its samples flow.
        requests = long_requests("step1", prompts=16, samples=4, max_new_tokens=200)
        keys: list[tuple[str, int]] = []
        by_server: Counter[str] = Counter()
        killed_after = None
        async for response in pool.generate(requests):
            assert not response.HasField("error"), response.error
            assert response.weight_version == version
            keys.append((response.request_id, response.sample_index))
            by_server[response.server] += 1
            if killed_after is None and by_server[victim.address] >= 1:  # its stream is flowing: kill it now
                victim.signal(signal.SIGKILL)
                killed_after = len(keys)
        assert killed_after is not None, f"the victim never produced samples: {by_server}"
        assert len(keys) == len(set(keys)), [k for k, n in Counter(keys).items() if n > 1]
        assert set(keys) == expected_keys(requests)
        assert killed_after < len(keys), "the kill came after the step had already finished"
        assert pool.alive == [survivor.address]
        assert any(e.startswith(f"rollout server {victim.address} lost") for e in pool.events), pool.events
        assert any(e.startswith("resubmitted") for e in pool.events), pool.events

        # 2. The run goes on with the survivor.
        more = long_requests("step2", prompts=4, samples=2, max_new_tokens=8)
        responses = [r async for r in pool.generate(more)]
        assert {(r.request_id, r.sample_index) for r in responses} == expected_keys(more)
        assert {r.server for r in responses} == {survivor.address}

        # 3. The server comes back (same address, no weights pushed yet, version 0): not routed to until the
        #    trainer brings it to the current version.
        victim.proc.wait(timeout=30)
        port = int(victim.address.rsplit(":", 1)[1])
        restarted = fake_rollout_process(tiny_model_b, "victim-restarted", port, *options)
        restarted.env.update(env)
        servers.append(restarted)
        await asyncio.to_thread(lambda: restarted.start().wait_ready(120))
        assert restarted.address == victim.address
        assert weights_status(restarted.address).serving_version == 0
        assert pool.alive == [survivor.address]
        await trainer.readmit_servers()
        assert sorted(pool.alive) == sorted(addresses)
        assert weights_status(restarted.address).serving_version == version
        assert any(e == f"rollout server {victim.address} admitted" for e in pool.events), pool.events
        third = long_requests("step3", prompts=8, samples=2, max_new_tokens=8)
        responses = [r async for r in pool.generate(third)]
        assert {(r.request_id, r.sample_index) for r in responses} == expected_keys(third)
        assert {r.server for r in responses} == set(addresses), "least-loaded routing uses the re-admitted server"
        assert {r.weight_version for r in responses} == {version}
        await pool.close()
        return version

    try:
        version = asyncio.run(scenario())
        # the re-admitted server serves checkpoint b, byte for byte
        served = json.loads(server_info(victim.address).engine_config_json)["weights"]
        assert served == fingerprint(CheckpointPolicy(tiny_model_b).hf_weights())
        assert weights_status(victim.address).serving_version == version
        for address in addresses:
            info = server_info(address)
            assert info.running_requests == 0 and info.queue_depth == 0
    finally:
        for server in servers:
            server.stop(grace=5)


def test_server_put_to_sleep_mid_step_hands_its_aborted_samples_to_the_others(rollout_servers):
    """Sleep aborts what the server has in flight (the same path as a drain whose grace ran out): those ABORT
    answers are not samples; the pool regenerates them elsewhere and routes no more to the sleeper."""
    awake, sleeper = rollout_servers[0].address, rollout_servers[2].address
    requests = long_requests("sleep", prompts=16, samples=4, max_new_tokens=200)

    async def scenario():
        pool = RolloutPool([awake, sleeper], stream_timeout=120)  # grpc.aio channels belong to this loop
        keys, reasons, slept = [], Counter(), False
        async with grpc.aio.insecure_channel(sleeper) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            async for response in pool.generate(requests):
                assert not response.HasField("error"), response.error
                keys.append((response.request_id, response.sample_index))
                reasons[rollout_pb2.FinishReason.Name(response.finish_reason)] += 1
                if not slept and response.server == sleeper:
                    await stub.Sleep(rollout_pb2.SleepRequest(level=1), timeout=30)
                    slept = True
            await stub.WakeUp(rollout_pb2.WakeUpRequest(), timeout=30)
        await pool.close()
        return keys, reasons, slept, pool

    keys, reasons, slept, pool = asyncio.run(scenario())
    assert slept
    assert len(keys) == len(set(keys)) and set(keys) == expected_keys(requests)
    assert "FINISH_REASON_ABORT" not in reasons, reasons
    assert pool.alive == [awake]
    assert any("aborted in-flight samples" in e or "asleep" in e for e in pool.events), pool.events


def test_silent_server_is_noticed_by_keepalive_and_its_samples_move(rollout_servers):
    """A peer that stops answering without closing the connection (a frozen host, a partition): keepalive pings
    go unanswered, the stream fails in seconds and its requests are resubmitted."""
    healthy = rollout_servers[0].address
    with TcpProxy(rollout_servers[2].address) as proxy:
        requests = long_requests("frozen", prompts=8, samples=2, max_new_tokens=120)

        async def scenario():
            pool = RolloutPool([healthy, proxy.address], stream_timeout=300)
            # The connection to the soon-silent server is up and quiet; then the link freezes right after the
            # server's first answer to the Generate stream (it has the requests and owes every sample). Freezing
            # from the proxy's own loop, not on a sample the test reads, keeps the timing out of the test: a busy
            # test process once read the first sample only after the server had sent them all.
            await pool.servers[proxy.address].stub.GetServerInfo(
                rollout_pb2.RolloutServiceGetServerInfoRequest(), timeout=30
            )
            await asyncio.sleep(0.5)
            proxy.freeze_after_next_reply()
            keys = []
            async for response in pool.generate(requests):
                assert not response.HasField("error"), response.error
                keys.append((response.request_id, response.sample_index))
            await pool.close()
            assert proxy.frozen_at is not None, "the server behind the proxy never answered"
            return keys, time.monotonic() - proxy.frozen_at, pool

        keys, seconds, pool = asyncio.run(scenario())
    assert sorted(keys) == sorted(expected_keys(requests))
    assert pool.alive == [healthy]
    lost = [e for e in pool.events if "lost" in e]
    assert lost and "UNAVAILABLE" in lost[0], pool.events
    print(f"\nsilent rollout server noticed and its samples regenerated after {seconds:.1f} s")
    # keepalive pings every 10 s, 5 s to answer (keepalive_timeout_ms and grpc-core's own ping_timeout_ms, whose
    # 60 s default made this a minute): seconds, far below the 300 s deadline
    assert seconds < 40, f"the silent server took {seconds:.0f} s to be noticed"


def test_reward_call_failing_is_retried_elsewhere_and_never_scored_zero(reward_server):
    items = [
        dict(request_id=f"r{k}", prompt=f"Add {k} and 1.", response=f"<answer>{k + 1}</answer>",
             ground_truth=str(k + 1), reward_name="answer_tag")
        for k in range(12)
    ]  # fmt: skip

    async def score(addresses, **kwargs):
        pool = RewardPool(addresses, timeout=20, **kwargs)
        try:
            return await pool.score(items), pool.events
        finally:
            await pool.close()

    with TcpProxy(reward_server.address) as dead:
        dead.cut(refuse=True)  # every connection through it is reset: a server that is down
        responses, events = asyncio.run(score([dead.address, reward_server.address], backoff_s=0.1))
        assert [r.request_id for r in responses] == [i["request_id"] for i in items]
        assert all(r.score == 1.0 and not r.HasField("error") for r in responses), responses
        assert any(f"reward call to {dead.address} failed" in e for e in events), events

        # Every server down: the step fails with the reasons after the retries, it does not score 0.
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="scoring failed on every reward server after retries"):
            asyncio.run(score([dead.address], attempts=3, backoff_s=0.2))
        assert time.monotonic() - started >= 0.2 + 0.4  # backed off between attempts


def test_weight_push_drops_a_server_that_died_between_steps_and_the_run_goes_on(rollout_servers, tiny_model, tmp_path):
    """The trainer pushes a version right after a server died, before any generate call noticed: the push still
    commits on the live server, the dead one is dropped from routing, and the loop does not stop."""
    live = rollout_servers[0].address
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{unused.getsockname()[1]}"

    async def scenario():
        trainer = make_trainer(tiny_model, [live], tmp_path)
        await trainer.rollouts.close()
        trainer.rollouts = RolloutPool([dead, live], stream_timeout=120)  # it still believes both alive
        assert sorted(trainer.rollouts.alive) == sorted([dead, live])
        before = trainer.version
        await trainer.push_weights()
        assert trainer.version == before + 1
        assert trainer.rollouts.alive == [live]
        assert any(e.startswith(f"rollout server {dead} lost: weight update") for e in trainer.rollouts.events)
        assert weights_status(live).serving_version == before + 1
        await trainer.rollouts.close()

    asyncio.run(scenario())
