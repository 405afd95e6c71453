"""Issue 21: a token holder that sends Generate requests and never reads must not grow the server without bound.
A real RolloutService over the fake engine; the client writes thousands of requests and reads nothing for a while:
the stream's unsent responses stay bounded (the server stops reading its requests), and once it reads, every sample
arrives (nothing lost)."""

from __future__ import annotations

import asyncio

from fabric.rollout import scheduler
from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from tests.rollout.fake_engine import FakeEngine
from tests.rollout.test_servicer import fake_server

REQUESTS = 1500


def test_a_client_that_does_not_read_is_held_back_and_loses_nothing():
    async def go():
        async with fake_server(FakeEngine(token_seconds=0), max_queue_length=100000) as (client, servicer, _engine):
            stub = rollout_pb2_grpc.RolloutServiceStub(client.channel)

            async def requests():
                for i in range(REQUESTS):
                    yield rollout_pb2.GenerateRequest(
                        request_id=str(i), prompt="ab", sampling=rollout_pb2.SamplingParams(max_new_tokens=512)
                    )

            call = stub.Generate(requests(), timeout=300)
            peak = 0
            for _ in range(40):  # 4 s without reading
                await asyncio.sleep(0.1)
                peak = max([peak, *(s.out.qsize() for s in servicer.scheduler.streams)])
            got = [r async for r in call]
            return peak, got

    peak, got = asyncio.run(go())
    assert peak <= scheduler.MAX_UNSENT_RESPONSES + 64, peak
    assert len(got) == REQUESTS and all(not r.HasField("error") for r in got)
    assert sorted(int(r.request_id) for r in got) == list(range(REQUESTS))
