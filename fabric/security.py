"""Transport security and authentication for every fabric process: TLS, mutual TLS and a bearer token.

Off by default (loopback). A top-level `security` section turns it on, and every process reads the same one:
```yaml
security:
  token_file: /etc/fabric/token        # or token: "..." (a shared secret; clients send `authorization: Bearer <token>`)
  tls_cert: /etc/fabric/server.pem     # this process's certificate (also its client certificate under mTLS)
  tls_key: /etc/fabric/server.key
  tls_ca: /etc/fabric/ca.pem           # the CA that signed the peers' certificates
  require_client_cert: true            # mutual TLS: servers refuse clients without a certificate from tls_ca
```
A process calls `configure(SecurityConfig.from_cfg(cfg))` once; servers (fabric.server.FabricServer) and every
channel the fabric opens (`channel()` / `sync_channel()`) then follow it. Health checks stay open (no token), so load
balancers and launchers can probe. With TLS on, the weight paths TLS does not cover (raw TCP, gloo, NCCL) are not
offered unless `unprotected_weight_paths` lists them (weights go over gRPC/TLS, or IPC on one host).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

from fabric.channels import CHANNEL_OPTIONS
from fabric.config.loader import ConfigError, check_keys

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
SECURITY_KEYS = {
    "token", "token_file", "tls_cert", "tls_key", "tls_ca", "require_client_cert", "server_name",
    "unprotected_weight_paths",
}  # fmt: skip
# Weight data paths that TLS does not cover (their bytes cross the network in clear, checked by digest only): under
# TLS a rollout server offers them only when `security.unprotected_weight_paths` lists them.
UNPROTECTED_WEIGHT_PATHS = ("tcp", "gloo", "nccl")


@dataclass(frozen=True)
class SecurityConfig:
    token: str | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_ca: bytes | None = None
    require_client_cert: bool = False
    server_name: str | None = None  # TLS name to verify when addresses are IPs the certificate does not list
    unprotected_weight_paths: frozenset[str] = frozenset()  # offered under TLS all the same (the config says so)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None or self.tls_ca is not None

    @classmethod
    def from_cfg(cls, cfg) -> SecurityConfig:
        section = cfg.get("security") if cfg is not None else None
        if not section:
            return cls()
        check_keys(section, SECURITY_KEYS, "security")

        def read(key: str) -> bytes | None:
            path = section.get(key)
            if not path:
                return None
            file = Path(str(path))
            if not file.is_file():
                raise ConfigError(f"security.{key}", f"file not found: {file}")
            return file.read_bytes()

        token = section.get("token")
        if section.get("token_file"):
            token = (read("token_file") or b"").decode().strip()
        if token is not None and not str(token).strip():
            raise ConfigError("security.token", "is empty: set a secret or remove the key")
        cert, key, ca = read("tls_cert"), read("tls_key"), read("tls_ca")
        if (cert is None) != (key is None):
            raise ConfigError(
                "security.tls_key" if key is None else "security.tls_cert", "tls_cert and tls_key go together"
            )
        require = bool(section.get("require_client_cert", False))
        if require and (ca is None or cert is None):
            raise ConfigError("security.require_client_cert", "mutual TLS needs tls_ca, tls_cert and tls_key")
        paths = section.get("unprotected_weight_paths") or []
        if isinstance(paths, str) or not all(p in UNPROTECTED_WEIGHT_PATHS for p in paths):
            raise ConfigError(
                "security.unprotected_weight_paths",
                f"a list of {', '.join(UNPROTECTED_WEIGHT_PATHS)} (paths offered under TLS though TLS does not "
                f"cover them), got {paths!r}",
            )
        return cls(
            str(token) if token is not None else None, cert, key, ca, require, section.get("server_name"),
            frozenset(paths),
        )  # fmt: skip

    def offers_weight_path(self, name: str) -> bool:
        """Under TLS, a path TLS does not cover is offered only when the config lists it."""
        return not self.tls or name not in UNPROTECTED_WEIGHT_PATHS or name in self.unprotected_weight_paths

    # ---- server side ------------------------------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)], root_certificates=self.tls_ca, require_client_auth=self.require_client_cert
        )

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [BearerTokenInterceptor(self.token)] if self.token else []

    # ---- client side ------------------------------------------------------------------------------------------

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca, private_key=self.tls_key, certificate_chain=self.tls_cert
        )

    def options(self, options) -> list:
        extra = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return [*options, *extra]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless `authorization: Bearer <token>` matches (constant-time); health stays open."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        if hmac.compare_digest(given.encode(), self.expected.encode()):
            return handler
        message = "missing bearer token: send `authorization: Bearer <token>`" if not given else "invalid bearer token"
        return _deny(handler, message)


def _deny(handler, message: str):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator, as a streaming handler must be)

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)


class _AddMetadata:
    """Adds the bearer token to every call of an aio channel (one instance per call type: grpc.aio files an
    interceptor under the first interceptor class it matches)."""

    def __init__(self, metadata):
        self.extra = tuple(metadata)

    def _details(self, details):
        return details._replace(metadata=list(details.metadata or ()) + list(self.extra))


class _UnaryUnary(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _UnaryStream(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamUnary(_AddMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_AddMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def _token_interceptors(metadata) -> list:
    return [cls(metadata) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


_current = SecurityConfig()


def configure(config: SecurityConfig) -> None:
    """Sets this process's security: every FabricServer and channel() made afterwards follows it."""
    global _current
    _current = config


def current() -> SecurityConfig:
    return _current


def channel(address: str, options=None, security: SecurityConfig | None = None) -> grpc.aio.Channel:
    """An asyncio channel to a fabric server, with TLS and the token as configured."""
    sec = security or _current
    opts = sec.options(options if options is not None else CHANNEL_OPTIONS)
    interceptors = _token_interceptors(sec.metadata()) if sec.token else None
    credentials = sec.channel_credentials()
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)


def sync_channel(address: str, options=None, security: SecurityConfig | None = None) -> grpc.Channel:
    """A blocking channel (threads, tools), same security; the token rides as call metadata via an interceptor."""
    sec = security or _current
    opts = sec.options(options if options is not None else CHANNEL_OPTIONS)
    credentials = sec.channel_credentials()
    base = (
        grpc.secure_channel(address, credentials, options=opts)
        if credentials
        else grpc.insecure_channel(address, options=opts)
    )
    if not sec.token:
        return base
    return grpc.intercept_channel(base, _SyncMetadataInterceptor(sec.metadata()))


class _SyncMetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, metadata):
        self.extra = metadata

    def _details(self, details):
        return _SyncDetails(
            details.method,
            details.timeout,
            list(details.metadata or ()) + list(self.extra),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression
