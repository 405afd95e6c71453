"""A request with a seed resubmitted after its server died: each missing sample keeps the seed it had (seed + its
index), so it is the sample it would have been and never a copy of another sample of its group. Two fake rollout
servers in-process (grpc.aio), one of which dies after its first sample."""

from __future__ import annotations

import asyncio

import grpc

from fabric.routing import RolloutPool
from fabric.v1 import rollout_pb2, rollout_pb2_grpc


class FakeRollout(rollout_pb2_grpc.RolloutServiceServicer):
    """Seeds sample k of a request with seed + k, as the vLLM engine does, and says which seed it used."""

    def __init__(self, die_after: int | None = None):
        self.die_after = die_after
        self.sent = 0

    async def GenerateBatch(self, request_iterator, context):  # the pool's RPC
        async for batch in request_iterator:
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


async def start(servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_resubmitted_samples_keep_their_seeds():
    async def scenario():
        dying, healthy = FakeRollout(die_after=1), FakeRollout()
        (s1, a1), (s2, a2) = await start(dying), await start(healthy)
        pool = RolloutPool([a1, a2], channel_factory=grpc.aio.insecure_channel, stream_timeout=30)
        try:
            sampling = rollout_pb2.SamplingParams(num_return_sequences=4, seed=100)
            # the first request goes to the dying server (least loaded, first), the second to the healthy one
            requests = [rollout_pb2.GenerateRequest(request_id=f"r{k}", prompt="p", sampling=sampling) for k in (0, 1)]
            got = {(r.request_id, r.sample_index): r.text async for r in pool.generate(requests)}
        finally:
            await pool.close()
            await s1.stop(None)
            await s2.stop(None)
        return got, pool.events

    got, events = asyncio.run(scenario())
    assert any(e.startswith("resubmitted r0 (3 samples)") for e in events), events
    for request_id in ("r0", "r1"):
        assert [got[(request_id, k)] for k in range(4)] == [f"seed {100 + k}" for k in range(4)]
