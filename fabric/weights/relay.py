"""Relay: a rollout server forwards each chunk of an update to the next server of a chain as it arrives, so the
sender's egress is one copy of the model whatever the number of servers. Each transport that can chain holds its
own relay (grpc_stream.GrpcRelay, tcp.TcpRelay); what they share is here. A hop that fails is reported for every
server past it (RELAY_LINK_CUT: resumable), never hangs the stream feeding it.
"""

from __future__ import annotations

import grpc

from fabric.errors import FabricError
from fabric.v1 import rollout_pb2

RELAY_QUEUE_CHUNKS = 8  # bounded: a slow next hop slows this stream down instead of filling memory
# A next hop that accepts TCP but never answers (a hung host) stalls this stream once the queue is full: give it up
# after this long instead of gRPC's default 20 s connection attempt. A live hop answers in milliseconds.
RELAY_CONNECT_TIMEOUT_MS = 5_000


def relay_channel_options() -> list:
    from fabric.channels import CHANNEL_OPTIONS

    return [*CHANNEL_OPTIONS, ("grpc.min_reconnect_backoff_ms", RELAY_CONNECT_TIMEOUT_MS)]


def relay_failures(header: rollout_pb2.UpdateWeightsHeader, message: str) -> list[rollout_pb2.WeightUpdateResult]:
    """What a cut relay link reports for every server past it: not committed, resumable."""
    return [
        rollout_pb2.WeightUpdateResult(
            server=target,
            weight_version=header.weight_version,
            error=FabricError(grpc.StatusCode.UNAVAILABLE, message, "RELAY_LINK_CUT").to_proto(),
        )
        for target in header.relay_targets
    ]


def next_header(header: rollout_pb2.UpdateWeightsHeader) -> rollout_pb2.UpdateWeightsHeader:
    nxt = rollout_pb2.UpdateWeightsHeader()
    nxt.CopyFrom(header)
    del nxt.relay_targets[:]
    nxt.relay_targets.extend(header.relay_targets[1:])
    return nxt
