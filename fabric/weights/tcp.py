"""Framing of the raw-TCP weight data plane: the same messages as the UpdateWeights stream, fewer copies.

A Python gRPC stream moves about a third of what a raw socket does here (DESIGN.md), so the bulk bytes may travel
on a plain TCP connection that the receiver advertises in GetWeightsStatus.tcp_data_port. Framing:

    client: MAGIC, frame(auth token), frame(UpdateWeightsRequest with header),
            then per chunk: frame(WeightChunk without data) + the chunk's raw bytes, and frame(b"") to end
    server: frame(UpdateWeightsResponse)

frame(x) is a 4-byte little-endian length then x. The receiver reads chunk bytes straight into its staging buffer
(recv_into), checks the crc32c and forwards the same memory to the next server of a relay chain.
"""

from __future__ import annotations

import socket
import struct

MAGIC = b"FWT1"
_LEN = struct.Struct("<I")
MAX_FRAME = 64 * 1024 * 1024


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


def recv_frame(sock: socket.socket) -> bytes:
    (n,) = _LEN.unpack(recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise ConnectionError(f"frame of {n} bytes exceeds the {MAX_FRAME} limit")
    return recv_exact(sock, n)


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 8 * 1024 * 1024)
        except OSError:
            pass
