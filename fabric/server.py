"""What every fabric server shares: an asyncio gRPC server with health, reflection, message limits and a
graceful drain on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

# Weight chunks are a few MiB; leave headroom for big prompts too.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Calls (streams included) one server runs at once; more are refused RESOURCE_EXHAUSTED.
MAX_CONCURRENT_RPCS = 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Keepalive so that a dead peer on a long stream is noticed in seconds, not at TCP timeout.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # grpc-core times an unanswered ping out after this (60 s by default), not after keepalive_timeout_ms
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.so_reuseport", 0),
]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.ping_timeout_ms", 5_000),  # a silent peer is noticed in ~15 s, not ~70 s
]


class FabricServer:
    """Owns a grpc.aio.Server: registers servicers, health and reflection, binds, drains on shutdown."""

    def __init__(
        self,
        service_names: Sequence[str],
        register: Callable[[grpc.aio.Server], None],
        host: str = "127.0.0.1",
        port: int = 0,
        interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None,
        credentials: grpc.ServerCredentials | None = None,
        on_drain: Callable[[float], Awaitable[None]] | None = None,
        max_concurrent_rpcs: int | None = MAX_CONCURRENT_RPCS,
    ):
        from fabric import security

        sec = security.current()  # the process's `security` section: token interceptor, TLS credentials
        if interceptors is None:
            interceptors = sec.server_interceptors()
        credentials = credentials or sec.server_credentials()
        self.service_names = list(service_names)
        self.server = grpc.aio.server(
            interceptors=[*interceptors, DecodeGuard()],
            options=SERVER_OPTIONS,
            maximum_concurrent_rpcs=max_concurrent_rpcs,  # beyond it: RESOURCE_EXHAUSTED, not unbounded memory
        )
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.server
        )
        address = f"{host}:{port}"
        self.port = (
            self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        )
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        self.host = host
        self.on_drain = on_drain
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        await self.server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 10.0) -> None:
        """Drain: health says NOT_SERVING, new calls are refused, running ones get `grace` seconds."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        if self.on_drain is not None:
            await self.on_drain(grace)
        await self.server.stop(grace)

    async def serve_forever(self, grace: float = 10.0, ready: Callable[[str], None] | None = None) -> None:
        """Starts, reports the bound address, and runs until SIGTERM/SIGINT, then drains and returns."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready:
            ready(self.address)
        waiter = asyncio.create_task(self.server.wait_for_termination())
        await asyncio.wait([waiter, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        log.info("shutting down: draining for up to %.0f s", grace)
        await self.stop(grace)


def print_ready(kind: str) -> Callable[[str], None]:
    """The line a launcher waits for: `fabric <kind> server listening on HOST:PORT`."""

    def ready(address: str) -> None:
        print(f"fabric {kind} server listening on {address}", flush=True)

    return ready


class _Unparseable:
    """What the guarded deserializer hands on instead of raising: the bytes were no message of the RPC's type."""

    def __init__(self, error: Exception):
        self.error = error


async def _refuse(context, item: _Unparseable) -> None:
    from fabric.errors import abort, invalid

    message = f"bytes do not parse as this RPC's message ({type(item.error).__name__}): send a valid message"
    await abort(context, invalid("request", message, "UNPARSEABLE_MESSAGE"))


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the RPC's request type get INVALID_ARGUMENT (gRPC itself would answer UNKNOWN on a
    unary call, or let a stream end silently)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def safe_decode(data: bytes):
            try:
                return decode(data)
            except Exception as exc:  # protobuf's DecodeError and friends
                return _Unparseable(exc)

        kwargs = dict(request_deserializer=safe_decode, response_serializer=handler.response_serializer)
        if handler.request_streaming:
            inner = handler.stream_stream or handler.stream_unary
            # Servicers may read their requests in a task of their own, where an abort would not end the call:
            # the guard ends the request stream instead, and the call is refused once the handler has returned
            # (what arrived before the bad bytes is answered, nothing is lost).
            bad: list[_Unparseable] = []

            async def guarded(request_iterator):
                async for item in request_iterator:
                    if isinstance(item, _Unparseable):
                        bad.append(item)
                        return
                    yield item

            async def refuse_if_bad(context):
                if bad:
                    await _refuse(context, bad[0])

            if handler.response_streaming:

                async def stream_stream(request_iterator, context):
                    async for response in _responses(inner(guarded(request_iterator), context)):
                        yield response
                    await refuse_if_bad(context)

                return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)

            async def stream_unary(request_iterator, context):
                response = await inner(guarded(request_iterator), context)
                await refuse_if_bad(context)
                return response

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)

        inner = handler.unary_stream or handler.unary_unary

        async def check(request, context):
            if isinstance(request, _Unparseable):
                await _refuse(context, request)

        if handler.response_streaming:

            async def unary_stream(request, context):
                await check(request, context)
                async for response in _responses(inner(request, context)):
                    yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)

        async def unary_unary(request, context):
            await check(request, context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)


async def _responses(result):
    """A streaming handler is an async generator, or a coroutine that writes with context.write: serve both."""
    if inspect.isasyncgen(result):
        async for response in result:
            yield response
    else:
        await result
