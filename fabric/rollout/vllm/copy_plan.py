"""The copies a model's `load_weights` makes, recorded once and replayed as one batched copy.

A weight update over CUDA IPC or NCCL lands in a flat staging buffer whose layout (names, dtypes, shapes, offsets)
is the same version after version. vLLM's `load_weights` walks every tensor in Python (name mapping, stacked
q/k/v and gate/up shards, a weight loader per parameter): about 20 ms for a Qwen2 model on an H200 whatever its
size, several times the device copies themselves. So the first update records, under a TorchFunctionMode, every
`copy_` the loaders make (a destination view of a parameter, a source view of the staging buffer) and every constant
fill (padding rows); later updates of the same layout replay them in order, the copies batched with
`torch._foreach_copy_`, the sources rebuilt over that update's buffer.

A plan is only kept when replaying it is exactly what the loaders did: every parameter write was a `copy_` whose
source is a plain view of the staging buffer (no dtype conversion or arithmetic on the way) or a fill with a
constant, and nothing else wrote a parameter in place. Otherwise `record` returns None and every update goes
through `load_weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

_COPY = {torch.Tensor.copy_, torch.ops.aten.copy_.default}
_FILL = {torch.Tensor.fill_, torch.Tensor.zero_}


@dataclass(frozen=True)
class _Source:
    """A view of the staging buffer: its dtype, storage offset (in elements of that dtype), size and stride."""

    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def over(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype, device=flat.device).set_(
            flat.untyped_storage(), self.offset, self.size, self.stride
        )


class CopyPlan:
    """The loaders' writes in order: runs of copies (replayed as one foreach copy each) and constant fills (the
    padding rows of a vocabulary, say)."""

    def __init__(self, steps: list[tuple[torch.Tensor, _Source | float]]):
        self.steps = steps

    def __len__(self) -> int:
        return len(self.steps)

    @torch.no_grad()
    def replay(self, flat: torch.Tensor) -> None:
        destinations: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        for dst, what in self.steps:
            if isinstance(what, _Source):
                destinations.append(dst)
                sources.append(what.over(flat))
                continue
            if destinations:
                torch._foreach_copy_(destinations, sources)
                destinations, sources = [], []
            dst.fill_(what)
        if destinations:
            torch._foreach_copy_(destinations, sources)


class _Recorder(TorchFunctionMode):
    def __init__(self, flat: torch.Tensor, parameters: Iterable[torch.Tensor]):
        super().__init__()
        self.flat_storage = flat.untyped_storage().data_ptr()
        self.param_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.steps: list[tuple[torch.Tensor, _Source | float]] = []
        self.unplannable: str | None = None

    def _writes_a_parameter(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() in self.param_storages

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _COPY and len(args) >= 2 and self._writes_a_parameter(args[0]):
            dst, src = args[0], args[1]
            if not (isinstance(src, torch.Tensor) and src.untyped_storage().data_ptr() == self.flat_storage):
                self.unplannable = self.unplannable or "a parameter was copied from a tensor computed on the way"
            elif src.dtype != dst.dtype or tuple(src.shape) != tuple(dst.shape):
                self.unplannable = self.unplannable or "a copy converted its source (dtype or broadcast)"
            else:
                self.steps.append(
                    (dst, _Source(src.dtype, src.storage_offset(), tuple(src.size()), tuple(src.stride())))
                )
        elif func in _FILL and self._writes_a_parameter(args[0]) and not kwargs:
            value = 0.0 if func is torch.Tensor.zero_ else args[1] if len(args) == 2 else None
            if isinstance(value, int | float):
                self.steps.append((args[0], float(value)))
            else:
                self.unplannable = self.unplannable or "a parameter was filled with a tensor"
        elif self._in_place(func, args, kwargs):
            self.unplannable = self.unplannable or f"{getattr(func, '__name__', func)} wrote a parameter in place"
        return func(*args, **kwargs)

    def _in_place(self, func, args, kwargs) -> bool:
        name = getattr(func, "__name__", "")
        if "out" in kwargs and self._writes_a_parameter(kwargs["out"]):
            return True
        if name == "__setitem__" or (name.endswith("_") and not name.startswith("_")):
            return bool(args) and self._writes_a_parameter(args[0])
        return False


def record(load: Callable[[], None], flat: torch.Tensor, parameters: Iterable[torch.Tensor]) -> CopyPlan | None:
    """Runs `load` (the model's load_weights over views of `flat`) and returns its copies as a plan, or None when
    they cannot be replayed as plain copies (see the module doc)."""
    recorder = _Recorder(flat, list(parameters))
    with recorder:
        load()
    if recorder.unplannable is not None or not recorder.steps:
        return None
    return CopyPlan(recorder.steps)
