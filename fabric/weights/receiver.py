"""The receiving end of a weight update, inside a rollout server.

A version is staged chunk by chunk into a shared-memory StagingBuffer; every chunk is bounds-checked against the
manifest and its crc32c verified. Only when every chunk of the version is there does it commit into the engine
(vLLM's weight-transfer hooks, generation paused in keep mode); until then the previous version keeps serving.
A broken stream leaves the partial version staged: GetWeightsStatus lists its chunks and the sender resends the
rest. A bad chunk drops the staged version. With relay targets, every chunk is forwarded to the next server as it
arrives (a pipelined chain), over gRPC or over the raw-TCP data plane, whichever the chunk came in on.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

import grpc

from fabric import security
from fabric.errors import FabricError, abort, invalid, precondition, unavailable
from fabric.rollout.engine import SleepState
from fabric.v1 import rollout_pb2, rollout_pb2_grpc, weights_pb2
from fabric.weights import manifest as mf
from fabric.weights import tcp
from fabric.weights.staging import StagingBuffer, layout

log = logging.getLogger(__name__)

RELAY_QUEUE_CHUNKS = 8  # bounded: a slow next hop slows this stream down instead of filling memory
# A next hop that accepts TCP but never answers (a hung host) stalls this stream once the queue is full: give it up
# after this long instead of gRPC's default 20 s connection attempt. A live hop answers in milliseconds.
RELAY_CONNECT_TIMEOUT_MS = 5_000


def _relay_channel_options() -> list:
    from fabric.server import CHANNEL_OPTIONS

    return [*CHANNEL_OPTIONS, ("grpc.min_reconnect_backoff_ms", RELAY_CONNECT_TIMEOUT_MS)]


@dataclass
class StagedVersion:
    version: int
    manifest: weights_pb2.WeightManifest
    digest: str
    buffer: StagingBuffer
    received: bytearray  # one flag per chunk
    received_count: int = 0
    bytes_received: int = 0
    committed: bool = False
    failed: FabricError | None = None
    streams: int = 0  # open streams feeding it now; 0: a partial version left by a broken stream, kept to resume
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def complete(self) -> bool:
        return self.received_count == len(self.manifest.chunks)


class WeightReceiver:
    """Both transports (gRPC stream, raw TCP) share begin -> accept* -> finish."""

    def __init__(self, engine, server_name: str):
        self.engine = engine
        self.server_name = server_name
        self.expected = mf.expected_from_hf_config(engine.hf_config, engine.dtype)
        self.optional = mf.optional_names(engine.hf_config)
        self.tied = bool(self.optional)
        self.staged: StagedVersion | None = None
        self._spare: StagingBuffer | None = None  # the last committed version's staging file, reused when it fits
        self.serving_digest = ""
        self._state_lock = threading.Lock()
        self._commit_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self.tcp_port = 0
        self.security = security.current()

    # ---- shared state machine -------------------------------------------------------------------------------

    @property
    def serving_version(self) -> int:
        return int(self.engine.weight_version)

    def begin(self, header: rollout_pb2.UpdateWeightsHeader) -> StagedVersion | None:
        """Validates a header; returns the version to stage into, or None when it is already serving."""
        version = header.weight_version
        if version <= 0:
            raise invalid("header.weight_version", f"must be a positive integer, got {version}")
        if version < self.serving_version:
            raise precondition(
                f"weight_version {version} is older than the serving version {self.serving_version}: "
                "send a newer version",
                "STALE_VERSION",
                "header.weight_version",
            )
        if version == self.serving_version:
            return None
        if self.engine.sleep_state == SleepState.ASLEEP:
            raise unavailable("the server is asleep: WakeUp(tags=['weights']) before sending weights", "ASLEEP")
        mf.check_manifest(header.manifest, self.expected, self.optional)
        digest = mf.digest(header.manifest)
        with self._state_lock:
            staged = self.staged
            if staged is not None and staged.version == version and not staged.committed:
                if staged.digest != digest:
                    raise precondition(
                        f"version {version} is already being staged with a different manifest "
                        f"(digest {staged.digest}): resend the same tensors and chunking, or use a "
                        "new version",
                        "MANIFEST_CHANGED",
                        "header.manifest",
                    )
                staged.streams += 1
                return staged  # a resume or a parallel stream of the same version
            if staged is not None and staged.version > version and not staged.committed:
                if staged.streams:
                    raise precondition(
                        f"version {staged.version} is arriving now; {version} is older: send a version newer "
                        f"than {staged.version}, or wait for it to commit",
                        "STALE_VERSION",
                        "header.weight_version",
                    )
                # Nobody feeds it (its sender died, e.g. a trainer since restarted): it must not lock the server out.
                log.warning(
                    "dropping partial version %d (%d/%d chunks, no stream feeding it) for version %d",
                    staged.version,
                    staged.received_count,
                    len(staged.manifest.chunks),
                    version,
                )
            if staged is not None:
                self._drop_locked(staged)
            specs = [(t.name, mf.PROTO_TO_TORCH[t.dtype], tuple(t.shape)) for t in header.manifest.tensors]
            self.staged = StagedVersion(
                version, header.manifest, digest, self._buffer_locked(specs), bytearray(len(header.manifest.chunks))
            )
            self.staged.streams = 1
            return self.staged

    def release(self, staged: StagedVersion | None) -> None:
        """A stream that began feeding `staged` has ended, however it ended."""
        if staged is not None:
            with self._state_lock:
                staged.streams -= 1
                if staged.streams == 0 and self.staged is not staged:
                    self._retire_locked(staged)

    def check_chunk(self, staged: StagedVersion, chunk: weights_pb2.WeightChunk, length: int) -> weights_pb2.ChunkSpec:
        """Bounds: the chunk must be the manifest's chunk at that index (same tensor, offset, length)."""
        chunks = staged.manifest.chunks
        if not 0 <= chunk.chunk_index < len(chunks):
            raise invalid(
                "chunk.chunk_index",
                f"{chunk.chunk_index} is not a chunk of this version (0..{len(chunks) - 1})",
                "UNKNOWN_CHUNK",
            )
        spec = chunks[chunk.chunk_index]
        tensor = staged.manifest.tensors[spec.tensor_index]
        if chunk.tensor_index != spec.tensor_index:
            raise invalid(
                "chunk.tensor_index",
                f"chunk {chunk.chunk_index} belongs to tensor {tensor.name!r}, not tensor #{chunk.tensor_index}",
                "CHUNK_MISMATCH",
            )
        if chunk.offset != spec.offset or chunk.offset + length > tensor.nbytes or length != spec.length:
            raise invalid(
                "chunk.data",
                f"chunk {chunk.chunk_index} of tensor {tensor.name!r} covers "
                f"[{chunk.offset}, {chunk.offset + length}) but the manifest says "
                f"[{spec.offset}, {spec.offset + spec.length}) of {tensor.nbytes} bytes "
                "(past the tensor's end or misplaced)",
                "CHUNK_OUT_OF_BOUNDS",
            )
        return spec

    def accept(self, staged: StagedVersion, chunk: weights_pb2.WeightChunk, data) -> None:
        """Verifies and stores one chunk whose bytes are in `data` (gRPC path)."""
        spec = self.check_chunk(staged, chunk, len(data))
        self._verify(staged, chunk, data)
        staged.buffer.write(spec.tensor_index, spec.offset, data)
        self._mark(staged, chunk.chunk_index, len(data))

    def _verify(self, staged: StagedVersion, chunk: weights_pb2.WeightChunk, data) -> None:
        if mf.crc32c(data) != chunk.crc32c:
            name = staged.manifest.tensors[chunk.tensor_index].name
            raise invalid(
                "chunk.crc32c",
                f"checksum mismatch in chunk {chunk.chunk_index} of tensor {name!r} "
                "(corrupted in transit): the version is dropped, resend it",
                "CHECKSUM_MISMATCH",
            )

    def _mark(self, staged: StagedVersion, index: int, length: int) -> None:
        with self._state_lock:
            if not staged.received[index]:
                staged.received[index] = 1
                staged.received_count += 1
            staged.bytes_received += length

    def fail(self, staged: StagedVersion, error: FabricError) -> None:
        """A bad chunk: the staged version is dropped, the serving one is untouched."""
        with self._state_lock:
            staged.failed = error
            if self.staged is staged:
                self._drop_locked(staged)
        staged.done.set()

    def _drop_locked(self, staged: StagedVersion) -> None:
        if self.staged is staged:
            self.staged = None
        if staged.streams == 0:
            self._retire_locked(staged)
        # else: the last stream still feeding it retires it when it ends (release), so nothing writes into a
        # buffer that was closed or handed to the next version

    def _retire_locked(self, staged: StagedVersion) -> None:
        """A committed version's buffer is kept for the next version of the same layout: its pages are already
        allocated, and first-touch page faults on a fresh shared-memory file cost as much as the network."""
        if staged.buffer is None:
            return
        if staged.committed and self._spare is None:
            self._spare = staged.buffer
        else:
            staged.buffer.close()
        staged.buffer = None

    def _buffer_locked(self, specs) -> StagingBuffer:
        spare, self._spare = self._spare, None
        if spare is not None and spare.slots == layout(specs)[0]:
            return spare  # stale bytes: every chunk is written (and verified) again before the version can commit
        if spare is not None:
            spare.close()
        return StagingBuffer(specs)

    async def finish(
        self, staged: StagedVersion, started: float, wait_for_others: bool = False
    ) -> rollout_pb2.WeightUpdateResult:
        """Commits when complete (once, whichever stream gets here first); otherwise reports the partial state."""
        result = rollout_pb2.WeightUpdateResult(
            server=self.server_name, weight_version=staged.version, bytes_received=staged.bytes_received
        )
        if staged.complete and not staged.committed and staged.failed is None:
            async with self._commit_lock_():
                if not staged.committed and staged.failed is None:
                    await self._commit(staged)
        if not staged.complete and wait_for_others and staged.failed is None:
            try:  # parallel streams of one version: the last to finish commits, the others wait for it
                await asyncio.wait_for(staged.done.wait(), timeout=600)
            except TimeoutError:
                pass
        if staged.failed is not None:
            result.error.CopyFrom(staged.failed.to_proto())
        result.committed = staged.committed
        result.seconds = time.perf_counter() - started
        result.commit_seconds = getattr(staged, "commit_seconds", 0.0)
        return result

    async def _commit(self, staged: StagedVersion) -> None:
        names = {t.name for t in staged.manifest.tensors}
        info = staged.buffer.update_info()
        info["tie_lm_head"] = self.tied and "lm_head.weight" not in names
        start = time.perf_counter()
        try:
            await self.engine.commit_weights(info, staged.version)
        except Exception as exc:  # the engine refused: keep serving what it served
            log.exception("commit of version %d failed", staged.version)
            with self._state_lock:
                staged.failed = FabricError(
                    grpc.StatusCode.INTERNAL,
                    f"commit of version {staged.version} into the engine failed: {exc}",
                    "COMMIT_FAILED",
                )
                self._drop_locked(staged)
            staged.done.set()
            return
        staged.commit_seconds = time.perf_counter() - start
        with self._state_lock:
            staged.committed = True
            self.serving_digest = staged.digest
            self._drop_locked(staged)
        staged.done.set()
        log.info(
            "weight version %d committed (%.1f MB, commit %.3f s)",
            staged.version,
            staged.manifest.total_bytes / 1e6,
            staged.commit_seconds,
        )

    def _commit_lock_(self) -> asyncio.Lock:
        if self._commit_lock is None:
            self._commit_lock = asyncio.Lock()
        return self._commit_lock

    def status(self) -> rollout_pb2.GetWeightsStatusResponse:
        self._ensure_data_plane()
        response = rollout_pb2.GetWeightsStatusResponse(
            serving_version=self.serving_version,
            tcp_data_port=self.tcp_port,
            serving_manifest_digest=self.serving_digest,
            dtype=str(self.engine.dtype).removeprefix("torch."),
        )
        with self._state_lock:
            staged = self.staged
            if staged is not None and not staged.committed:
                response.staged_version = staged.version
                response.staged_manifest_digest = staged.digest
                response.total_chunks = len(staged.manifest.chunks)
                response.staged_chunk_indices.extend(i for i, r in enumerate(staged.received) if r)
        return response

    def _already(self, version: int) -> rollout_pb2.WeightUpdateResult:
        return rollout_pb2.WeightUpdateResult(
            server=self.server_name, weight_version=version, committed=True, already_committed=True
        )

    # ---- gRPC transport ---------------------------------------------------------------------------------------

    async def update_weights(self, request_iterator, context) -> rollout_pb2.UpdateWeightsResponse:
        self._ensure_data_plane()
        started = time.perf_counter()
        first = await _next_or_none(request_iterator)
        if first is None or not first.HasField("header"):
            await abort(
                context,
                invalid(
                    "header",
                    "the first UpdateWeights message must carry the header (weight_version and manifest)",
                    "MISSING_HEADER",
                ),
            )
        header = first.header
        try:
            staged = self.begin(header)
        except FabricError as err:
            await abort(context, err)
        if staged is None:
            # Idempotent: already serving. Still pass the header down a relay chain so every hop answers.
            return rollout_pb2.UpdateWeightsResponse(results=[self._already(header.weight_version)])
        try:
            return await self._receive_grpc_chunks(header, staged, request_iterator, context, started)
        finally:
            self.release(staged)

    async def _receive_grpc_chunks(self, header, staged, request_iterator, context, started):
        # The next hop inherits this call's deadline, so a stuck hop cannot outlive the sender's patience.
        relay = _GrpcRelay(header, context.time_remaining()) if header.relay_targets else None
        try:
            async for request in request_iterator:
                if not request.HasField("chunk"):
                    raise invalid("chunk", "every message after the header must carry a chunk", "MISSING_CHUNK")
                self.accept(staged, request.chunk, request.chunk.data)
                if relay is not None:
                    await relay.put(request)
        except FabricError as err:
            self.fail(staged, err)
            if relay is not None:
                relay.cancel()
            await abort(context, err)
        except asyncio.CancelledError:
            # The sender went away mid-stream: keep what arrived (resumable), stop the relay too.
            if relay is not None:
                relay.cancel()
            raise
        if relay is not None:
            await relay.end()  # the next server finishes while this one commits: a chain commits together
        result = await self.finish(staged, started, wait_for_others=bool(header.chunk_indices))
        results = [result]
        if relay is not None:
            results.extend(await relay.close())
        return rollout_pb2.UpdateWeightsResponse(results=results)

    # ---- raw-TCP transport ------------------------------------------------------------------------------------

    def _ensure_data_plane(self) -> None:
        if self._listener is not None or self.security.tls:
            return  # with TLS on, weights travel over gRPC/TLS only: the data plane has no encryption
        self._loop = asyncio.get_running_loop()
        host = self.server_name.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
        listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        listener.listen(16)
        self._listener = listener
        self.tcp_port = listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="weights-tcp", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_tcp, args=(conn,), name="weights-tcp-conn", daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        with self._state_lock:
            if self.staged is not None:
                self._drop_locked(self.staged)
            if self._spare is not None:
                self._spare.close()
                self._spare = None

    def _serve_tcp(self, conn: socket.socket) -> None:
        """One update over TCP, in its own thread; state changes and the commit run on the event loop."""
        tcp.tune(conn)
        started = time.perf_counter()
        staged = relay = None
        try:
            with conn:
                if tcp.recv_exact(conn, 4) != tcp.MAGIC:
                    return
                token = tcp.recv_frame(conn).decode()
                request = rollout_pb2.UpdateWeightsRequest.FromString(tcp.recv_frame(conn))
                try:
                    if self.security.token and not hmac.compare_digest(token, self.security.token):
                        raise FabricError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token", "UNAUTHENTICATED")
                    if not request.HasField("header"):
                        raise invalid("header", "the first frame must carry the header", "MISSING_HEADER")
                    staged = self._call(lambda: self._begin_async(request.header))
                except FabricError as err:
                    self._reply(conn, request.header.weight_version, err)
                    return
                if staged is None:
                    tcp.send_frame(
                        conn,
                        rollout_pb2.UpdateWeightsResponse(
                            results=[self._already(request.header.weight_version)]
                        ).SerializeToString(),
                    )
                    return
                if request.header.relay_targets:
                    relay = _TcpRelay(request.header, token)
                result = self._receive_tcp_chunks(conn, staged, relay, started, bool(request.header.chunk_indices))
                results = [result] + (relay.close() if relay else [])
                tcp.send_frame(conn, rollout_pb2.UpdateWeightsResponse(results=results).SerializeToString())
        except (ConnectionError, OSError) as exc:
            log.warning("weight data connection broke: %s (the partial version stays staged)", exc)
            if relay is not None:
                relay.abort()
        finally:
            self.release(staged)

    def _receive_tcp_chunks(self, conn, staged, relay, started, wait_for_others):
        while True:
            frame = tcp.recv_frame(conn)
            if not frame:
                break
            chunk = weights_pb2.WeightChunk.FromString(frame)
            try:
                spec = self.check_chunk(
                    staged,
                    chunk,
                    staged.manifest.chunks[chunk.chunk_index].length
                    if 0 <= chunk.chunk_index < len(staged.manifest.chunks)
                    else -1,
                )
                view = staged.buffer.read(spec.tensor_index, spec.offset, spec.length)
                tcp.recv_exact_into(conn, view)
                self._verify(staged, chunk, view)
            except FabricError as err:
                self.fail(staged, err)
                if relay is not None:
                    relay.abort()
                self._reply(conn, staged.version, err)
                raise ConnectionError("update refused") from None
            self._mark(staged, chunk.chunk_index, spec.length)
            if relay is not None:
                relay.forward(frame, view)
        if relay is not None:
            relay.finish_sending()
        return self._call(lambda: self.finish(staged, started, wait_for_others))

    async def _begin_async(self, header):
        return self.begin(header)

    def _call(self, make_coro):
        return asyncio.run_coroutine_threadsafe(make_coro(), self._loop).result()

    def _reply(self, conn, version: int, err: FabricError) -> None:
        result = rollout_pb2.WeightUpdateResult(server=self.server_name, weight_version=version, error=err.to_proto())
        try:
            tcp.send_frame(conn, rollout_pb2.UpdateWeightsResponse(results=[result]).SerializeToString())
        except OSError:
            pass


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


class _GrpcRelay:
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


class _TcpRelay:
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
            host = self.target.rsplit(":", 1)[0].strip("[]")
            self.sock = socket.create_connection((host, port), timeout=30)
            tcp.tune(self.sock)
            self.sock.sendall(tcp.MAGIC)
            tcp.send_frame(self.sock, token.encode())
            tcp.send_frame(self.sock, rollout_pb2.UpdateWeightsRequest(header=_next_header(header)).SerializeToString())
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
                tcp.send_frame(self.sock, frame)
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
                tcp.send_frame(self.sock, b"")
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
                response = rollout_pb2.UpdateWeightsResponse.FromString(tcp.recv_frame(self.sock))
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


async def _next_or_none(iterator):
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None
