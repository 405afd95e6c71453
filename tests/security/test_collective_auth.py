"""Issue 21: nobody but the sender that announced an update on the authenticated stream can steer a gloo/nccl
update. A real outsider process (no token) reads the sender's TCP store, plants a plan, joins the group as rank 0 and
broadcasts its own bytes, while the real sender is held back just before it publishes its plan. The rollout server
(fake engine that offers gloo, real gRPC, real staging file) must commit the trainer's bytes, never the outsider's."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import torch.distributed as dist

from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from fabric.weights import manifest as mf
from fabric.weights.digest import source_digests
from fabric.weights.sender import push_weights
from fabric.weights.staging import layout
from fabric.weights.transports import collective
from fabric.weights.transports.collective import CollectiveReceiver
from tests.rollout.fake_engine import FakeEngine, fingerprint
from tests.rollout.test_servicer import fake_server
from tests.weights.test_versions import checkpoint, shm, source

__all__ = ["shm"]


class GlooEngine(FakeEngine):
    def weight_transports(self, store) -> list:
        return [CollectiveReceiver("gloo")]


def layout_bytes(weights) -> int:
    return layout([(t.name, mf.PROTO_TO_TORCH[t.dtype], tuple(t.shape)) for t in weights.manifest.tensors])[1]


def listening(port: int) -> list[str]:
    """The local addresses a TCP port listens on (ss)."""
    lines = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line.split()[3].rsplit(":", 1)[0] for line in lines if line.split()[3].endswith(f":{port}")]


def test_a_gloo_push_commits_and_the_store_listens_only_where_the_servers_are(shm):
    async def go():
        async with fake_server(GlooEngine()) as (client, _, engine):
            report = await push_weights(source(3), [client.address], version=1, transport="gloo", timeout=60)
            (session,) = collective._SESSIONS.values()  # kept for the next push: its store stays open
            return report, engine, listening(session.master.port)

    try:
        report, engine, addresses = asyncio.run(go())
    finally:
        collective.close_sessions()
    assert report.ok and report.transport == "gloo", report.failed
    assert engine.weights == fingerprint(checkpoint(3).items())
    assert addresses == ["127.0.0.1"], addresses  # not every interface


def test_an_outsider_who_reaches_the_store_cannot_commit_its_weights(shm, monkeypatch):
    monkeypatch.setenv("FABRIC_COLLECTIVE_KEEP", "0")
    monkeypatch.setenv("FABRIC_COLLECTIVE_TIMEOUT_S", "60")  # the outsider process starts slowly on a loaded host
    weights = source(4)
    said: list[str] = []
    real = dist.PrefixStore

    class HeldSender(real):  # the sender, slower than the outsider: it publishes its plan once the outsider is done
        def set(self, key, value):
            if key == "go" and not said:
                store = self.underlying_store
                out = subprocess.run(
                    [sys.executable, "-m", "tests.security.outsider", f"{store.host}:{store.port}",
                     str(layout_bytes(weights)), str(collective.DEFAULT_BUCKET_BYTES)],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                said.append(out.stdout.strip() + out.stderr[-2000:])
            return super().set(key, value)

    monkeypatch.setattr(dist, "PrefixStore", HeldSender)

    async def go():
        async with fake_server(GlooEngine()) as (client, _, engine):
            report = await push_weights(weights, [client.address], version=1, transport="gloo", timeout=150)
            return report, engine

    report, engine = asyncio.run(go())
    assert said and said[0].startswith("outsider:"), said
    assert engine.weights == fingerprint(checkpoint(4).items()), (said, report.results)  # never the outsider's
    assert report.ok, (said, report.failed)
    assert engine.commits == [1]


def flood(port: int, keys: int = 2000) -> str:
    """A real outsider process sets `keys` keys of 4 KiB in the store at `port`; what it says."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.security.outsider", "flood", f"127.0.0.1:{port}", str(keys), "4096"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return out.stdout.strip() + out.stderr[-2000:]


