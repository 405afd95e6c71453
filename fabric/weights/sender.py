"""The sending end of a weight update: from any (HF name, tensor) source to every rollout server.

`WeightSource` cuts tensors into chunks (views over the tensors' own memory, crc32c computed once), and
`push_weights` streams them under a version to the targets:
- relay (default for 2+ targets): one stream to the first server, which forwards every chunk to the next as it
  arrives, so the sender's egress is one copy of the model whatever the number of servers;
- direct: one stream per server, in parallel (egress N copies).
Transport: the gRPC UpdateWeights stream, or the raw-TCP data plane the servers advertise (same framing and checks,
fewer copies; `auto` takes it when every target has one). Before sending, every target's GetWeightsStatus is read:
servers already serving the version are skipped, and a partial version staged from a broken stream is resumed by
sending only its missing chunks.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from fabric import security
from fabric.errors import FabricError
from fabric.v1 import rollout_pb2, rollout_pb2_grpc, weights_pb2
from fabric.weights import manifest as mf
from fabric.weights import tcp
from fabric.weights.staging import DTYPES_BY_NAME

DEFAULT_TIMEOUT_S = 600.0


class WeightSource:
    """Tensors of one version, laid out as a manifest; chunk i is a zero-copy view of its tensor's bytes."""

    def __init__(
        self,
        named: Iterable[tuple[str, torch.Tensor]],
        chunk_bytes: int = mf.DEFAULT_CHUNK_BYTES,
        dtype: torch.dtype | None = None,
    ):
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []
        for name, tensor in named:
            tensor = tensor.detach()
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            self.names.append(name)
            self.tensors.append(tensor.cpu().contiguous())
        self.manifest = mf.build_manifest(
            ((n, t.dtype, tuple(t.shape)) for n, t in zip(self.names, self.tensors, strict=True)), chunk_bytes
        )
        self.digest = mf.digest(self.manifest)
        self._bytes = [t.view(torch.uint8).reshape(-1).numpy() if t.numel() else None for t in self.tensors]
        self._crcs: list[int | None] = [None] * len(self.manifest.chunks)

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes

    def chunk_view(self, index: int) -> memoryview:
        spec = self.manifest.chunks[index]
        raw = self._bytes[spec.tensor_index]
        return memoryview(raw[spec.offset : spec.offset + spec.length]) if raw is not None else memoryview(b"")

    def chunk_meta(self, index: int) -> weights_pb2.WeightChunk:
        spec = self.manifest.chunks[index]
        if self._crcs[index] is None:
            self._crcs[index] = mf.crc32c(self.chunk_view(index))
        return weights_pb2.WeightChunk(
            chunk_index=index, tensor_index=spec.tensor_index, offset=spec.offset, crc32c=self._crcs[index]
        )

    @classmethod
    def from_hf_checkpoint(
        cls, directory: str | Path, chunk_bytes: int = mf.DEFAULT_CHUNK_BYTES, dtype: torch.dtype | None = None
    ) -> WeightSource:
        from safetensors import safe_open

        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {directory}")

        def named():
            for path in files:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key)

        return cls(named(), chunk_bytes, dtype)


@dataclass
class PushReport:
    version: int
    mode: str
    transport: str
    targets: list[str]
    results: list[rollout_pb2.WeightUpdateResult] = field(default_factory=list)
    bytes_sent: int = 0  # the sender's egress: chunk bytes it wrote to the network
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return len(self.results) == len(self.targets) and all(r.committed and not r.error.code for r in self.results)

    @property
    def failed(self) -> list[rollout_pb2.WeightUpdateResult]:
        return [r for r in self.results if not r.committed or r.error.code]

    @property
    def gbps(self) -> float:
        return self.bytes_sent / self.seconds / 1e9 if self.seconds else 0.0


async def weights_status(target: str, timeout: float = 10.0) -> rollout_pb2.GetWeightsStatusResponse:
    async with security.channel(target) as channel:
        return await rollout_pb2_grpc.RolloutServiceStub(channel).GetWeightsStatus(
            rollout_pb2.GetWeightsStatusRequest(), timeout=timeout
        )


