"""Typed errors, decoded from the service's AIP-193 status (one ErrorInfo, maybe a BadRequest)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "turnid"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad request field, from the status's `google.rpc.BadRequest`."""

    field: str
    description: str


class TurnIdError(Exception):
    """A failed turnid call.

    `code` is the gRPC status code; `reason` the UPPER_SNAKE `ErrorInfo.reason` the service
    documents for each RPC (`""` when the status carried no ErrorInfo, for example a transport
    failure); `metadata` the ErrorInfo's metadata naming the offending values; `request_id`
    the idempotency key of a failed write (`""` for reads).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        request_id: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = MappingProxyType(dict(metadata or {}))
        self.field_violations = field_violations
        #: The request_id every attempt of the failed write carried ("" for reads). Pass it back
        #: (`client.allocate(..., request_id=error.request_id)`) to repeat the same logical step:
        #: if an attempt committed, the service returns the original turns.
        self.request_id = request_id

    def __str__(self) -> str:
        label = self.reason or self.code.name
        return f"{label}: {self.message}" if self.message else label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r}, metadata={dict(self.metadata)!r}, "
            f"request_id={self.request_id!r})"
        )


class InvalidArgument(TurnIdError):
    """INVALID_ARGUMENT: bad input (INVALID_THREAD_ID, INVALID_KIND, INVALID_COUNT, ...)."""


class Conflict(TurnIdError):
    """ALREADY_EXISTS: TURN_ID_TAKEN (claim) or REQUEST_ID_REUSED (a request_id reused)."""


class NotFound(TurnIdError):
    """NOT_FOUND: TURN_NOT_FOUND (`get`) or THREAD_NOT_FOUND (`get_thread`)."""


class FailedPrecondition(TurnIdError):
    """FAILED_PRECONDITION: THREAD_ADVANCED, a conditional write (`expected_last_sequence=`)
    found that the thread had moved on. Never retried: look again, then decide.

    `last_sequence` is the thread's last sequence when the write was refused (from the
    ErrorInfo metadata; -1 if the service sent none).
    """

    @property
    def last_sequence(self) -> int:
        try:
            return int(self.metadata.get("last_sequence", "-1"))
        except ValueError:
            return -1


class Unavailable(TurnIdError):
    """UNAVAILABLE: the service or its store cannot be reached, or the server is draining
    (SHUTTING_DOWN). The client retries these within the call's deadline with the same
    request_id; this is raised when the deadline runs out."""


class DeadlineExceeded(TurnIdError):
    """DEADLINE_EXCEEDED: the call's deadline passed before it completed. A write may have
    committed: repeat it with `request_id=error.request_id` to learn its outcome safely."""


class ResourceExhausted(TurnIdError):
    """RESOURCE_EXHAUSTED (OVERLOADED): the service is overloaded. Retried like UNAVAILABLE
    within the deadline; this is raised when the deadline runs out."""


class Cancelled(TurnIdError):
    """CANCELLED: the call was cancelled, by the server (retried for writes and reads within the
    deadline; this is raised when it runs out) or locally (the client was closed mid-call)."""


class Unauthenticated(TurnIdError):
    """UNAUTHENTICATED: MISSING_CREDENTIALS (no token where one is required) or
    INVALID_CREDENTIALS (unknown or malformed token)."""


class PermissionDenied(TurnIdError):
    """PERMISSION_DENIED: the credentials are valid but may not do this."""


class Internal(TurnIdError):
    """INTERNAL (INTERNAL_ERROR): an unexpected failure inside the service. Not retried.
    `correlation_id` names the server's log line about it ("" when absent)."""

    @property
    def correlation_id(self) -> str:
        return self.metadata.get("correlation_id", "")


_CLASSES: dict[grpc.StatusCode, type[TurnIdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INTERNAL: Internal,
}


def error_class(code: grpc.StatusCode) -> type[TurnIdError]:
    """The `TurnIdError` subclass for a status code (`TurnIdError` itself for the rest)."""
    return _CLASSES.get(code, TurnIdError)


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    # grpc.RpcError raised by a call is also a grpc.Call (sync) or an AioRpcError; both have
    # code(), details() and trailing_metadata() returning plain values.
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        return None
    return status


def error_from_rpc(error: grpc.RpcError, request_id: str = "") -> TurnIdError:
    """The typed error for a failed call, with ErrorInfo and BadRequest decoded when present."""
    code_method = getattr(error, "code", None)
    details_method = getattr(error, "details", None)
    code = code_method() if callable(code_method) else grpc.StatusCode.UNKNOWN
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = (details_method() if callable(details_method) else None) or ""
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    status = _rich_status(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and not reason:
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad_request.field_violations
                )
    return error_class(code)(
        code,
        message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=tuple(violations),
        request_id=request_id,
    )
