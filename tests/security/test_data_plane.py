"""Issue 21: the raw-TCP weight data plane before the token is checked. An outsider (raw sockets, no token) against a
real RolloutService over the fake engine with `security.token` set: it holds nothing big, not for long, not on many
connections, and a token that is not UTF-8 is answered; a token holder's push still commits."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

from fabric.v1 import rollout_pb2
from fabric.weights.sender import push_weights, weights_status
from fabric.weights.transports import tcp
from tests.rollout.fake_engine import fingerprint
from tests.rollout.test_servicer import fake_server
from tests.weights.test_versions import checkpoint, shm, source

__all__ = ["shm"]


def outsider(port: int, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(payload)
    return sock


def answer(sock: socket.socket, within: float) -> bytes | None:
    """What the server sends before closing (b"" if it just closes), or None if it still holds the connection."""
    sock.settimeout(within)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return got


def result_of(frame: bytes) -> rollout_pb2.WeightUpdateResult:
    (n,) = struct.unpack("<I", frame[:4])
    (result,) = rollout_pb2.UpdateWeightsResponse.FromString(frame[4 : 4 + n]).results
    return result


def run_with_server(body):
    async def go():
        async with fake_server() as (client, _, engine):
            port = (await weights_status(client.address)).tcp_data_port
            await asyncio.to_thread(body, port)
            report = await push_weights(source(7), [client.address], version=1, transport="tcp")
            return report, engine

    report, engine = asyncio.run(go())
    assert report.ok and engine.weights == fingerprint(checkpoint(7).items()), report.failed  # members still served


def test_a_64_mib_token_frame_is_refused_before_any_allocation(shm, token):
    def body(port):
        sock = outsider(port, tcp.MAGIC + struct.pack("<I", 64 * 1024 * 1024))
        got = answer(sock, within=5)
        assert got is not None, "the server still holds a connection that announced 64 MiB"
        assert result_of(got).error.reason == "UNAUTHENTICATED"

    run_with_server(body)


def test_a_silent_peer_is_dropped_at_the_header_deadline(shm, token, monkeypatch):
    monkeypatch.setattr(tcp, "HEADER_TIMEOUT_S", 1.0)

    def body(port):
        sock = outsider(port, tcp.MAGIC)
        t = time.monotonic()
        assert answer(sock, within=8) is not None, "a silent peer is held past the header deadline"
        assert time.monotonic() - t < 5

    run_with_server(body)


def test_a_token_that_is_not_utf8_is_answered_unauthenticated(shm, token):
    def body(port):
        sock = outsider(port, tcp.MAGIC + struct.pack("<I", 2) + b"\xff\xfe")
        got = answer(sock, within=5)
        assert got, "no answer to a token that is not UTF-8"
        assert result_of(got).error.reason == "UNAUTHENTICATED"

    run_with_server(body)


def test_connections_past_the_cap_are_closed_at_once(shm, token, monkeypatch):
    monkeypatch.setattr(tcp, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(tcp, "HEADER_TIMEOUT_S", 3.0)

    def body(port):
        held = [outsider(port, tcp.MAGIC) for _ in range(4)]
        time.sleep(0.3)
        extra = outsider(port, tcp.MAGIC)
        assert answer(extra, within=2) == b"", "a connection past the cap is held"
        for sock in held:
            sock.close()
        time.sleep(3.5)  # their slots come back once the server drops them

    run_with_server(body)
