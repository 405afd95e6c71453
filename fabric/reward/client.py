"""RewardClient: the caller's side of fabric.v1.RewardService (the trainer uses it).

    async with RewardClient("127.0.0.1:50051") as client:
        responses = await client.score([{"prompt": p, "response": r, "ground_truth": gt, "reward_name": "math"}])
        scores = [r.score for r in responses]

`score` sends all items on one Score stream and returns the ScoreResponses in input order. By default an item that
came back with an error raises RewardItemError (naming every failed item); `raise_on_error=False` returns them all
and leaves `response.HasField("error")` to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

from fabric import security
from fabric.v1 import reward_pb2, reward_pb2_grpc

ITEM_FIELDS = ("request_id", "prompt", "response", "ground_truth", "reward_name", "response_token_ids")


class RewardItemError(RuntimeError):
    """Some items were not scored; `failed` holds their ScoreResponses (each with .error), `responses` all of them."""

    def __init__(self, failed: list[reward_pb2.ScoreResponse], responses: list[reward_pb2.ScoreResponse]):
        first = failed[0]
        super().__init__(
            f"{len(failed)} of {len(responses)} items not scored; first: request_id "
            f"{first.request_id!r}: {first.error.message}"
        )
        self.failed = failed
        self.responses = responses


class RewardClient:
    def __init__(self, address: str, timeout: float | None = 300.0):
        self.address = address
        self.timeout = timeout  # seconds for a whole score() call
        self.channel = security.channel(address)  # TLS and token as the process's `security` section says
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)

    async def __aenter__(self) -> RewardClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def score(self, items: Sequence[dict], raise_on_error: bool = True) -> list[reward_pb2.ScoreResponse]:
        """Items are dicts of ScoreRequest fields; a missing request_id becomes the item's index."""
        requests = []
        for index, item in enumerate(items):
            unknown = set(item) - set(ITEM_FIELDS)
            if unknown:
                raise ValueError(f"item {index}: unknown keys {sorted(unknown)}; allowed: {', '.join(ITEM_FIELDS)}")
            requests.append(reward_pb2.ScoreRequest(**{"request_id": str(index), **item}))
        order: dict[str, int] = {}
        for index, req in enumerate(requests):
            if req.request_id in order:
                raise ValueError(f"item {index}: request_id {req.request_id!r} repeats item {order[req.request_id]}")
            order[req.request_id] = index

        responses: list[reward_pb2.ScoreResponse | None] = [None] * len(requests)
        call = self.stub.Score(iter(requests), timeout=self.timeout)
        async for response in call:
            responses[order[response.request_id]] = response
        missing = [r.request_id for r, got in zip(requests, responses, strict=True) if got is None]
        if missing:
            raise RuntimeError(f"reward server {self.address} closed the stream without answering {missing[:5]}")
        answered = [r for r in responses if r is not None]  # all of them: none is missing
        failed = [r for r in answered if r.HasField("error")]
        if failed and raise_on_error:
            raise RewardItemError(failed, answered)
        return answered

    async def info(self) -> reward_pb2.RewardServiceGetServerInfoResponse:
        return await self.stub.GetServerInfo(reward_pb2.RewardServiceGetServerInfoRequest(), timeout=30)
