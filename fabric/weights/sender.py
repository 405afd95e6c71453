"""The sending end of a weight update: from any (HF name, tensor) source to every rollout server.

`WeightSource` cuts tensors into chunks (views over the tensors' own memory, crc32c computed once), and
`push_weights` streams them under a version to the targets:
- relay (default for 2+ targets): one stream to the first server, which forwards every chunk to the next as it
  arrives, so the sender's egress is one copy of the model whatever the number of servers;
- direct: one stream per server, in parallel (egress N copies).
Transport (fabric.weights.transports): every target's GetWeightsStatus says which paths it offers; each target gets
the requested one if both ends can use it, else the best both can (`auto`: the best), and its result says which
and why. Targets are grouped by path: a chain or direct streams for host paths (gRPC, raw TCP), one group for a
collective. The status also says what each target has: servers already serving the version are skipped, and a
partial version staged from a broken stream is resumed by sending only its missing chunks.

Tensors stay where they live. A host path reads CPU tensors in place and stages GPU tensors through two reused
pinned buffers, copying the next batch while the current one is sent; a GPU path takes them as they are.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from fabric.errors import FabricError
from fabric.v1 import rollout_pb2, rollout_pb2_grpc, weights_pb2
from fabric.weights import manifest as mf
from fabric.weights import transports
from fabric.weights.channels import ChannelCache, open_channel
from fabric.weights.staging import DTYPES_BY_NAME

DEFAULT_TIMEOUT_S = 600.0
HOST_STAGE_BYTES = 64 * 1024 * 1024  # one of the two pinned buffers a GPU tensor is staged through


class WeightSource:
    """Tensors of one version, laid out as a manifest, kept on the device they live on (cast to `dtype`)."""

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
            self.tensors.append(tensor.contiguous())
        self.manifest = mf.build_manifest(
            ((n, t.dtype, tuple(t.shape)) for n, t in zip(self.names, self.tensors, strict=True)), chunk_bytes
        )
        self.digest = mf.digest(self.manifest)
        self._crcs: list[int | None] = [None] * len(self.manifest.chunks)
        self._pinned: list[torch.Tensor] = []  # staging buffers, reused across pushes and streams

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device if self.tensors else torch.device("cpu")

    def _raw(self, tensor_index: int) -> torch.Tensor:
        tensor = self.tensors[tensor_index]
        return tensor.view(torch.uint8).reshape(-1) if tensor.numel() else torch.empty(0, dtype=torch.uint8)

    def host_chunks(
        self, indices: Iterable[int], stage_bytes: int = HOST_STAGE_BYTES
    ) -> Generator[tuple[int, memoryview], None, None]:
        """(chunk index, its bytes in host memory) in order. A CPU tensor's chunk is a view of the tensor itself;
        other chunks are copied in batches of up to `stage_bytes` into one of two reused (pinned, with CUDA)
        buffers, the next batch copying while the caller sends the current one. A view is valid until the caller
        asks for the chunk after the next batch; the crc32c of each chunk is computed once, when first seen."""
        chunks = self.manifest.chunks
        stage_bytes = max(stage_bytes, max((c.length for c in chunks), default=0))
        batch: list[int] = []
        size = 0
        pending = None  # (batch, buffer, event): copied or copying
        buffers = self._take_buffers(stage_bytes)
        try:
            for i in indices:
                spec = chunks[i]
                raw = self._raw(spec.tensor_index)
                if not self._off_host(raw):
                    if pending is not None:
                        yield from self._drain(*pending)
                        pending = None
                    yield i, self._checked(i, raw[spec.offset : spec.offset + spec.length].numpy().data)
                    continue
                if size + spec.length > stage_bytes and batch:
                    copying = self._copy(batch, buffers[0])
                    if pending is not None:
                        yield from self._drain(*pending)
                    pending, batch, size = copying, [], 0
                    buffers.reverse()
                batch.append(i)
                size += spec.length
            if batch:
                copying = self._copy(batch, buffers[0])
                if pending is not None:
                    yield from self._drain(*pending)
                pending = copying
            if pending is not None:
                yield from self._drain(*pending)
        finally:
            self._pinned.extend(buffers)

    @staticmethod
    def _off_host(tensor: torch.Tensor) -> bool:
        return tensor.device.type != "cpu"

    def _take_buffers(self, stage_bytes: int) -> list[torch.Tensor]:
        if not any(self._off_host(t) for t in self.tensors):
            return []
        self._pinned = [b for b in self._pinned if b.numel() >= stage_bytes]
        while len(self._pinned) < 2:
            self._pinned.append(torch.empty(stage_bytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available()))
        return [self._pinned.pop(), self._pinned.pop()]

    def _copy(self, batch: list[int], buffer: torch.Tensor):
        """Starts copying the batch's chunks into `buffer` (asynchronously from a GPU, into pinned memory)."""
        cursor = 0
        for i in batch:
            spec = self.manifest.chunks[i]
            src = self._raw(spec.tensor_index)[spec.offset : spec.offset + spec.length]
            buffer[cursor : cursor + spec.length].copy_(src, non_blocking=True)
            cursor += spec.length
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return batch, buffer, event

    def _drain(self, batch: list[int], buffer: torch.Tensor, event) -> Iterator[tuple[int, memoryview]]:
        if event is not None:
            event.synchronize()
        host = buffer.numpy()
        cursor = 0
        for i in batch:
            length = self.manifest.chunks[i].length
            yield i, self._checked(i, host[cursor : cursor + length].data)
            cursor += length

    def _checked(self, index: int, view: memoryview) -> memoryview:
        if self._crcs[index] is None:
            self._crcs[index] = mf.crc32c(view)
        return view

    def chunk_view(self, index: int) -> memoryview:
        """One chunk's bytes in host memory: a view of a CPU tensor, a copy of any other."""
        chunks = self.host_chunks([index])
        _, view = next(chunks)
        if self._off_host(self.tensors[self.manifest.chunks[index].tensor_index]):
            view = memoryview(bytes(view))  # the staging buffer is reused
        chunks.close()
        return view

    def chunk_meta(self, index: int) -> weights_pb2.WeightChunk:
        """The chunk's header; its crc32c is known once host_chunks has yielded it."""
        spec = self.manifest.chunks[index]
        if self._crcs[index] is None:
            for _ in self.host_chunks([index]):
                pass
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
    phases: dict[str, float] = field(default_factory=dict)  # where the sender's time went (status_s, pack_s, ...)

    @property
    def ok(self) -> bool:
        return len(self.results) == len(self.targets) and all(r.committed and not r.error.code for r in self.results)

    @property
    def failed(self) -> list[rollout_pb2.WeightUpdateResult]:
        return [r for r in self.results if not r.committed or r.error.code]

    @property
    def gbps(self) -> float:
        return self.bytes_sent / self.seconds / 1e9 if self.seconds else 0.0