def needed_chunks(
    source: WeightSource, version: int, statuses: list[rollout_pb2.GetWeightsStatusResponse]
) -> list[int] | None:
    """Chunks to send so that every target can complete `version`; None means all of them."""
    total = len(source.manifest.chunks)
    needed: set[int] = set()
    for status in statuses:
        if status.staged_version == version and status.staged_manifest_digest == source.digest:
            needed |= set(range(total)) - set(status.staged_chunk_indices)
        else:
            return None
    return sorted(needed)


# A head that answers with one of these refused the update itself, and the next server would refuse it too. Any
# other error (UNAVAILABLE, DEADLINE_EXCEEDED, and INTERNAL/UNKNOWN, which gRPC also reports for a connection reset
# mid-stream) means the head went away: the next server in the chain takes over.
_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
}


async def _status_or_error(target: str) -> rollout_pb2.GetWeightsStatusResponse | Exception:
    try:
        return await weights_status(target)
    except (grpc.aio.AioRpcError, OSError) as exc:
        return exc


def _failure(target: str, version: int, exc: BaseException, reason: str) -> rollout_pb2.WeightUpdateResult:
    if isinstance(exc, grpc.aio.AioRpcError):
        code, detail = exc.code(), exc.details()
    else:
        code, detail = grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc}"
    message = f"{target}: {detail}"
    return rollout_pb2.WeightUpdateResult(
        server=target, weight_version=version, error=FabricError(code, message, reason).to_proto()
    )


def _triage(targets, found, version, report, already_committed: bool) -> list:
    """Records the results of targets that are unreachable or already serve `version`; returns the others as
    (target, status), the ones still to be sent."""
    pending = []
    for target, status in zip(targets, found, strict=True):
        if isinstance(status, Exception):
            report.results.append(_failure(target, version, status, "UNREACHABLE"))
        elif status.serving_version == version:
            report.results.append(
                rollout_pb2.WeightUpdateResult(
                    server=target, weight_version=version, committed=True, already_committed=already_committed
                )
            )
        else:
            pending.append((target, status))
    return pending


def _is_transient(exc: BaseException) -> bool:
    return not isinstance(exc, grpc.aio.AioRpcError) or exc.code() not in _REFUSALS


