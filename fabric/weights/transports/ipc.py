"""CUDA IPC: a trainer and a rollout server on the same GPU hand a version over by memory handle, no copy through
the host. Also the helpers every GPU path shares: a version staged in GPU memory (`DeviceStaging`, filled by NCCL or
IPC in the rollout server's process) reaches the vLLM worker by CUDA IPC handle (`share` / `open_shared`).

    sender      packs the version's tensors into one flat CUDA buffer of the staging layout (one device copy), kept
                and reused push after push, and shares that one buffer in the UpdateWeights header (`ipc`); it keeps
                the stream open until the server answers, so the memory stays valid
    receiver    maps the sender's buffer once (the handle is the same every push: `HandleCache`), copies it into its
                device staging buffer in one device-to-device copy, marks every chunk and lets the version store
                commit as usual: the whole version is staged before vLLM loads it, a failure leaves the previous one
                serving, and the serving version's buffer stays for a rollback
    offer       params host_id (boot id) and gpu_uuid: a sender uses it only from a tensor on that very GPU

One packed buffer, not a handle per tensor: opening a CUDA IPC handle costs milliseconds, a device copy of a 7B
model a few, and a trainer's tensors for a push are new allocations each time (HF layout from megatron's), so
per-tensor handles would be opened afresh on every update. Handles travel as a pickle of plain values only (tuples,
ints, bytes, strings), checked before torch sees them: the unpickler refuses every global, so a header cannot make
the server run code.
"""

from __future__ import annotations

import asyncio
import io
import logging
import pickle
import threading
import time
from pathlib import Path

import torch

from fabric.errors import FabricError, invalid
from fabric.v1 import rollout_pb2, rollout_pb2_grpc
from fabric.weights.manifest import PROTO_TO_TORCH, build_manifest
from fabric.weights.staging import DTYPE_NAMES, DTYPES_BY_NAME, DeviceUpdateInfo, UpdateInfo, layout

log = logging.getLogger(__name__)

NAME = "ipc"
RELAYS = False  # the bytes never leave the GPU: each server maps the sender's buffer itself


# ---- plain-value CUDA IPC handles ------------------------------------------------------------------------------


def host_id() -> str:
    """Identifies this machine's boot: CUDA IPC works only between processes of one host."""
    for path in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            return Path(path).read_text().strip()
        except OSError:
            continue
    return ""


def gpu_uuid(device) -> str:
    return str(torch.cuda.get_device_properties(torch.device(device)).uuid)


def share(tensor: torch.Tensor) -> dict:
    """A CUDA tensor's IPC handle as plain values ({gpu uuid: rebuild args}), for another process on that GPU."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(tensor)
    (_, size, stride, offset, storage_cls, dtype, _device, *rest) = args
    plain = (tuple(size), tuple(stride), int(offset), storage_cls.__name__, DTYPE_NAMES[dtype], *rest)
    return {gpu_uuid(tensor.device): plain}


def open_shared(shared: dict, device=None) -> torch.Tensor:
    """The tensor another process shared with `share`, mapped on this process's device for that GPU."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device = torch.device(device if device is not None else "cuda")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    uuid = gpu_uuid(device)
    if uuid not in shared:
        raise ValueError(f"IPC handle is for GPU {list(shared)}, this process's device {device} is {uuid}")
    size, stride, offset, storage_name, dtype_name, *rest = shared[uuid]
    storage_cls = {"TypedStorage": torch.storage.TypedStorage, "UntypedStorage": torch.UntypedStorage}[storage_name]
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(size), stride, offset, storage_cls, DTYPES_BY_NAME[dtype_name], device.index, *rest
    )


