"""The raw-TCP transport (the data plane): the same messages as the UpdateWeights stream, fewer copies.

A Python gRPC stream moves about a third of what a raw socket does, so the bulk bytes may travel on a plain TCP
connection that the receiver advertises (GetWeightsStatus.transports, and tcp_data_port). Off under TLS: the data
plane has no encryption. Framing:

    client: MAGIC, frame(auth token), frame(UpdateWeightsRequest with header),
            then per chunk: frame(WeightChunk without data) + the chunk's raw bytes, and frame(b"") to end
    server: frame(UpdateWeightsResponse)

frame(x) is a 4-byte little-endian length then x. The receiver reads chunk bytes straight into its staging buffer
(recv_into), checks the crc32c and forwards the same memory to the next server of a relay chain.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import queue
import socket
import struct
import threading
import time

import grpc
from google.protobuf.message import DecodeError

from fabric import security
from fabric.addresses import host_of
from fabric.errors import FabricError, invalid
from fabric.v1 import rollout_pb2, rollout_pb2_grpc, weights_pb2
from fabric.weights.relay import RELAY_QUEUE_CHUNKS, next_header, relay_channel_options, relay_failures
from fabric.weights.transports import SendJob

log = logging.getLogger(__name__)

NAME = "tcp"
RELAYS = True  # a receiver forwards each chunk down the chain as it lands (TcpRelay)

MAGIC = b"FWT1"
_LEN = struct.Struct("<I")
MAX_FRAME = 64 * 1024 * 1024
# Before the token is checked a connection holds at most this much, this long, and only so many connections exist.
MAX_TOKEN_BYTES = 4096
HEADER_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 32
DATA_TIMEOUT_S = 300.0  # after the token: the longest silence between two reads of an update in flight


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LEN.pack(len(payload)) + payload if len(payload) < 65536 else _LEN.pack(len(payload)))
    if len(payload) >= 65536:
        sock.sendall(payload)


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ConnectionError("peer closed the weight data connection mid-frame")
        got += r


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_exact_into(sock, memoryview(buf))
    return bytes(buf)


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME) -> bytes:
    (n,) = _LEN.unpack(recv_exact(sock, 4))
    if n > limit:
        raise FrameTooLarge(f"frame of {n} bytes exceeds the {limit} limit")
    return recv_exact(sock, n)


class FrameTooLarge(ConnectionError):
    pass


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 8 * 1024 * 1024)
        except OSError:
            pass


# ---- receiver: a listener thread, one thread per update; state changes and the commit run on the event loop ----


class TcpDataPlane:
    name = NAME

    def __init__(self, store, host: str, loop: asyncio.AbstractEventLoop):
        self.store = store
        self.loop = loop
        self.token = security.current().token
        self.listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        threading.Thread(target=self._accept_loop, name="weights-tcp", daemon=True).start()

    def offer(self) -> rollout_pb2.WeightTransportOffer:
        return rollout_pb2.WeightTransportOffer(name=NAME, port=self.port)

    def close(self) -> None:
        self.listener.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self.slots.acquire(blocking=False):  # every slot taken: refuse at once, hold nothing
                log.warning("weight data plane: %d connections open, refusing one more", MAX_CONNECTIONS)
                conn.close()
                continue
            threading.Thread(target=self._serve_slot, args=(conn,), name="weights-tcp-conn", daemon=True).start()

    def _serve_slot(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        finally:
            self.slots.release()

    def _call(self, make_coro):
        return asyncio.run_coroutine_threadsafe(make_coro(), self.loop).result()

    def _serve(self, conn: socket.socket) -> None:
        tune(conn)
        started = time.perf_counter()
        staged = relay = None
        try:
            with conn:
                conn.settimeout(HEADER_TIMEOUT_S)  # before the token: a silent peer is dropped soon
                if recv_exact(conn, 4) != MAGIC:
                    return
                try:
                    given = recv_frame(conn, MAX_TOKEN_BYTES)
                except FrameTooLarge as exc:
                    given = None
                    log.warning("weight data plane: %s (token frame)", exc)
                if given is None or (self.token and not hmac.compare_digest(given, self.token.encode())):
                    self._reply(conn, 0, FabricError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token"))
                    return
                token = given.decode("utf-8", "replace")
                conn.settimeout(DATA_TIMEOUT_S)
                request = rollout_pb2.UpdateWeightsRequest()
                header = request.header
                try:
                    try:
                        request.ParseFromString(recv_frame(conn))
                    except DecodeError:
                        message = "the header frame is not an UpdateWeightsRequest"
                        raise invalid("header", message, "BAD_FRAME") from None
                    header = request.header
                    if not request.HasField("header"):
                        raise invalid("header", "the first frame must carry the header", "MISSING_HEADER")
                    staged = self._call(lambda: _begin(self.store, header))
                except FabricError as err:
                    self._reply(conn, header.weight_version, err)
                    return
                if staged is None:
                    response = rollout_pb2.UpdateWeightsResponse(results=[self.store.already(header.weight_version)])
                    send_frame(conn, response.SerializeToString())
                    return
                if header.relay_targets:
                    relay = TcpRelay(header, token)
                result = self._receive_chunks(conn, staged, relay, started, bool(header.chunk_indices))
                results = [result] + (relay.close() if relay else [])
                send_frame(conn, rollout_pb2.UpdateWeightsResponse(results=results).SerializeToString())
        except (ConnectionError, OSError) as exc:
            log.warning("weight data connection broke: %s (the partial version stays staged)", exc)
            if relay is not None:
                relay.abort()
        finally:
            self.store.release(staged)

    def _receive_chunks(self, conn, staged, relay, started, wait_for_others):
        store = self.store
        chunks = staged.manifest.chunks
        while True:
            frame = recv_frame(conn)
            if not frame:
                break
            chunk = weights_pb2.WeightChunk.FromString(frame)
            try:
                length = chunks[chunk.chunk_index].length if 0 <= chunk.chunk_index < len(chunks) else -1
                spec = store.chunk_spec(staged, chunk, length)
                view = staged.buffer.read(spec.tensor_index, spec.offset, spec.length)
                recv_exact_into(conn, view)  # straight into the staging file
                store.verify(staged, chunk, view)
            except FabricError as err:
                store.fail(staged, err)
                if relay is not None:
                    relay.abort()
                self._reply(conn, staged.version, err)
                raise ConnectionError("update refused") from None
            store.mark(staged, chunk.chunk_index, spec.length)
            if relay is not None:
                relay.forward(frame, view)
        if relay is not None:
            relay.finish_sending()
        return self._call(lambda: store.finish(staged, started, wait_for_others))

    def _reply(self, conn, version: int, err: FabricError) -> None:
        result = rollout_pb2.WeightUpdateResult(
            server=self.store.server_name, weight_version=version, error=err.to_proto()
        )
        try:
            send_frame(conn, rollout_pb2.UpdateWeightsResponse(results=[result]).SerializeToString())
        except OSError:
            pass


async def _begin(store, header):
    return store.begin(header)


# ---- sender ----------------------------------------------------------------------------------------------------


def unusable(offer, source) -> str | None:
    return None if offer.port else "the server's data plane has no port"


async def send(job: SendJob) -> list[rollout_pb2.WeightUpdateResult]:
    return await asyncio.to_thread(_send, job)


def _send(job: SendJob) -> list[rollout_pb2.WeightUpdateResult]:
    source, report = job.source, job.report
    host = host_of(job.target)
    with socket.create_connection((host, job.offer.port), timeout=job.timeout) as sock:
        tune(sock)
        sock.sendall(MAGIC)
        send_frame(sock, (security.current().token or "").encode())
        try:
            send_frame(sock, rollout_pb2.UpdateWeightsRequest(header=job.header(NAME)).SerializeToString())
            for i, view in source.host_chunks(job.indices):
                send_frame(sock, source.chunk_meta(i).SerializeToString())
                sock.sendall(view)
                report.bytes_sent += len(view)
            send_frame(sock, b"")
        except OSError:
            pass  # the server refused mid-stream (bad header or chunk): its answer is waiting to be read
        return list(rollout_pb2.UpdateWeightsResponse.FromString(recv_frame(sock)).results)


# ---- relay: forward each frame to the next server's data plane ------------------------------------------------


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
            tune(self.sock)
            self.sock.sendall(MAGIC)
            send_frame(self.sock, token.encode())
            send_frame(self.sock, rollout_pb2.UpdateWeightsRequest(header=next_header(header)).SerializeToString())
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
                send_frame(self.sock, frame)
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
                send_frame(self.sock, b"")
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
                response = rollout_pb2.UpdateWeightsResponse.FromString(recv_frame(self.sock))
                self.abort()
                return list(response.results)
            except (OSError, ConnectionError) as exc:
                self.error = f"relay link to {self.target} failed: {exc}"
        self.abort()
        return relay_failures(self.header, self.error or f"relay link to {self.target} failed")


def _tcp_port_of(target: str) -> int:
    with security.sync_channel(target, options=relay_channel_options()) as channel:
        status = rollout_pb2_grpc.RolloutServiceStub(channel).GetWeightsStatus(
            rollout_pb2.GetWeightsStatusRequest(), timeout=10
        )
    if not status.tcp_data_port:
        raise ConnectionError(f"{target} has no TCP data plane")
    return status.tcp_data_port
