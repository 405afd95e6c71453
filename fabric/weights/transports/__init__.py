"""Weight transports: the paths the bulk bytes of an update can take from a sender to a rollout server.

gRPC stays the control plane whatever the path (header, version, commit, results, resume); a transport only moves
bytes. Each transport is one module holding both ends, typed by the Protocols of fabric.weights.transports.base:
the receiving end a `Receiver` / `UpdateReceiver` object the rollout server owns, the sending end the module
itself, a `StreamSender` (one stream per target, `send(job)`) or a `GroupSender` (one collective for all,
`send_group(...)`).

Adding one: a module here, a line in SENDERS (and in GROUP_PATHS for a collective, in PREFERENCE if `auto` may pick
it), and its receiver in fabric.weights.receiver (or an engine's `weight_transports()` when the engine's workers
must join, as for a collective). docs/architecture.md has the walk-through.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import grpc

from fabric.v1 import rollout_pb2
from fabric.weights.channels import ChannelCache, open_channel
from fabric.weights.digest import source_digests

if TYPE_CHECKING:
    from fabric.weights.sender import PushReport, WeightSource
    from fabric.weights.transports.base import GroupSender, StreamSender

# name -> the module of its sending end (base.StreamSender, or base.GroupSender for the names in GROUP_PATHS)
SENDERS: dict[str, str] = {
    "grpc": "fabric.weights.transports.grpc_stream",
    "tcp": "fabric.weights.transports.tcp",
    # GPU paths and the CPU collective (fabric.weights.transports.collective, ipc); `auto` never picks gloo
    "gloo": "fabric.weights.transports.gloo",
    "nccl": "fabric.weights.transports.nccl",
    "ipc": "fabric.weights.transports.ipc",
}
# What `auto` picks, best first, among the paths both ends can use.
PREFERENCE: tuple[str, ...] = ("ipc", "nccl", "tcp", "grpc")
GROUP_PATHS = frozenset({"gloo", "nccl"})  # one collective for all targets; the others a stream per target
CHOICES = ("auto", *SENDERS)


def stream_sender(name: str) -> StreamSender:
    return cast("StreamSender", importlib.import_module(SENDERS[name]))


def group_sender(name: str) -> GroupSender:
    return cast("GroupSender", importlib.import_module(SENDERS[name]))


def sender(name: str) -> StreamSender | GroupSender:
    return group_sender(name) if name in GROUP_PATHS else stream_sender(name)


def offers_of(status: rollout_pb2.GetWeightsStatusResponse) -> dict[str, rollout_pb2.WeightTransportOffer]:
    """A server's offers by name (a server from before negotiation: its TCP port and gRPC)."""
    if status.transports:
        return {offer.name: offer for offer in status.transports}
    offers = {"grpc": rollout_pb2.WeightTransportOffer(name="grpc")}
    if status.tcp_data_port:
        offers["tcp"] = rollout_pb2.WeightTransportOffer(name="tcp", port=status.tcp_data_port)
    return offers


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str


def choose(requested: str, status: rollout_pb2.GetWeightsStatusResponse, source) -> Choice:
    """The path for one server: the requested one when the server offers it and this sender can use it, else the
    best of PREFERENCE that both can use; the reason says which and why."""
    offers = offers_of(status)
    offered = ", ".join(offers)

    def why_not(name: str) -> str | None:
        if name not in offers:
            return f"the server does not offer {name} (offers {offered})"
        if name not in SENDERS:
            return f"this sender has no {name} transport"
        return sender(name).unusable(offers[name], source)

    if requested != "auto":
        refusal = why_not(requested)
        if refusal is None:
            return Choice(requested, f"requested {requested}")
    for name in PREFERENCE:
        if why_not(name) is None:
            if requested == "auto":
                return Choice(name, f"auto: the best path both ends can use (server offers {offered})")
            return Choice(name, f"requested {requested} but {refusal}: fell back to {name}")
    return Choice("grpc", f"no better path: server offers {offered}")


@dataclass
class SendJob:
    """One stream of one update: to `target`, which relays to `relay_targets`."""

    source: WeightSource
    version: int
    target: str
    relay_targets: list[str]
    chunks: list[int] | None  # None: all of them
    offer: rollout_pb2.WeightTransportOffer
    timeout: float
    report: PushReport  # bytes_sent is added to
    channels: ChannelCache | None = None  # the pusher's kept control channels, if it keeps them

    def channel(self) -> contextlib.AbstractAsyncContextManager[grpc.aio.Channel]:
        """The control channel to the target: the kept one, or one for this stream only."""
        return open_channel(self.target, self.channels)

    def header(self, transport: str) -> rollout_pb2.UpdateWeightsHeader:
        return rollout_pb2.UpdateWeightsHeader(
            weight_version=self.version,
            manifest=self.source.manifest,
            relay_targets=self.relay_targets,
            chunk_indices=self.chunks or [],
            transport=transport,
            # ipc lands in the engine's memory, not the staging file: it checks its own (issue 21, the lead's)
            tensor_digests=[] if transport == "ipc" else source_digests(self.source),
        )

    @property
    def indices(self) -> list[int]:
        return self.chunks if self.chunks is not None else list(range(len(self.source.manifest.chunks)))
