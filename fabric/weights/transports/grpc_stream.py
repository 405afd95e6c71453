"""The gRPC transport: chunks travel on the UpdateWeights stream itself. Always offered (also under TLS, where the
raw-TCP data plane is off); slower than the data plane (a Python gRPC stream moves about a third of a socket)."""

from __future__ import annotations

import asyncio
import time

from fabric import security
from fabric.errors import FabricError, invalid
from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from fabric.weights.relay import GrpcRelay
from fabric.weights.transports import SendJob
from fabric.weights.versions import StagedVersion, VersionStore

NAME = "grpc"


class GrpcStreamReceiver:
    name = NAME

    def offer(self) -> rollout_pb2.WeightTransportOffer:
        return rollout_pb2.WeightTransportOffer(name=NAME)

    def close(self) -> None:
        pass

    async def receive(
        self, store: VersionStore, header, staged: StagedVersion, request_iterator, time_remaining: float | None
    ) -> rollout_pb2.UpdateWeightsResponse:
        """Stages the chunks that follow the header; raises FabricError for a bad one (the version is dropped)."""
        started = time.perf_counter()
        # The next hop inherits this call's deadline, so a stuck hop cannot outlive the sender's patience.
        relay = GrpcRelay(header, time_remaining) if header.relay_targets else None
        try:
            async for request in request_iterator:
                if not request.HasField("chunk"):
                    raise invalid("chunk", "every message after the header must carry a chunk", "MISSING_CHUNK")
                store.accept(staged, request.chunk, request.chunk.data)
                if relay is not None:
                    await relay.put(request)
        except FabricError as err:
            store.fail(staged, err)
            if relay is not None:
                relay.cancel()
            raise
        except asyncio.CancelledError:
            # The sender went away mid-stream: keep what arrived (resumable), stop the relay too.
            if relay is not None:
                relay.cancel()
            raise
        if relay is not None:
            await relay.end()  # the next server finishes while this one commits: a chain commits together
        results = [await store.finish(staged, started, wait_for_others=bool(header.chunk_indices))]
        if relay is not None:
            results.extend(await relay.close())
        return rollout_pb2.UpdateWeightsResponse(results=results)


def unusable(offer, source) -> str | None:
    return None


async def send(job: SendJob) -> list[rollout_pb2.WeightUpdateResult]:
    source = job.source

    async def requests():
        yield rollout_pb2.UpdateWeightsRequest(header=job.header(NAME))
        for i, view in source.host_chunks(job.indices):
            chunk = source.chunk_meta(i)
            chunk.data = view.tobytes()
            job.report.bytes_sent += len(chunk.data)
            yield rollout_pb2.UpdateWeightsRequest(chunk=chunk)

    async with security.channel(job.target) as channel:
        response = await rollout_pb2_grpc.RolloutServiceStub(channel).UpdateWeights(requests(), timeout=job.timeout)
    return list(response.results)
