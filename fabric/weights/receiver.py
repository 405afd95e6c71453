"""The receiving end of a weight update, inside a rollout server: the version store (fabric.weights.versions) and
the transports that feed it (fabric.weights.transports). RolloutServicer.UpdateWeights / GetWeightsStatus land here.

Offered paths, best first: the engine's own (a collective or IPC that its workers join, `engine.weight_transports`),
the raw-TCP data plane (off under TLS), and the gRPC stream (always).
"""

from __future__ import annotations

import asyncio
import logging

from fabric import security
from fabric.addresses import host_of
from fabric.errors import invalid
from fabric.v1 import rollout_pb2
from fabric.weights.transports.base import Receiver, UpdateReceiver
from fabric.weights.transports.grpc_stream import GrpcStreamReceiver
from fabric.weights.transports.tcp import TcpDataPlane
from fabric.weights.versions import VersionStore

log = logging.getLogger(__name__)


class WeightReceiver:
    def __init__(self, engine, server_name: str):
        self.engine = engine
        self.server_name = server_name
        self.store = VersionStore(engine, server_name)
        self.grpc = GrpcStreamReceiver()
        self.tcp: TcpDataPlane | None = None
        # Transports whose bytes arrive inside the engine (its workers join a collective, or map an IPC handle).
        extra = getattr(engine, "weight_transports", None)
        self.engine_transports: list[UpdateReceiver] = list(extra(self.store)) if extra is not None else []

    def _update_receivers(self) -> list[UpdateReceiver]:
        """The paths whose update runs inside an UpdateWeights call, best first."""
        config = security.current()
        return [*(t for t in self.engine_transports if config.offers_weight_path(t.name)), self.grpc]

    def _transports(self) -> list[Receiver]:
        if self.tcp is None and security.current().offers_weight_path("tcp"):  # the data plane has no encryption
            host = host_of(self.server_name)
            self.tcp = TcpDataPlane(self.store, host, asyncio.get_running_loop())
        *engine, grpc = self._update_receivers()
        return [*engine, *([self.tcp] if self.tcp else []), grpc]

    def status(self) -> rollout_pb2.GetWeightsStatusResponse:
        response = rollout_pb2.GetWeightsStatusResponse()
        self.store.fill_status(response)
        for transport in self._transports():
            offer = transport.offer()
            if offer is not None:
                response.transports.append(offer)
        response.tcp_data_port = self.tcp.port if self.tcp else 0
        return response

    async def update_weights(self, request_iterator, time_remaining: float | None) -> rollout_pb2.UpdateWeightsResponse:
        """The UpdateWeights stream: a header, then chunks (gRPC transport) or nothing (the bytes take the path
        the header names). Raises FabricError for a bad request; the serving version is untouched."""
        transports = {t.name: t for t in self._update_receivers()}
        first = await _next_or_none(request_iterator)
        if first is None or not first.HasField("header"):
            raise invalid(
                "header",
                "the first UpdateWeights message must carry the header (weight_version and manifest)",
                "MISSING_HEADER",
            )
        header = first.header
        name = header.transport or "grpc"
        transport = transports.get(name)
        if transport is None:
            offered = ", ".join(transports)
            raise invalid(
                "header.transport",
                f"{name!r} is not a path this server receives on through UpdateWeights (use one of {offered}; "
                "see GetWeightsStatus.transports)",
                "TRANSPORT_NOT_OFFERED",
            )
        staged = self.store.begin(header)
        if staged is None:  # idempotent: already serving
            return rollout_pb2.UpdateWeightsResponse(results=[self.store.already(header.weight_version)])
        try:
            return await transport.receive(self.store, header, staged, request_iterator, time_remaining)
        finally:
            self.store.release(staged)

    def close(self) -> None:
        """Stops the data plane and deletes every staging file."""
        transports: list[Receiver] = [*self.engine_transports, *([self.tcp] if self.tcp else [])]
        for transport in transports:
            transport.close()
        self.store.close()


async def _next_or_none(iterator):
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None
