"""No silent loss in a weight push (issue 20): a push that does not reach a server is a failed push for that server,
named; a path that cannot relay (CUDA IPC) sends to each server directly even in relay mode; the loop never trains
on a server that missed an update, and at max_staleness 0 a sample of an older version stops the run.

The servers are fake-engine rollout servers behind the real servicer and weight receiver (tests/trainer/
test_async.py); the pushes are real gRPC pushes. The transports below isolate the failure being tested: each is
the real gRPC stream transport with one behaviour of a path that cannot relay (it ignores relay_targets)."""

from __future__ import annotations

import asyncio
import sys
import types
from contextlib import AsyncExitStack

import pytest

from fabric.weights import sender as sender_module
from fabric.weights import transports
from fabric.weights.sender import WeightSource, push_weights, weights_status
from fabric.weights.transports import grpc_stream
from tests.rollout.fake_engine import FakeEngine
from tests.trainer.test_async import make_trainer, rollout_server, run
from tests.weights.test_versions import checkpoint


async def _head_only_send(job):
    """What the IPC sender does: one server per stream, whatever relay_targets it is given."""
    job.relay_targets = []
    return await grpc_stream.send(job)


def _path(name: str, relays: bool) -> types.ModuleType:
    module = types.ModuleType(name)
    module.NAME = "grpc"  # type: ignore[attr-defined]
    module.unusable = grpc_stream.unusable  # type: ignore[attr-defined]
    module.send = _head_only_send  # type: ignore[attr-defined]
    # relays: a path that claims to relay but answers for its head only: the accounting must catch it
    module.RELAYS = relays  # type: ignore[attr-defined]
    return module


@pytest.fixture
def path(monkeypatch):
    """`path(relays)`: pushes over "grpc" go through a head-only transport."""

    def use(relays: bool) -> None:
        module = _path(f"tests_head_only_{relays}", relays)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(transports.SENDERS, "grpc", module.__name__)

    return use


def _push_to(engines, version=1, **kwargs):
    async def go():
        async with AsyncExitStack() as stack:
            servers = [await stack.enter_async_context(rollout_server(e)) for e in engines]
            targets = [s.address for s in servers]
            source = WeightSource(checkpoint(1).items())
            report = await push_weights(source, targets, version=version, transport="grpc", **kwargs)
            serving = [(await weights_status(t)).serving_version for t in targets]
            return targets, report, serving

    return asyncio.run(go())


def test_a_path_that_cannot_relay_sends_to_each_server_directly_in_relay_mode(env, path):
    path(relays=False)
    targets, report, serving = _push_to([FakeEngine(), FakeEngine(), FakeEngine()], mode="relay")
    assert report.ok, [r.error.message for r in report.failed]
    assert serving == [1, 1, 1]
    assert sorted(r.server for r in report.results) == sorted(targets)


def test_a_server_a_push_never_reached_is_a_failed_push_for_it_named(env, path):
    path(relays=True)
    targets, report, serving = _push_to([FakeEngine(), FakeEngine()], mode="relay")
    assert serving == [1, 0]
    assert not report.ok
    (missed,) = report.failed
    assert missed.server == targets[1] and not missed.committed
    assert missed.error.reason == "NO_RESULT" and targets[1] in missed.error.message


def test_the_loop_never_samples_from_a_server_that_missed_a_push(env, path):
    """The initial push misses the second server: it is taken out of routing (and brought back only by a direct
    re-sync at the current version), so no sample of an older version is ever trained on."""
    path(relays=True)
    engines = [FakeEngine(token_seconds=0.002), FakeEngine(token_seconds=0.002)]
    trainer = make_trainer(env, steps=3, k=0, sync_mode="relay", sync_transport="grpc")
    history = run(trainer, engines)
    assert [m["step"] for m in history] == [1, 2, 3]
    assert all(m["stale_samples"] == 0 and m["extra"]["staleness_max"] == 0 for m in history)
    assert any("failed" in e and "never reached" in e for e in trainer.rollouts.events)


