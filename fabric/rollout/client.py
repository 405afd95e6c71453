"""An asyncio client of fabric.v1.RolloutService, as the trainer uses it.

```python
async with RolloutClient("127.0.0.1:50051") as client:
    async for response in client.generate([GenerateRequest(request_id="q1", prompt="Add 2 and 3.\n")]):
        ...  # one response per sample, in completion order
```
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

from fabric import security
from fabric.v1 import rollout_pb2, rollout_pb2_grpc

GenerateRequest = rollout_pb2.GenerateRequest
SamplingParams = rollout_pb2.SamplingParams


class RolloutClient:
    """One channel to one rollout server. `timeout` bounds each unary call (seconds); a Generate stream is bounded
    by `generate(..., timeout=)` only, since a stream lives as long as its requests."""

    def __init__(self, address: str, timeout: float | None = 30.0):
        self.address = address
        self.timeout = timeout
        self.channel = security.channel(address)  # TLS and token as the process's `security` section says
        self.stub = rollout_pb2_grpc.RolloutServiceStub(self.channel)

    async def generate(
        self,
        requests: Iterable[rollout_pb2.GenerateRequest] | AsyncIterable[rollout_pb2.GenerateRequest],
        timeout: float | None = None,
    ) -> AsyncIterator[rollout_pb2.GenerateResponse]:
        """Sends the requests over one stream (an async iterable may keep adding them) and yields every response
        as it arrives. Leaving the loop early cancels the stream, which aborts its requests on the server."""
        call = self.stub.Generate(_as_async_iter(requests), timeout=timeout)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def generate_batch(
        self, requests: Sequence[rollout_pb2.GenerateRequest], timeout: float | None = None, per_message: int = 512
    ) -> AsyncIterator[rollout_pb2.GenerateResponse]:
        """As `generate`, over GenerateBatch: the requests go `per_message` to a message and the samples finished
        together come back in one; what a round of hundreds of prompts should use (the trainer's pool does)."""
        batches = [
            rollout_pb2.GenerateBatchRequest(requests=requests[i : i + per_message])
            for i in range(0, len(requests), per_message)
        ]
        call = self.stub.GenerateBatch(_as_async_iter(batches), timeout=timeout)
        try:
            async for batch in call:
                for response in batch.responses:
                    yield response
        finally:
            call.cancel()

    async def info(self) -> rollout_pb2.RolloutServiceGetServerInfoResponse:
        return await self.stub.GetServerInfo(rollout_pb2.RolloutServiceGetServerInfoRequest(), timeout=self.timeout)

    async def abort(self, request_ids: Sequence[str]) -> list[str]:
        """Aborts requests by id on any stream; returns the ids that were live."""
        response = await self.stub.Abort(rollout_pb2.AbortRequest(request_ids=list(request_ids)), timeout=self.timeout)
        return list(response.aborted_request_ids)

    async def sleep(self, level: int = 0) -> rollout_pb2.SleepResponse:
        """Level 1 or 2; 0 takes the server's sleep_level."""
        return await self.stub.Sleep(rollout_pb2.SleepRequest(level=level), timeout=self.timeout)

    async def wake_up(self, tags: Sequence[str] = ()) -> rollout_pb2.WakeUpResponse:
        """Tags ["weights"], then ["kv_cache"]; empty wakes everything."""
        return await self.stub.WakeUp(rollout_pb2.WakeUpRequest(tags=list(tags)), timeout=self.timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> RolloutClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _as_async_iter(items):
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