async def weights_status(
    target: str, timeout: float = 10.0, channels: ChannelCache | None = None
) -> rollout_pb2.GetWeightsStatusResponse:
    async with open_channel(target, channels) as channel:
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


async def _status_or_error(
    target: str, channels: ChannelCache | None
) -> rollout_pb2.GetWeightsStatusResponse | Exception:
    try:
        return await weights_status(target, channels=channels)
    except (grpc.aio.AioRpcError, OSError) as exc:
        if channels is not None:
            await channels.forget(target)
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
    channels: ChannelCache | None = None,
) -> PushReport:
    """Pushes one version to every target; see the module doc for mode and transport. `channels`: keep the control
    channels open across pushes (a trainer pushing version after version), else each push opens its own.

    A target that cannot be reached, or dies during the push, gets a failed result (the others go on); the caller
    decides what a partial update means (the trainer drops those servers from routing)."""
    if not targets:
        raise ValueError("no targets")
    if mode not in (None, "relay", "direct"):
        raise ValueError(f"mode must be relay or direct, got {mode!r}")
    if transport not in transports.CHOICES:
        raise ValueError(f"transport must be one of {', '.join(transports.CHOICES)}, got {transport!r}")
    began = time.perf_counter()
    found = await asyncio.gather(*(_status_or_error(t, channels) for t in targets))
    if version is None:
        version = max((s.serving_version for s in found if not isinstance(s, Exception)), default=0) + 1
    report = PushReport(version, "", "", list(targets))
    report.phases["status_s"] = time.perf_counter() - began
    pending = _triage(targets, found, version, report, already_committed=True)
    groups: dict[str, list[tuple[str, rollout_pb2.GetWeightsStatusResponse]]] = defaultdict(list)
    reasons: dict[str, str] = {}
    for target, status in pending:
        choice = transports.choose(transport, status, source)
        groups[choice.name].append((target, status))
        reasons[target] = choice.reason
    report.transport = "+".join(sorted(groups)) or transport
    report.mode = mode = mode or ("relay" if len(pending) >= 2 else "direct")
    if not pending:
        return report
    start = time.perf_counter()
    sends = [
        _send_group(name, group, source, version, mode, streams, timeout, report, channels)
        for name, group in groups.items()
    ]
    for name, results in zip(groups, await asyncio.gather(*sends), strict=True):
        for result in results:
            result.transport = result.transport or name
            result.transport_reason = result.transport_reason or reasons.get(result.server, "")
        report.results.extend(results)
    report.seconds = time.perf_counter() - start
    return report