def test_an_outsider_who_floods_the_store_with_keys_gets_the_update_refused_and_the_store_closed(shm, monkeypatch):
    """torch's TCPStore has no quota on keys: the sender counts them, refuses the update past its bound (nothing
    commits) and closes the store with what was written to it; the next push opens a new one and commits. A store
    kept between updates that gets flooded is closed by the guard thread."""
    monkeypatch.setenv("FABRIC_COLLECTIVE_TIMEOUT_S", "60")  # the outsider process starts slowly on a loaded host
    flooded: list[tuple[str, int]] = []
    real = dist.PrefixStore

    class FloodedAtCheckIn(real):  # once the server has checked in, the outsider floods the store
        def get(self, key):
            if key.startswith("ready/") and not flooded:
                port = self.underlying_store.port
                flooded.append((flood(port), port))
            return super().get(key)

    async def go():
        async with fake_server(GlooEngine()) as (client, _, engine):
            monkeypatch.setattr(dist, "PrefixStore", FloodedAtCheckIn)
            first = await push_weights(source(4), [client.address], version=1, transport="gloo", timeout=150)
            monkeypatch.setattr(dist, "PrefixStore", real)
            closed = listening(flooded[0][1]) if flooded else None
            second = await push_weights(source(5), [client.address], version=2, transport="gloo", timeout=150)
            (kept,) = collective._SESSIONS.values()
            port = kept.master.port
            said = await asyncio.to_thread(flood, port)  # between updates: the guard closes it
            deadline = time.monotonic() + 10
            while listening(port) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            closed_between = (said, listening(port), dict(collective._SESSIONS))
            third = await push_weights(source(6), [client.address], version=3, transport="gloo", timeout=150)
            return first, closed, second, closed_between, third, engine

    try:
        first, closed, second, closed_between, third, engine = asyncio.run(go())
    finally:
        collective.close_sessions()
    assert flooded and flooded[0][0].startswith("outsider: set 2000 keys"), flooded
    (result,) = first.results
    assert not first.ok and not result.committed, first.results
    assert "keys, more than the" in result.error.message and "store closed" in result.error.message, result.error
    assert closed == [], closed  # the flooded store is gone, and its keys with it
    assert second.ok, second.failed  # the trainer goes on: a new store, a new group
    said, still_listening, sessions = closed_between
    assert said.startswith("outsider:") and still_listening == [] and sessions == {}, closed_between
    assert third.ok, third.failed
    assert engine.commits == [2, 3] and engine.weights == fingerprint(checkpoint(6).items())


def hand_made_header(weights, store_port: int, **rendezvous) -> rollout_pb2.UpdateWeightsHeader:
    fields = dict(backend="gloo", store_address=f"127.0.0.1:{store_port}", world_size=2, rank=1,
                  timeout_s=30.0, group_id="hand#1", secret="s" * 64)  # fmt: skip
    fields.update(rendezvous)
    return rollout_pb2.UpdateWeightsHeader(
        weight_version=1,
        manifest=weights.manifest,
        transport="gloo",
        collective=rollout_pb2.CollectiveRendezvous(**fields),
        tensor_digests=source_digests(weights),
    )


def update(address: str, header) -> asyncio.Future:
    async def requests():
        yield rollout_pb2.UpdateWeightsRequest(header=header)

    channel = grpc.aio.insecure_channel(address)
    return rollout_pb2_grpc.RolloutServiceStub(channel).UpdateWeights(requests(), timeout=60)


def test_an_infinite_header_deadline_is_clamped_and_tiny_buckets_are_refused(shm):
    weights = source(5)
    master = collective._master_store("127.0.0.1", 30)

    async def go():
        async with fake_server(GlooEngine()) as (client, _, engine):
            try:
                await update(client.address, hand_made_header(weights, master.port, bucket_bytes=1))
                tiny = None
            except grpc.aio.AioRpcError as exc:
                tiny = exc
            call = update(client.address, hand_made_header(weights, master.port, timeout_s=float("inf")))
            store = dist.PrefixStore("hand/1/", master)
            for _ in range(300):  # the server checks in (an infinite deadline was an OverflowError)
                if store.check(["ready/1"]):
                    break
                await asyncio.sleep(0.1)
            checked_in = store.check(["ready/1"])
            plan = {"ranks": {}, "world": 1, "pg": "none/", "reason": "test: left out"}
            store.set("go", collective._signed("s" * 64, "go", "hand#1", plan))
            return tiny, checked_in, await call, engine

    tiny, checked_in, response, engine = asyncio.run(go())
    assert tiny is not None and tiny.code() == grpc.StatusCode.INVALID_ARGUMENT and "bucket_bytes" in tiny.details()
    assert checked_in
    (result,) = response.results
    assert not result.committed and "left out" in result.error.message, result
    assert engine.commits == []