def test_at_max_staleness_0_a_sample_of_an_older_version_stops_the_run(env, path, monkeypatch):
    """The guard behind the push accounting: were a missed server still routed to, the run stops with one line
    naming it instead of training on (or silently dropping) its samples."""
    path(relays=True)
    monkeypatch.setattr(sender_module.PushReport, "failed", property(lambda self: []))  # the old, silent report
    engines = [FakeEngine(token_seconds=0.002), FakeEngine(token_seconds=0.002)]
    trainer = make_trainer(env, steps=3, k=0, sync_mode="relay", sync_transport="grpc")
    with pytest.raises(RuntimeError, match=r"missed a weight update; stopping") as raised:
        run(trainer, engines)
    assert "served version [0]" in str(raised.value)


class PhaseEngine(FakeEngine):
    """Records the order of sleeps, wake-ups and commits."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.phases: list[str] = []

    async def sleep(self, level):
        self.phases.append(f"sleep{level}")
        await super().sleep(level)

    async def wake_up(self, tags):
        self.phases.append("wake:" + ",".join(tags))
        await super().wake_up(tags)

    async def commit_weights(self, update_info, version):
        self.phases.append(f"commit{version}")
        await super().commit_weights(update_info, version)


def test_colocated_servers_sleep_while_the_trainer_trains_and_wake_for_the_new_version(env):
    engines = [PhaseEngine(token_seconds=0.002), PhaseEngine(token_seconds=0.002)]
    trainer = make_trainer(env, steps=2, k=0, colocate=True, sleep_level=2)
    history = run(trainer, engines)
    assert [m["step"] for m in history] == [1, 2]
    for engine in engines:  # version 1 before any rollout; then per step: sleep, train, weights, push, KV cache
        assert engine.phases == ["commit1"] + [
            p for v in (2, 3) for p in ("sleep2", "wake:weights", f"commit{v}", "wake:kv_cache")
        ]
    for m in history:
        assert m["stale_samples"] == 0 and m["extra"]["sleep_seconds"] > 0
        assert {"gpu_free_gib_generating", "gpu_free_gib_asleep", "trainer_peak_gib"} <= set(m["extra"])


def test_colocation_follows_roll_device_mappings_and_async_keeps_the_servers_awake():
    from fabric.config import ConfigError, load_config
    from fabric.trainer.config import pipeline_config
    from tests.test_examples import EXAMPLES

    same = ["actor_train.device_mapping=[0]", "actor_infer.device_mapping=[0]"]
    pc = pipeline_config(
        load_config(EXAMPLES / "default.yaml", [*same, "actor_infer.strategy_args.strategy_config.sleep_level=2"])
    )
    assert pc.colocate and pc.sleep_level == 2
    apart = ["actor_train.device_mapping=[0]", "actor_infer.device_mapping=[1]"]
    assert not pipeline_config(load_config(EXAMPLES / "default.yaml", apart)).colocate
    overlapping = pipeline_config(load_config(EXAMPLES / "default.yaml", [*same, "async_training.max_staleness=1"]))
    assert not overlapping.colocate and overlapping.max_staleness == 1  # generation overlaps training: no sleep
    with pytest.raises(ConfigError, match="sleep_level"):
        pipeline_config(
            load_config(EXAMPLES / "default.yaml", [*same, "actor_infer.strategy_args.strategy_config.sleep_level=3"])
        )


def test_kept_control_channels_serve_push_after_push_and_a_server_gone_is_named_and_forgotten(env):
    """A trainer keeps one control channel per server across versions (ChannelCache); a server that went away
    fails that push by name (UNREACHABLE), and its channel is dropped so that the next push connects afresh."""
    from fabric.weights.channels import ChannelCache

    async def go():
        channels = ChannelCache()
        try:
            async with rollout_server(FakeEngine()) as server:
                target = server.address
                reports = [
                    await push_weights(
                        WeightSource(checkpoint(v).items()), [target], version=v, transport="grpc", channels=channels
                    )
                    for v in (1, 2)
                ]
                kept = dict(channels._channels)
                serving = (await weights_status(target, channels=channels)).serving_version
            gone = await push_weights(WeightSource(checkpoint(3).items()), [target], version=3, channels=channels)
            return target, reports, kept, serving, gone, dict(channels._channels)
        finally:
            await channels.close()

    target, reports, kept, serving, gone, after = asyncio.run(go())
    assert all(r.ok for r in reports), [r.error.message for rep in reports for r in rep.failed]
    assert list(kept) == [target] and serving == 2
    assert "status_s" in reports[0].phases
    assert not gone.ok and gone.failed[0].server == target
    assert gone.failed[0].error.reason == "UNREACHABLE", gone.failed[0].error
    assert target not in after