class HandleCache:
    """Opened CUDA IPC handles kept mapped: opening one (cudaIpcOpenMemHandle) costs far more than the copy of a
    model's tensors, and a sender shares the same memory update after update (a trainer's parameters, a server's
    staging buffer). Holding the tensor keeps torch's own cache of opened storages alive, so opening the same handle
    again only releases the sender's new reference. `keep_only` forgets what the last update did not use (the
    memory is the sender's: it is freed there once no process maps it), `clear` forgets everything (sleep)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def key(shared: dict) -> tuple:
        (plain,) = shared.values()
        # share()'s layout: size, stride, offset, storage class, dtype, then torch's handle, size and offset in bytes
        _size, _stride, _offset, _storage, _dtype, handle, size_bytes, offset_bytes, *_ = plain
        return (bytes(handle) if handle is not None else b"", int(size_bytes or 0), int(offset_bytes or 0))

    def open(self, shared: dict, device=None) -> torch.Tensor:
        tensor = open_shared(shared, device)
        with self._lock:
            self._held[self.key(shared)] = tensor
        return tensor

    def keep_only(self, keys) -> None:
        keys = set(keys)
        with self._lock:
            for key in [k for k in self._held if k not in keys]:
                del self._held[key]

    def clear(self) -> None:
        with self._lock:
            self._held.clear()

    def __len__(self) -> int:
        return len(self._held)


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global {module}.{name} refused: IPC handles are plain values only")


def dumps(value) -> bytes:
    return pickle.dumps(value, protocol=4)


def loads(data: bytes):
    return _PlainUnpickler(io.BytesIO(data)).load()


# ---- a version staged in GPU memory ----------------------------------------------------------------------------


class DeviceStaging:
    """Flat GPU buffers (staging layout) by version, in the rollout server's process: the one being received and
    the serving one (kept for a rollback). `release()` frees them (sleep)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._buffers: dict[int, tuple[list, torch.Tensor]] = {}  # version -> (tensors spec, flat buffer)
        self._serving: int | None = None
        self._spare: torch.Tensor | None = None

    def allocate(self, version: int, specs) -> torch.Tensor:
        slots, size = layout(specs)
        tensors = [[s.name, DTYPE_NAMES[s.dtype], list(s.shape), s.offset] for s in slots]
        with self._lock:
            old = self._buffers.pop(version, None)
            spare = old[1] if old is not None else self._spare
            if spare is not None and spare.numel() == size:
                flat = spare
                if spare is self._spare:
                    self._spare = None
            else:
                flat = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            self._buffers[version] = (tensors, flat)
            return flat

    def drop(self, version: int) -> None:
        with self._lock:
            if version != self._serving:
                entry = self._buffers.pop(version, None)
                if entry is not None and self._spare is None:
                    self._spare = entry[1]

    def info(self, version: int, host: UpdateInfo) -> DeviceUpdateInfo | None:
        """`host` pointed at the version's GPU buffer instead, for the vLLM worker (None: not staged here)."""
        with self._lock:
            entry = self._buffers.get(version)
        if entry is None:
            return None
        tensors, flat = entry
        torch.cuda.synchronize(self.device)
        return DeviceUpdateInfo(host.path, flat.numel(), tensors, host.tie_lm_head, ipc=share(flat))

    def committed(self, version: int) -> None:
        """`version` serves now: its buffer stays (rollback), an older one becomes the spare."""
        with self._lock:
            self._serving = version if version in self._buffers else None
            for other in [v for v in self._buffers if v != version]:
                _, flat = self._buffers.pop(other)
                if self._spare is None or self._spare.numel() < flat.numel():
                    self._spare = flat

    def release(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._serving = self._spare = None
        torch.cuda.empty_cache()


# ---- receiver --------------------------------------------------------------------------------------------------


class IpcReceiver:
    name = NAME

    def __init__(self, staging: DeviceStaging):
        self.staging = staging
        self.handles = HandleCache()  # the sender's tensors, mapped once while it shares the same memory
        self.last_timings: dict = {}
        self._offer = rollout_pb2.WeightTransportOffer(
            name=NAME, params={"host_id": host_id(), "gpu_uuid": gpu_uuid(staging.device)}
        )

    def offer(self) -> rollout_pb2.WeightTransportOffer:
        return self._offer

    def close(self) -> None:
        self.handles.clear()

    def release(self) -> None:
        """Unmaps the sender's memory (sleep)."""
        self.handles.clear()

    async def receive(self, store, header, staged, request_iterator, time_remaining):
        started = time.perf_counter()
        if not header.ipc.tensors:
            raise invalid(
                "header.ipc", "the ipc transport needs the packed buffer's handle in header.ipc", "MISSING_IPC"
            )
        manifest = staged.manifest
        specs = [(t.name, DTYPES_BY_NAME[_dtype_name(t.dtype)], tuple(t.shape)) for t in manifest.tensors]
        try:
            packed = check_packed(loads(header.ipc.tensors), layout(specs)[1], gpu_uuid(self.staging.device))
            await asyncio.to_thread(self._copy_in, staged.version, specs, packed)
        except Exception as exc:  # a bad or stale handle: this version fails, the serving one stays
            self.staging.drop(staged.version)
            err = exc if isinstance(exc, FabricError) else invalid("header.ipc", f"CUDA IPC: {exc}", "IPC_FAILED")
            store.fail(staged, err)
            raise err from None
        copied = time.perf_counter()
        for i, chunk in enumerate(manifest.chunks):
            store.mark(staged, i, chunk.length)
        result = await store.finish(staged, started)
        if not result.committed:
            self.staging.drop(staged.version)
        log.info(
            "ipc update to version %d: copy_s %.4f, commit_s %.4f, mapped %d, %s",
            staged.version,
            copied - started,
            time.perf_counter() - copied,
            len(self.handles),
            ", ".join(f"{k} {v:.4f}" for k, v in self.last_timings.items()),
        )
        return rollout_pb2.UpdateWeightsResponse(results=[result])

    def _copy_in(self, version: int, specs, packed: dict) -> None:
        device = self.staging.device
        with torch.cuda.device(device):
            flat = self.staging.allocate(version, specs)
            t0 = time.perf_counter()
            source = self.handles.open(packed, device)  # mapped once per sender buffer, then a cache hit
            t1 = time.perf_counter()
            flat[: source.numel()].copy_(source)
            torch.cuda.synchronize(device)
            self.handles.keep_only([HandleCache.key(packed)])
            self.last_timings = {"open_s": t1 - t0, "copy_s": time.perf_counter() - t1}


def check_packed(value, size: int, uuid: str) -> dict:
    """The header's handle, checked before torch sees it: one flat uint8 buffer of exactly the manifest's staging
    size, on this server's GPU, with handle fields of the types torch expects."""
    if not isinstance(value, dict) or set(value) != {uuid}:
        raise ValueError(f"expected one packed buffer on this server's GPU {uuid}")
    plain = value[uuid]
    if not isinstance(plain, tuple) or len(plain) != 13:
        raise ValueError("malformed handle")
    shape, stride, offset, storage, dtype, handle, size_bytes, offset_bytes, requires_grad, *rest = plain
    ref_handle, ref_offset, event_handle, event_sync = rest
    if (
        shape != (size,)
        or stride != (1,)
        or offset != 0
        or dtype != "uint8"
        or storage not in ("TypedStorage", "UntypedStorage")
    ):
        raise ValueError(f"the packed buffer must be uint8[{size}] (the manifest's layout), got {dtype}{list(shape)}")
    ints = (size_bytes, offset_bytes, ref_offset)
    if not all(isinstance(v, int) and 0 <= v < 2**48 for v in ints) or size_bytes < size:
        raise ValueError("handle sizes or offsets out of range")
    if not all(isinstance(v, bytes) and 0 < len(v) <= 4096 for v in (handle, ref_handle)):
        raise ValueError("memory handles must be bytes")
    if not (event_handle is None or isinstance(event_handle, bytes)) or not isinstance(event_sync, bool):
        raise ValueError("malformed event handle")
    if requires_grad is not False:
        raise ValueError("malformed handle")
    return value


def _dtype_name(proto_dtype) -> str:
    return DTYPE_NAMES[PROTO_TO_TORCH[proto_dtype]]


# ---- sender ----------------------------------------------------------------------------------------------------


def unusable(offer, source) -> str | None:
    device = source.device
    if device.type != "cuda":
        return f"the source tensors are on {device.type}: CUDA IPC needs them on a GPU"
    if offer.params.get("host_id") != host_id():
        return "the server runs on another host"
    mine = gpu_uuid(device)
    if offer.params.get("gpu_uuid") != mine:
        return f"the server's GPU ({offer.params.get('gpu_uuid')}) is not the source's ({mine})"
    return None


_PACKED: dict[str, torch.Tensor] = {}  # device -> the flat buffer pushes are packed into, kept for the next push


def pack(source) -> torch.Tensor:
    """The source's tensors in one flat buffer of the staging layout (fabric.weights.staging.layout), the same
    buffer push after push while the size is the same (so the server's mapping of it stays valid)."""
    slots, size = layout((n, t.dtype, tuple(t.shape)) for n, t in zip(source.names, source.tensors, strict=True))
    key = str(source.device)
    flat = _PACKED.get(key)
    if flat is None or flat.numel() != size:
        _PACKED.pop(key, None)
        flat = _PACKED[key] = torch.empty(size, dtype=torch.uint8, device=source.device)
    for slot, tensor in zip(slots, source.tensors, strict=True):
        if slot.nbytes:
            flat[slot.offset : slot.offset + slot.nbytes].copy_(tensor.reshape(-1).view(torch.uint8))
    torch.cuda.synchronize(source.device)
    return flat


def release_packed() -> None:
    """Frees the sender's packed buffers (e.g. before the trainer needs the memory back)."""
    _PACKED.clear()


async def send(job) -> list[rollout_pb2.WeightUpdateResult]:
    source = job.source
    started = time.perf_counter()
    flat = await asyncio.to_thread(pack, source)
    packed = time.perf_counter()
    header = rollout_pb2.UpdateWeightsHeader(
        weight_version=job.version,
        # One chunk per tensor: the bytes move as one buffer, so the 4 MiB chunks of the host paths would only be
        # thousands of entries for the server to check and mark (a 7B model: 3,881 chunks, 339 tensors).
        manifest=whole_tensor_manifest(source),
        transport=NAME,
        ipc=rollout_pb2.IpcHandles(gpu_uuid=gpu_uuid(source.device), tensors=dumps(share(flat))),
    )

    async def requests():
        yield rollout_pb2.UpdateWeightsRequest(header=header)

    async with job.channel() as channel:
        response = await rollout_pb2_grpc.RolloutServiceStub(channel).UpdateWeights(requests(), timeout=job.timeout)
    job.report.phases.update(pack_s=packed - started, update_rpc_s=time.perf_counter() - packed)
    return list(response.results)  # nothing crossed a wire: the server read the sender's GPU memory


def whole_tensor_manifest(source):
    """The source's manifest with each tensor one chunk, built once per source."""
    cached = getattr(source, "_whole_tensor_manifest", None)
    if cached is None:
        specs = ((n, t.dtype, tuple(t.shape)) for n, t in zip(source.names, source.tensors, strict=True))
        cached = source._whole_tensor_manifest = build_manifest(specs, chunk_bytes=2**62)
    return cached
