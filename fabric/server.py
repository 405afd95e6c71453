"""What every fabric server shares: an asyncio gRPC server with health, reflection, message limits, one
interceptor that maps errors to statuses, and a graceful drain on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fabric import security
from fabric.channels import MAX_CONCURRENT_RPCS, OPEN_CALL_SLOTS, SERVER_OPTIONS
from fabric.errors import FabricError, invalid

log = logging.getLogger(__name__)


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
        open_call_slots: int = OPEN_CALL_SLOTS,
    ):
        sec = security.current()  # the process's `security` section: token interceptor, TLS credentials
        if interceptors is None:
            interceptors = sec.server_interceptors()
        credentials = credentials or sec.server_credentials()
        self.service_names = list(service_names)
        # Calls that need no token (health) have a budget of their own on top of everyone else's, so they cannot
        # take the slots of authenticated calls.
        total = max_concurrent_rpcs + open_call_slots if max_concurrent_rpcs is not None else None
        self.server = grpc.aio.server(
            interceptors=[OpenCallBudget(open_call_slots), *interceptors, ErrorInterceptor()],
            options=SERVER_OPTIONS,
            maximum_concurrent_rpcs=total,  # beyond it: RESOURCE_EXHAUSTED, not unbounded memory
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


class OpenCallBudget(grpc.aio.ServerInterceptor):
    """At most `slots` calls at once to the methods open without a token (health); more get RESOURCE_EXHAUSTED."""

    def __init__(self, slots: int):
        self.slots = slots
        self.active = 0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(security.OPEN_METHOD_PREFIXES):
            return handler
        kwargs = dict(
            request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
        message = f"more than {self.slots} open health calls at once: close some (a Watch lasts until closed)"

        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                if self.active >= self.slots:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
                self.active += 1
                try:
                    async for response in _responses(inner_stream(request, context)):
                        yield response
                finally:
                    self.active -= 1

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary_unary(request, context):
                if self.active >= self.slots:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
                self.active += 1
                try:
                    return await inner_unary(request, context)
                finally:
                    self.active -= 1

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
        return handler


class _Unparseable:
    """What the guarded deserializer hands on instead of raising: the bytes were no message of the RPC's type."""

    def __init__(self, error: Exception):
        self.error = error


def _unparseable(item: _Unparseable) -> FabricError:
    message = f"bytes do not parse as this RPC's message ({type(item.error).__name__}): send a valid message"
    return invalid("request", message, "UNPARSEABLE_MESSAGE")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The one place errors become statuses. Handlers and the domain code under them raise FabricError; this ends
    the call with its status code and google.rpc.ErrorInfo details. It also answers bytes that do not parse as the
    RPC's request type with INVALID_ARGUMENT (gRPC itself would answer UNKNOWN on a unary call, or let a stream end
    silently)."""

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
            # Servicers may read their requests in a task of their own, where an error would not end the call:
            # the guard ends the request stream instead, and the call is refused once the handler has returned
            # (what arrived before the bad bytes is answered, nothing is lost).
            bad: list[_Unparseable] = []

            async def guarded(request_iterator):
                async for item in request_iterator:
                    if isinstance(item, _Unparseable):
                        bad.append(item)
                        return
                    yield item

            if handler.response_streaming:

                async def stream_stream(request_iterator, context):
                    try:
                        async for response in _responses(inner(guarded(request_iterator), context)):
                            yield response
                        if bad:
                            raise _unparseable(bad[0])
                    except FabricError as err:
                        await context.abort_with_status(err.to_status())
                    except grpc.aio.AbortError:
                        raise
                    except Exception as exc:  # a bug, not the caller's: its text stays in the log
                        await _internal(context, handler_call_details.method, exc)

                return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)

            async def stream_unary(request_iterator, context):
                try:
                    response = await inner(guarded(request_iterator), context)
                    if bad:
                        raise _unparseable(bad[0])
                    return response
                except FabricError as err:
                    await context.abort_with_status(err.to_status())
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # a bug, not the caller's: its text stays in the log
                    await _internal(context, handler_call_details.method, exc)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)

        inner = handler.unary_stream or handler.unary_unary

        if handler.response_streaming:

            async def unary_stream(request, context):
                try:
                    if isinstance(request, _Unparseable):
                        raise _unparseable(request)
                    async for response in _responses(inner(request, context)):
                        yield response
                except FabricError as err:
                    await context.abort_with_status(err.to_status())
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # a bug, not the caller's: its text stays in the log
                    await _internal(context, handler_call_details.method, exc)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)

        async def unary_unary(request, context):
            try:
                if isinstance(request, _Unparseable):
                    raise _unparseable(request)
                return await inner(request, context)
            except FabricError as err:
                await context.abort_with_status(err.to_status())
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # a bug, not the caller's: its text stays in the log
                await _internal(context, handler_call_details.method, exc)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)


async def _internal(context, method: str, exc: Exception) -> None:
    """An unexpected error: the client gets a generic message and an id; the server's log has the id and the trace."""
    error_id = uuid.uuid4().hex[:12]
    log.error("unexpected error %s in %s", error_id, method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (id {error_id}): the server's log has the details")


async def _responses(result):
    """A streaming handler is an async generator, or a coroutine that writes with context.write: serve both."""
    if inspect.isasyncgen(result):
        async for response in result:
            yield response
    else:
        await result
