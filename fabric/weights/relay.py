"""Relay: a rollout server forwards each chunk of an update to the next server of a chain as it arrives, so the
sender's egress is one copy of the model whatever the number of servers. One relay per transport that can chain:
the gRPC stream (GrpcRelay) and the raw-TCP data plane (TcpRelay, from the same memory the chunk was received into).
A hop that fails is reported for every server past it (RELAY_LINK_CUT: resumable), never hangs the stream feeding it.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import threading

import grpc

from fabric import security
from fabric.addresses import host_of
from fabric.errors import FabricError
from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from fabric.weights.transports import tcp as framing

RELAY_QUEUE_CHUNKS = 8  # bounded: a slow next hop slows this stream down instead of filling memory
# A next hop that accepts TCP but never answers (a hung host) stalls this stream once the queue is full: give it up
# after this long instead of gRPC's default 20 s connection attempt. A live hop answers in milliseconds.
RELAY_CONNECT_TIMEOUT_MS = 5_000


def _relay_channel_options() -> list:
    from fabric.channels import CHANNEL_OPTIONS

    return [*CHANNEL_OPTIONS, ("grpc.min_reconnect_backoff_ms", RELAY_CONNECT_TIMEOUT_MS)]


def _relay_failures(header: rollout_pb2.UpdateWeightsHeader, message: str) -> list[rollout_pb2.WeightUpdateResult]:
    """What a cut relay link reports for every server past it: not committed, resumable."""
    return [
        rollout_pb2.WeightUpdateResult(
            server=target,
            weight_version=header.weight_version,
            error=FabricError(grpc.StatusCode.UNAVAILABLE, message, "RELAY_LINK_CUT").to_proto(),
        )
        for target in header.relay_targets
    ]


def _next_header(header: rollout_pb2.UpdateWeightsHeader) -> rollout_pb2.UpdateWeightsHeader:
    nxt = rollout_pb2.UpdateWeightsHeader()
    nxt.CopyFrom(header)
    del nxt.relay_targets[:]
    nxt.relay_targets.extend(header.relay_targets[1:])
    return nxt


class GrpcRelay:
    """Forwards the chunks of one gRPC stream to the next server of the chain as they arrive."""

    def __init__(self, header: rollout_pb2.UpdateWeightsHeader, timeout: float | None = None):
        self.header = header
        self.target = header.relay_targets[0]
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=RELAY_QUEUE_CHUNKS)
        self.channel = security.channel(self.target, options=_relay_channel_options())
        stub = rollout_pb2_grpc.RolloutServiceStub(self.channel)
        self.error: str | None = None
        self.ended = False
        self.call = stub.UpdateWeights(self._requests(), timeout=timeout)
        self.task = asyncio.ensure_future(self._run())

    async def _requests(self):
        yield rollout_pb2.UpdateWeightsRequest(header=_next_header(self.header))
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
            return _relay_failures(self.header, self.error or f"relay link to {self.target} failed")
        return list(response.results)


class TcpRelay:
    """Forwards the frames of one TCP update to the next server's data plane, from the same memory, in a thread of
    its own: this server keeps receiving while the previous chunk goes out, so a chain runs at link speed."""

    def __init__(self, header: rollout_pb2.UpdateWeightsHeader, token: str):
        self.header = header
        self.target = header.relay_targets[0]
        self.error: str | None = None
        self.sock: socket.socket | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=RELAY_QUEUE_CHUNKS)
        self.sender: threading.Thread | None = None
        try:
            port = _tcp_port_of(self.target)
            host = host_of(self.target)
            self.sock = socket.create_connection((host, port), timeout=30)
            framing.tune(self.sock)
            self.sock.sendall(framing.MAGIC)
            framing.send_frame(self.sock, token.encode())
            framing.send_frame(
                self.sock, rollout_pb2.UpdateWeightsRequest(header=_next_header(header)).SerializeToString()
            )
        except (OSError, grpc.RpcError, ConnectionError) as exc:
            self.error = f"relay link to {self.target} failed: {exc}"
            return
        self.sender = threading.Thread(target=self._send_loop, name="weights-relay", daemon=True)
        self.sender.start()

    def _send_loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error or self.sock is None:
                continue  # keep draining so the receiving side never blocks on a dead link
            frame, view = item
            try:
                framing.send_frame(self.sock, frame)
                self.sock.sendall(view)
            except OSError as exc:
                self.error = f"relay link to {self.target} cut mid-stream: {exc}"

    def forward(self, frame: bytes, view: memoryview) -> None:
        if self.sender is not None and not self.error:
            self.queue.put((frame, view))

    def finish_sending(self) -> None:
        """Waits until every chunk went out, then ends the downstream stream (before this server's own commit, so
        the servers of a chain commit together and the staging memory is still there while it is sent)."""
        if self.sender is None:
            return
        self.queue.put(None)
        self.sender.join()
        self.sender = None
        if self.sock is not None and not self.error:
            try:
                framing.send_frame(self.sock, b"")
            except OSError as exc:
                self.error = f"relay link to {self.target} failed: {exc}"

    def abort(self) -> None:
        if self.sender is not None:
            self.error = self.error or "aborted"
            self.queue.put(None)
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> list[rollout_pb2.WeightUpdateResult]:
        """The downstream servers' results (or their failure, resumable) once they have committed."""
        self.finish_sending()
        if self.sock is not None and not self.error:
            try:
                self.sock.settimeout(600)
                response = rollout_pb2.UpdateWeightsResponse.FromString(framing.recv_frame(self.sock))
                self.abort()
                return list(response.results)
            except (OSError, ConnectionError) as exc:
                self.error = f"relay link to {self.target} failed: {exc}"
        self.abort()
        return _relay_failures(self.header, self.error or f"relay link to {self.target} failed")


def _tcp_port_of(target: str) -> int:
    with security.sync_channel(target, options=_relay_channel_options()) as channel:
        status = rollout_pb2_grpc.RolloutServiceStub(channel).GetWeightsStatus(
            rollout_pb2.GetWeightsStatusRequest(), timeout=10
        )
    if not status.tcp_data_port:
        raise ConnectionError(f"{target} has no TCP data plane")
    return status.tcp_data_port
