"""A staged weight version: every tensor of one update laid out in a single shared-memory file.

The receiver writes chunks straight into it (one copy from the wire), and the vLLM worker process maps the same
file by path to load the weights (no copy through the engine's RPC pipe). The contract between the two sides is
`update_info()` / `tensors_from_update_info()`: an `UpdateInfo`, a path and a list of (name, dtype, shape, byte
offset); a version a GPU path staged in device memory (NCCL, CUDA IPC) is a `DeviceUpdateInfo`.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from fabric.weights.manifest import TORCH_TO_PROTO

ALIGN = 64  # tensor start alignment inside the file: views stay aligned for every dtype

DTYPE_NAMES: dict[torch.dtype, str] = {dtype: str(dtype).removeprefix("torch.") for dtype in TORCH_TO_PROTO}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class UpdateInfo:
    """Where a whole staged version lies, for the engine's commit: the staging file and its layout."""

    path: str
    size: int
    tensors: list  # [name, dtype name, shape, byte offset] per tensor
    # Tied embeddings: also load the input embedding as lm_head.weight, or the head would stay stale.
    tie_lm_head: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The plain form vLLM's update_info carries to the worker (fabric.rollout.vllm.transfer); shallow: the
        layout list is not deep-copied on every commit (vLLM serializes it to the worker anyway)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class DeviceUpdateInfo(UpdateInfo):
    """A version a GPU path (NCCL, CUDA IPC) staged in the server's device memory: `size` and `tensors` describe
    the flat device buffer, `ipc` its CUDA IPC handle (fabric.weights.transports.ipc.share)."""

    ipc: dict = field(default_factory=dict)


def shm_dir() -> str:
    """/dev/shm when there is one (memory-backed), else the temp dir."""
    return os.environ.get("FABRIC_SHM_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # byte offset in the staging file
    nbytes: int


def layout(specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[list[TensorSlot], int]:
    slots, cursor = [], 0
    for name, dtype, shape in specs:
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        slots.append(TensorSlot(name, dtype, tuple(int(d) for d in shape), cursor, nbytes))
        cursor += -(-nbytes // ALIGN) * ALIGN
    return slots, cursor


class StagingBuffer:
    """A memory-mapped file holding one version's tensors back to back."""

    def __init__(self, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], directory: str | None = None):
        self.slots, self.size = layout(specs)
        self.index = {slot.name: i for i, slot in enumerate(self.slots)}
        fd, self.path = tempfile.mkstemp(prefix="fabric-weights-", suffix=".bin", dir=directory or shm_dir())
        try:
            self._inode = os.fstat(fd).st_ino
            os.ftruncate(fd, max(self.size, 1))
            self._mmap = mmap.mmap(fd, max(self.size, 1))
        finally:
            os.close(fd)
        self._view = memoryview(self._mmap)

    def file_intact(self) -> bool:
        """The file is still there under its path (the engine's worker maps it by path), and is this buffer's."""
        try:
            return os.stat(self.path).st_ino == self._inode
        except OSError:
            return False

    def write(self, tensor_index: int, offset: int, data: bytes | memoryview) -> None:
        """Copies data into tensor `tensor_index` at byte `offset` (bounds are the caller's to check)."""
        start = self.slots[tensor_index].offset + offset
        self._view[start : start + len(data)] = data

    def read(self, tensor_index: int, offset: int, length: int) -> memoryview:
        start = self.slots[tensor_index].offset + offset
        return self._view[start : start + length]

    def tensor(self, i: int) -> torch.Tensor:
        slot = self.slots[i]
        raw = (
            torch.frombuffer(self._mmap, dtype=torch.uint8, count=slot.nbytes, offset=slot.offset)
            if slot.nbytes
            else torch.empty(0, dtype=torch.uint8)
        )
        return raw.view(slot.dtype).reshape(slot.shape)

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for i, slot in enumerate(self.slots):
            yield slot.name, self.tensor(i)

    def update_info(self, tie_lm_head: bool = False) -> UpdateInfo:
        """What a vLLM worker needs to map this buffer: plain data, cheap to send over the engine's RPC."""
        tensors = [[s.name, DTYPE_NAMES[s.dtype], list(s.shape), s.offset] for s in self.slots]
        return UpdateInfo(self.path, self.size, tensors, tie_lm_head)

    def close(self) -> None:
        """Unmaps and deletes the file. Views handed out before must not be used after."""
        try:
            self._view.release()
            self._mmap.close()
        except (BufferError, ValueError):
            pass  # a live tensor view still holds the map; the file is unlinked anyway and freed with it
        Path(self.path).unlink(missing_ok=True)

    @classmethod
    def from_named_tensors(cls, named: Iterable[tuple[str, torch.Tensor]], directory: str | None = None):
        """Stages tensors that are already in this process (tests, a local checkpoint)."""
        items = [(n, t.detach().contiguous().cpu()) for n, t in named]
        buf = cls([(n, t.dtype, tuple(t.shape)) for n, t in items], directory)
        for i, (_, t) in enumerate(items):
            buf.write(i, 0, t.view(torch.uint8).reshape(-1).numpy().data if t.numel() else b"")
        return buf


_mapped: tuple[tuple, torch.Tensor] | None = None  # worker side: the staging file mapped last, kept mapped


def _map(path: str, size: int) -> torch.Tensor:
    """The receiver reuses one staging file for version after version, so the worker keeps its mapping: mapping
    and faulting in a model's worth of pages again costs tens of ms a commit. Keyed by inode, not just the name:
    a name can come back for a new file, an inode cannot while this mapping holds it."""
    global _mapped
    st = os.stat(path)
    key = (path, st.st_dev, st.st_ino, size)
    if _mapped is None or _mapped[0] != key:
        _mapped = None  # the old file's pages go before the new ones come
        _mapped = (key, torch.from_file(path, shared=True, size=size, dtype=torch.uint8))
    return _mapped[1]


def tensors_from_update_info(info: UpdateInfo | dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Worker side: maps the staging file and yields (name, tensor) views over it (from the UpdateInfo, or the plain
    form the vLLM worker receives)."""
    if isinstance(info, UpdateInfo):
        info = info.to_dict()
    size = int(info["size"])
    if size == 0:
        return
    yield from tensor_views(_map(info["path"], size), info["tensors"])


def tensor_views(raw: torch.Tensor, tensors: list) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) views over a flat uint8 buffer laid out as update_info's [name, dtype, shape, offset] list."""
    for name, dtype_name, shape, offset in tensors:
        dtype = DTYPES_BY_NAME[dtype_name]
        numel = 1
        for d in shape:
            numel *= int(d)
        yield name, raw[offset : offset + numel * dtype.itemsize].view(dtype).reshape(shape)
