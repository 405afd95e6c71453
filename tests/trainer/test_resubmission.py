"""The rollout pool's resubmissions, against fake rollout servers in-process (grpc.aio): a request with a seed
resubmitted after its server died keeps, per missing sample, the seed it had (seed + its index), so it is the
sample it would have been and never a copy of another sample of its group; a request held by a stream whose
channel is closed under it (a server re-admitted) is generated elsewhere; a server that ends a stream cleanly gets
a new one for its next request. The last two hung the asynchronous trainer (CI, test_async) before they were fixed."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import grpc

from fabric.routing import RolloutPool
from fabric.v1 import rollout_pb2, rollout_pb2_grpc


class FakeRollout(rollout_pb2_grpc.RolloutServiceServicer):
    """Seeds sample k of a request with seed + k, as the vLLM engine does, and says which seed it used."""

    def __init__(self, die_after: int | None = None, silent_streams: int = 0, requests_per_stream: int = 0):
        self.die_after = die_after
        self.silent_streams = silent_streams  # the first streams take requests and never answer
        self.requests_per_stream = requests_per_stream  # > 0: a stream ends cleanly after answering that many
        self.sent = 0
        self.streams = 0
        self.received: list[str] = []

    async def GenerateBatch(self, request_iterator, context):  # the pool's RPC
        self.streams += 1
        silent, answered = self.streams <= self.silent_streams, 0
        async for batch in request_iterator:
            self.received += [r.request_id for r in batch.requests]
            if silent:
                continue
            for request in batch.requests:
                for k in range(request.sampling.num_return_sequences):
                    if self.die_after is not None and self.sent >= self.die_after:
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "killed")
                    self.sent += 1
                    sample = rollout_pb2.GenerateResponse(
                        request_id=request.request_id,
                        sample_index=k,
                        text=f"seed {request.sampling.seed + k}",
                        finish_reason=rollout_pb2.FINISH_REASON_STOP,
                    )
                    yield rollout_pb2.GenerateBatchResponse(responses=[sample])
                    await asyncio.sleep(0.01)
                answered += 1
                if answered == self.requests_per_stream:
                    return


@asynccontextmanager
async def pool_over(*servicers, stream_timeout: float | None = None):
    """The fake servers on 127.0.0.1 port 0 and a RolloutPool over them; yields (pool, addresses). Closes all."""
    servers, addresses = [], []
    try:
        for servicer in servicers:
            server = grpc.aio.server()
            rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, server)
            addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
            servers.append(server)
            await server.start()
        pool = RolloutPool(addresses, channel_factory=grpc.aio.insecure_channel, stream_timeout=stream_timeout)
        try:
            yield pool, addresses
        finally:
            await pool.close()
    finally:
        for server in servers:
            await server.stop(None)


def test_resubmitted_samples_keep_their_seeds():
    async def scenario():
        async with pool_over(FakeRollout(die_after=1), FakeRollout(), stream_timeout=30) as (pool, _):
            sampling = rollout_pb2.SamplingParams(num_return_sequences=4, seed=100)
            # the first request goes to the dying server (least loaded, first), the second to the healthy one
            requests = [rollout_pb2.GenerateRequest(request_id=f"r{k}", prompt="p", sampling=sampling) for k in (0, 1)]
            got = {(r.request_id, r.sample_index): r.text async for r in pool.generate(requests)}
        return got, pool.events

    got, events = asyncio.run(scenario())
    assert any(e.startswith("resubmitted r0 (3 samples)") for e in events), events
    for request_id in ("r0", "r1"):
        assert [got[(request_id, k)] for k in range(4)] == [f"seed {100 + k}" for k in range(4)]


def request(request_id: str) -> rollout_pb2.GenerateRequest:
    sampling = rollout_pb2.SamplingParams(num_return_sequences=2, seed=7)
    return rollout_pb2.GenerateRequest(request_id=request_id, prompt="p", sampling=sampling)


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


def test_a_request_on_a_stream_whose_channel_closes_is_generated_elsewhere():
    """WeightSync.readmit re-admits a lost server on a new channel and closes the old one: what the old stream
    still held must not vanish with it."""

    async def scenario():
        stuck = FakeRollout(silent_streams=1)
        async with pool_over(stuck, FakeRollout()) as (pool, (a1, _)):

            async def readmit():
                await until(lambda: "r0" in stuck.received, "r0 never reached its server")
                pool.mark_dead(a1, "lost for the test")
                await pool.admit(a1)

            steering = asyncio.create_task(readmit())
            got = {}

            async def collect():
                async for r in pool.generate([request("r0"), request("r1")]):  # r0 to the stuck server, r1 not
                    got[(r.request_id, r.sample_index)] = r.text

            await asyncio.wait_for(collect(), timeout=20)
            await steering
        return got, pool.events

    got, events = asyncio.run(scenario())
    assert sorted(got) == [("r0", 0), ("r0", 1), ("r1", 0), ("r1", 1)]
    assert [got[("r0", k)] for k in range(2)] == ["seed 7", "seed 8"]
    assert any(e.startswith("resubmitted r0") for e in events), events


def test_a_server_that_ends_its_stream_cleanly_gets_a_new_stream_for_the_next_request():
    async def scenario():
        servicer = FakeRollout(requests_per_stream=1)
        async with pool_over(servicer) as (pool, (address,)):
            first_done = asyncio.Event()
            got = []

            async def requests():
                yield request("r0")
                await first_done.wait()
                # the server answered r0 and ended that stream; once the pool's reader has seen the end, r1 comes
                await until(lambda: pool.servers[address].queue is None, "the pool kept a stream that had ended")
                yield request("r1")

            async def collect():
                async for r in pool.generate(requests()):
                    got.append((r.request_id, r.sample_index))
                    if len(got) == 2:
                        first_done.set()

            await asyncio.wait_for(collect(), timeout=20)
        return got, servicer.streams, pool.alive

    got, streams, alive = asyncio.run(scenario())
    assert sorted(got) == [("r0", 0), ("r0", 1), ("r1", 0), ("r1", 1)]
    assert streams == 2 and len(alive) == 1
