"""Errors as the fabric answers them: a gRPC status code, a message that says what to fix, and
google.rpc.ErrorInfo details (reason, field) that any client can act on."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from fabric.v1 import common_pb2

DOMAIN = "fabric.v1"
# Errors echo parts of the request (a tensor name, a tag); a status travels in HTTP/2 trailers, which clients cap
# (16 KiB by default), so an unbounded echo would turn INVALID_ARGUMENT into RESOURCE_EXHAUSTED.
MAX_MESSAGE_CHARS = 1024
MAX_FIELD_CHARS = 256


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class FabricError(Exception):
    """An error with the status code and field it should be reported under."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", field: str = ""):
        message = _cap(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = _cap(reason or code.name, MAX_FIELD_CHARS)
        self.field = _cap(field, MAX_FIELD_CHARS)

    def to_proto(self) -> common_pb2.Error:
        return common_pb2.Error(code=self.code.value[0], message=self.message, reason=self.reason, field=self.field)

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata={"field": self.field})
        detail = any_pb2.Any()
        detail.Pack(info)
        return rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail]))


def did_you_mean(name: str, known) -> str:
    """' (did you mean 'x'?)' for the closest known name, or ''."""
    import difflib

    match = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def invalid(field: str, message: str, reason: str = "INVALID_FIELD") -> FabricError:
    return FabricError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", reason, field)


def precondition(message: str, reason: str = "FAILED_PRECONDITION", field: str = "") -> FabricError:
    return FabricError(grpc.StatusCode.FAILED_PRECONDITION, message, reason, field)


def unavailable(message: str, reason: str = "UNAVAILABLE") -> FabricError:
    return FabricError(grpc.StatusCode.UNAVAILABLE, message, reason)


def internal(message: str, reason: str = "INTERNAL") -> FabricError:
    return FabricError(grpc.StatusCode.INTERNAL, message, reason)


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call, if the server sent one (client side)."""
    status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None
