"""Issue 21: health needs no token, so it must not be able to take the call slots of those who hold one. A real
RolloutService (fake engine) with `security.token`; a stranger opens more Health.Watch streams than the server has
call slots; a token holder's call must still be served."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fabric.channels import MAX_CONCURRENT_RPCS
from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from tests.rollout.test_servicer import fake_server


def test_unauthenticated_health_watches_cannot_lock_token_holders_out(token):
    async def go():
        async with fake_server() as (client, _, _engine):
            stranger = grpc.aio.insecure_channel(client.address)  # no token
            health = health_pb2_grpc.HealthStub(stranger)
            watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(MAX_CONCURRENT_RPCS + 16)]
            firsts = await asyncio.gather(*(w.read() for w in watches), return_exceptions=True)
            served = sum(1 for f in firsts if isinstance(f, health_pb2.HealthCheckResponse))
            refused = [f for f in firsts if isinstance(f, grpc.aio.AioRpcError)]
            info = await rollout_pb2_grpc.RolloutServiceStub(client.channel).GetServerInfo(
                rollout_pb2.RolloutServiceGetServerInfoRequest(), timeout=10
            )
            for w in watches:
                w.cancel()
            await stranger.close()
            return served, refused, info

    served, refused, info = asyncio.run(go())
    assert info.model  # the token holder is served
    # Health's own budget refuses the extra watches; a stream the HTTP/2 transport itself cut answers CANCELLED
    codes = {e.code() for e in refused}
    assert served >= 1 and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert codes <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
