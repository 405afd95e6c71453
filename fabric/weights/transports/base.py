"""The two ends of a weight transport, as typed Protocols (the shape of vLLM's
`distributed/weight_transfer/base.py`: an engine class per end, an update-info type per path, a factory by name).

Receiving end (an object a rollout server owns):
    Receiver        `name`, `offer()` (advertised in GetWeightsStatus.transports; None while it cannot receive),
                    `close()`; its bytes arrive on its own listener (the raw-TCP data plane)
    UpdateReceiver  a Receiver whose update runs inside the UpdateWeights call: `receive(...)` (gRPC chunks, a
                    collective, an IPC handle)

Sending end (a module in this package, registered by name in fabric.weights.transports.SENDERS):
    StreamSender    `NAME`, `RELAYS`, `unusable(offer, source)`, `send(job)`: one stream per target, which may
                    relay down a chain of servers when RELAYS
    GroupSender     `NAME`, `unusable(offer, source)`, `send_group(...)`: one collective for all targets

The modules satisfy these Protocols statically (mypy checks it below); which one a name is comes from the registry
(fabric.weights.transports.GROUP_PATHS), never from the shape of the object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fabric.v1 import rollout_pb2
    from fabric.weights.sender import PushReport, WeightSource
    from fabric.weights.transports import SendJob
    from fabric.weights.versions import StagedVersion, VersionStore

    Result = rollout_pb2.WeightUpdateResult
    Offer = rollout_pb2.WeightTransportOffer
    Targets = list[tuple[str, rollout_pb2.GetWeightsStatusResponse]]


class Receiver(Protocol):
    name: str

    def offer(self) -> Offer | None: ...

    def close(self) -> None: ...


class UpdateReceiver(Receiver, Protocol):
    async def receive(
        self, store: VersionStore, header, staged: StagedVersion, request_iterator, time_remaining: float | None
    ) -> rollout_pb2.UpdateWeightsResponse:
        """Feeds the version store (begin / accept or mark / finish) from the path's bytes; raises FabricError for a
        bad request (the serving version stays)."""
        ...


class StreamSender(Protocol):
    NAME: str
    RELAYS: bool  # its receivers forward each chunk to the next server of a chain

    def unusable(self, offer: Offer, source: WeightSource) -> str | None:
        """Why this sender cannot use a server's offer (None: it can)."""
        ...

    async def send(self, job: SendJob) -> list[Result]: ...


class GroupSender(Protocol):
    NAME: str

    def unusable(self, offer: Offer, source: WeightSource) -> str | None: ...

    async def send_group(
        self, source: WeightSource, version: int, targets: Targets, timeout: float, report: PushReport
    ) -> list[Result]: ...


if TYPE_CHECKING:  # each sender module satisfies its Protocol; mypy fails here when one drifts
    from fabric.weights.transports import gloo, grpc_stream, ipc, nccl, tcp

    _streams: list[StreamSender] = [grpc_stream, tcp, ipc]
    _groups: list[GroupSender] = [gloo, nccl]