async def push_weights(
    source: WeightSource,
    targets: list[str],
    version: int | None = None,
    mode: str | None = None,
    transport: str = "auto",
    streams: int = 1,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> PushReport:
    """Pushes one version to every target; see the module doc for mode and transport.

    A target that cannot be reached, or dies during the push, gets a failed result (the others go on); the caller
    decides what a partial update means (the trainer drops those servers from routing)."""
    if not targets:
        raise ValueError("no targets")
    if mode not in (None, "relay", "direct"):
        raise ValueError(f"mode must be relay or direct, got {mode!r}")
    found = await asyncio.gather(*(_status_or_error(t) for t in targets))
    if version is None:
        version = max((s.serving_version for s in found if not isinstance(s, Exception)), default=0) + 1
    report = PushReport(version, "", "", list(targets))
    pending = _triage(targets, found, version, report, already_committed=True)
    if transport == "auto":
        transport = "tcp" if pending and all(s.tcp_data_port for _, s in pending) else "grpc"
    report.transport = transport
    report.mode = mode = mode or ("relay" if len(pending) >= 2 else "direct")
    if not pending:
        return report
    start = time.perf_counter()
    if mode == "relay":
        await _relay(source, version, pending, transport, timeout, report)
    else:

        async def direct(target, status):
            chunks = needed_chunks(source, version, [status])
            try:
                return await _send_parallel(
                    source, version, target, chunks, status, transport, timeout, report, streams
                )
            except (grpc.aio.AioRpcError, OSError) as exc:
                return [_failure(target, version, exc, "PUSH_FAILED")]

        for results in await asyncio.gather(*(direct(t, s) for t, s in pending)):
            report.results.extend(results)
    report.seconds = time.perf_counter() - start
    return report


async def _relay(source, version, pending, transport, timeout, report) -> None:
    """One stream down the chain of pending servers. When the head itself fails (dead, unreachable) the rest of the
    chain is asked again where it stands and the next server becomes the head; chunks already staged there are not
    sent again."""
    while pending:
        chunks = needed_chunks(source, version, [s for _, s in pending])
        names = [t for t, _ in pending]
        try:
            report.results.extend(
                await _send(source, version, names[0], names[1:], chunks, pending[0][1], transport, timeout, report)
            )
            return
        except (grpc.aio.AioRpcError, OSError) as exc:
            report.results.append(_failure(names[0], version, exc, "PUSH_FAILED"))
            if not _is_transient(exc):  # the head refused the update itself: the next one would refuse it too
                report.results.extend(_failure(t, version, exc, "NOT_SENT") for t in names[1:])
                return
        rest = names[1:]
        found = await asyncio.gather(*(_status_or_error(t) for t in rest))
        pending = _triage(rest, found, version, report, already_committed=False)  # committed: before the break


async def _send_parallel(source, version, target, chunks, status, transport, timeout, report, streams):
    """Several streams to one target, each a share of the chunks; the last to finish commits on the server."""
    indices = chunks if chunks is not None else list(range(len(source.manifest.chunks)))
    if streams <= 1 or len(indices) < 2:
        return await _send(source, version, target, [], chunks, status, transport, timeout, report)
    shares = [indices[i::streams] for i in range(streams)]
    results = await asyncio.gather(
        *(_send(source, version, target, [], share, status, transport, timeout, report) for share in shares if share)
    )
    committed = [r for rs in results for r in rs if r.committed]
    return [committed[0] if committed else results[0][0]]


def _header(source, version, relay_targets, chunks) -> rollout_pb2.UpdateWeightsHeader:
    return rollout_pb2.UpdateWeightsHeader(
        weight_version=version, manifest=source.manifest, relay_targets=relay_targets, chunk_indices=chunks or []
    )


async def _send(source, version, target, relay_targets, chunks, status, transport, timeout, report):
    indices = chunks if chunks is not None else range(len(source.manifest.chunks))
    header = _header(source, version, relay_targets, chunks)
    if transport == "tcp":
        return await asyncio.to_thread(
            _send_tcp, source, header, target, status.tcp_data_port, indices, timeout, report
        )

    async def requests():
        yield rollout_pb2.UpdateWeightsRequest(header=header)
        for i in indices:
            chunk = source.chunk_meta(i)
            chunk.data = source.chunk_view(i).tobytes()
            report.bytes_sent += len(chunk.data)
            yield rollout_pb2.UpdateWeightsRequest(chunk=chunk)

    async with security.channel(target) as channel:
        response = await rollout_pb2_grpc.RolloutServiceStub(channel).UpdateWeights(requests(), timeout=timeout)
    return list(response.results)


def _send_tcp(source, header, target, port, indices, timeout, report):
    host = target.rsplit(":", 1)[0].strip("[]")
    with socket.create_connection((host, port), timeout=timeout) as sock:
        tcp.tune(sock)
        sock.sendall(tcp.MAGIC)
        tcp.send_frame(sock, (security.current().token or "").encode())
        try:
            tcp.send_frame(sock, rollout_pb2.UpdateWeightsRequest(header=header).SerializeToString())
            for i in indices:
                view = source.chunk_view(i)
                tcp.send_frame(sock, source.chunk_meta(i).SerializeToString())
                sock.sendall(view)
                report.bytes_sent += len(view)
            tcp.send_frame(sock, b"")
        except OSError:
            pass  # the server refused mid-stream (bad header or chunk): its answer is waiting to be read
        return list(rollout_pb2.UpdateWeightsResponse.FromString(tcp.recv_frame(sock)).results)


def serving_dtype(statuses: list[rollout_pb2.GetWeightsStatusResponse]) -> torch.dtype | None:
    names = {s.dtype for s in statuses if s.dtype}
    if len(names) > 1:
        raise ValueError(f"targets serve different dtypes: {sorted(names)}")
    return DTYPES_BY_NAME.get(names.pop()) if names else None