async def _send_group(name, group, source, version, mode, streams, timeout, report, channels) -> list:
    """The targets that take one path, each accounted for: a server the path answered nothing for gets a failed
    result (NO_RESULT), never a silent success."""
    results = await _send_path(name, group, source, version, mode, streams, timeout, report, channels)
    if len(results) < len(group):
        answered = {r.server for r in results}
        missing = [t for t, _ in group if t not in answered][len(results) - len(group) :]
        for target in missing:
            missed = FabricError(grpc.StatusCode.INTERNAL, f"{target}: the {name} push never reached it", "NO_RESULT")
            results.append(
                rollout_pb2.WeightUpdateResult(server=target, weight_version=version, error=missed.to_proto())
            )
    return results


async def _send_path(name, group, source, version, mode, streams, timeout, report, channels) -> list:
    """A collective sends to all at once; a host path relays down a chain or sends to each directly."""
    if name in transports.GROUP_PATHS:
        return await transports.group_sender(name).send_group(source, version, group, timeout, report)
    module = transports.stream_sender(name)
    # Only a path whose receivers forward chunks can relay; any other (ipc: the bytes never leave the GPU) sends to
    # each server directly, whatever the mode, so no server is left out of a chain that cannot reach it.
    if mode == "relay" and len(group) > 1 and module.RELAYS:
        return await _relay(module, source, version, group, timeout, report, channels)

    async def direct(target, status):
        chunks = needed_chunks(source, version, [status])
        try:
            return await _send_parallel(
                module, source, version, target, chunks, status, timeout, report, streams, channels
            )
        except (grpc.aio.AioRpcError, OSError) as exc:
            if channels is not None:
                await channels.forget(target)
            return [_failure(target, version, exc, "PUSH_FAILED")]

    return [r for results in await asyncio.gather(*(direct(t, s) for t, s in group)) for r in results]


def _job(
    source, version, target, relay_targets, chunks, status, name, timeout, report, channels=None
) -> transports.SendJob:
    offer = transports.offers_of(status)[name]
    return transports.SendJob(source, version, target, relay_targets, chunks, offer, timeout, report, channels)


async def _relay(module, source, version, pending, timeout, report, channels=None) -> list:
    """One stream down the chain of pending servers. When the head itself fails (dead, unreachable) the rest of the
    chain is asked again where it stands and the next server becomes the head; chunks already staged there are not
    sent again."""
    results: list = []
    while pending:
        chunks = needed_chunks(source, version, [s for _, s in pending])
        names = [t for t, _ in pending]
        job = _job(source, version, names[0], names[1:], chunks, pending[0][1], module.NAME, timeout, report)
        try:
            return results + await module.send(job)
        except (grpc.aio.AioRpcError, OSError) as exc:
            results.append(_failure(names[0], version, exc, "PUSH_FAILED"))
            if not _is_transient(exc):  # the head refused the update itself: the next one would refuse it too
                return results + [_failure(t, version, exc, "NOT_SENT") for t in names[1:]]
        rest = names[1:]
        found = await asyncio.gather(*(_status_or_error(t, channels) for t in rest))
        skipped = PushReport(version, "", "", rest)
        pending = _triage(rest, found, version, skipped, already_committed=False)  # committed: before the break
        results.extend(skipped.results)
    return results


async def _send_parallel(module, source, version, target, chunks, status, timeout, report, streams, channels=None):
    """Several streams to one target, each a share of the chunks; the last to finish commits on the server."""
    indices = chunks if chunks is not None else list(range(len(source.manifest.chunks)))
    if streams <= 1 or len(indices) < 2:
        job = _job(source, version, target, [], chunks, status, module.NAME, timeout, report, channels)
        return await module.send(job)
    shares = [indices[i::streams] for i in range(streams)]
    results = await asyncio.gather(
        *(
            module.send(_job(source, version, target, [], share, status, module.NAME, timeout, report))
            for share in shares
            if share
        )
    )
    committed = [r for rs in results for r in rs if r.committed]
    return [committed[0] if committed else results[0][0]]


def serving_dtype(statuses: list[rollout_pb2.GetWeightsStatusResponse]) -> torch.dtype | None:
    names = {s.dtype for s in statuses if s.dtype}
    if len(names) > 1:
        raise ValueError(f"targets serve different dtypes: {sorted(names)}")
    return DTYPES_BY_NAME.get(names.pop()) if names else None
