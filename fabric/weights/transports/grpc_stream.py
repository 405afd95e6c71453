"""The gRPC transport: chunks travel on the UpdateWeights stream itself. Always offered (also under TLS, where the
raw-TCP data plane is off); slower than the data plane (a Python gRPC stream moves about a third of a socket)."""

from __future__ import annotations

import asyncio
import time

import grpc

from fabric import security
from fabric.errors import FabricError, invalid
from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from fabric.weights.relay import RELAY_QUEUE_CHUNKS, next_header, relay_channel_options, relay_failures
from fabric.weights.transports import SendJob
from fabric.weights.versions import StagedVersion, VersionStore

NAME = "grpc"
RELAYS = True  # a receiver forwards each chunk down the chain as it lands (GrpcRelay)


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

    async with job.channel() as channel:
        response = await rollout_pb2_grpc.RolloutServiceStub(channel).UpdateWeights(requests(), timeout=job.timeout)
    return list(response.results)


class GrpcRelay:
    """Forwards the chunks of one gRPC stream to the next server of the chain as they arrive."""

    def __init__(self, header: rollout_pb2.UpdateWeightsHeader, timeout: float | None = None):
        self.header = header
        self.target = header.relay_targets[0]
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=RELAY_QUEUE_CHUNKS)
        self.channel = security.channel(self.target, options=relay_channel_options())
        stub = rollout_pb2_grpc.RolloutServiceStub(self.channel)
        self.error: str | None = None
        self.ended = False
        self.call = stub.UpdateWeights(self._requests(), timeout=timeout)
        self.task = asyncio.ensure_future(self._run())

    async def _requests(self):
        yield rollout_pb2.UpdateWeightsRequest(header=next_header(self.header))
        while (item := await self.queue.get()) is not None:
            yield item

    async def _run(self):
        try:
            return await self.call
        except grpc.aio.AioRpcError as err:
            self.error = f"relay link to {self.target} failed: {err.code().name}: {err.details()}"
            return None
        finally:
            # The link is over. A put() may be waiting on the full queue (the hop died, or never connected, while
            # this server received faster than it could forward): empty the queue so that put() returns, or this
            # server's own stream would stall until the sender's deadline.
            while not self.queue.empty():
                self.queue.get_nowait()

    async def put(self, request) -> None:
        if self.error is None and not self.task.done():
            await self.queue.put(request)

    def cancel(self) -> None:
        self.call.cancel()

    async def end(self) -> None:
        if not self.task.done() and not self.ended:
            self.ended = True
            await self.queue.put(None)

    async def close(self) -> list[rollout_pb2.WeightUpdateResult]:
        await self.end()
        response = await self.task
        await self.channel.close()
        if response is None:
            return relay_failures(self.header, self.error or f"relay link to {self.target} failed")
        return list(response.results)
