"""The CUDA IPC path's host-side checks (the GPU run is bench/gpu_one.py): the handle cache's key is the memory
handle itself, and a header's packed-buffer handle is checked before torch sees any of it."""

from __future__ import annotations

import pytest

from fabric.weights.transports import ipc

UUID = "GPU-0000"


def plain(size=1024, **changes):
    """share()'s layout for a uint8[size] buffer: size, stride, offset, storage, dtype, handle, size_bytes,
    offset_bytes, requires_grad, ref-counter handle and offset, event handle, event sync."""
    fields = dict(shape=(size,), stride=(1,), offset=0, storage="TypedStorage", dtype="uint8", handle=b"h" * 64,
                  size_bytes=size, offset_bytes=4096, requires_grad=False, ref_handle=b"r" * 64, ref_offset=0,
                  event=b"e" * 64, sync=True)  # fmt: skip
    fields.update(changes)
    return tuple(fields.values())


def test_the_handle_cache_keys_on_the_memory_handle_and_offset():
    key = ipc.HandleCache.key({UUID: plain(size=1 << 30)})
    assert key == (b"h" * 64, 1 << 30, 4096)  # not a zero-filled bytes object the size of the buffer
    assert key != ipc.HandleCache.key({UUID: plain(size=1 << 30, offset_bytes=0)})


def test_a_packed_handle_of_the_manifests_size_on_this_gpu_passes():
    value = {UUID: plain()}
    assert ipc.check_packed(value, 1024, UUID) is value


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([plain()], "one packed buffer"),
        ({"GPU-other": plain()}, "one packed buffer"),
        ({UUID: plain()[:-1]}, "malformed"),
        ({UUID: plain(shape=(2048,))}, "uint8\\[1024\\]"),
        ({UUID: plain(dtype="float32")}, "uint8"),
        ({UUID: plain(offset=8)}, "uint8"),
        ({UUID: plain(size_bytes=10)}, "out of range"),
        ({UUID: plain(offset_bytes=-1)}, "out of range"),
        ({UUID: plain(offset_bytes=2**60)}, "out of range"),
        ({UUID: plain(handle="not bytes")}, "must be bytes"),
        ({UUID: plain(handle=b"")}, "must be bytes"),
        ({UUID: plain(event=123)}, "event"),
        ({UUID: plain(requires_grad=True)}, "malformed"),
    ],
)
def test_a_bad_packed_handle_is_refused_before_torch_sees_it(value, match):
    with pytest.raises(ValueError, match=match):
        ipc.check_packed(value, 1024, UUID)
