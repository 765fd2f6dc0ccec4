"""Domain errors: a category (mapped to a status code by the transport), a reason, metadata.

Reasons are part of the API contract (see protos/turnid/v1/turnid.proto); clients branch on them.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("turnid.errors")


class ErrorCategory(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


@dataclass(eq=False)
class TurnIdError(Exception):
    category: ErrorCategory
    reason: str
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    field_violations: Sequence[FieldViolation] = ()

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def invalid_field(reason: str, field_name: str, message: str, **metadata: str) -> TurnIdError:
    return TurnIdError(
        ErrorCategory.INVALID_ARGUMENT,
        reason,
        message,
        metadata,
        (FieldViolation(field_name, message),),
    )


def turn_not_found(thread_id: str, turn_id: str) -> TurnIdError:
    return TurnIdError(
        ErrorCategory.NOT_FOUND,
        "TURN_NOT_FOUND",
        f"thread has no turn {turn_id!r}",
        {"thread_id": thread_id, "turn_id": turn_id},
    )


def turn_id_taken(thread_id: str, turn_id: str) -> TurnIdError:
    return TurnIdError(
        ErrorCategory.ALREADY_EXISTS,
        "TURN_ID_TAKEN",
        f"thread already has a turn {turn_id!r}",
        {"thread_id": thread_id, "turn_id": turn_id},
    )


def request_id_reused(thread_id: str, request_id: str) -> TurnIdError:
    return TurnIdError(
        ErrorCategory.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
        "request_id was already used in this thread for a different request",
        {"thread_id": thread_id, "request_id": request_id},
    )


def thread_not_found(thread_id: str) -> TurnIdError:
    return TurnIdError(
        ErrorCategory.NOT_FOUND,
        "THREAD_NOT_FOUND",
        "thread has no turns",
        {"thread_id": thread_id},
    )


def thread_advanced(thread_id: str, last_sequence: int, expected: int) -> TurnIdError:
    return TurnIdError(
        ErrorCategory.FAILED_PRECONDITION,
        "THREAD_ADVANCED",
        f"the thread's last sequence is {last_sequence}, not the expected {expected}",
        {
            "thread_id": thread_id,
            "last_sequence": str(last_sequence),
            "expected_last_sequence": str(expected),
        },
    )


def store_unavailable(detail: str) -> TurnIdError:
    """The store cannot serve the call now. `detail` goes to the server log, never to the
    client: driver messages name hosts, users and SQL (invariant 7)."""
    log.warning("store unavailable: %s", detail)
    return TurnIdError(
        ErrorCategory.UNAVAILABLE,
        "STORE_UNAVAILABLE",
        "the turn store is unavailable; retry with the same request_id",
    )


def disk_full() -> TurnIdError:
    log.error("the database's disk is full")
    return TurnIdError(
        ErrorCategory.RESOURCE_EXHAUSTED,
        "STORAGE_FULL",
        "the turn store's disk is full; retry with the same request_id once space is freed",
    )


def shutting_down() -> TurnIdError:
    return TurnIdError(
        ErrorCategory.UNAVAILABLE,
        "SHUTTING_DOWN",
        "the server is shutting down; retry (another replica or after restart)",
    )


def internal_error(correlation_id: str) -> TurnIdError:
    return TurnIdError(
        ErrorCategory.INTERNAL,
        "INTERNAL_ERROR",
        f"internal error; the server log has the details under correlation id {correlation_id}",
        {"correlation_id": correlation_id},
    )


def overloaded(queued: int) -> TurnIdError:
    return TurnIdError(
        ErrorCategory.RESOURCE_EXHAUSTED,
        "OVERLOADED",
        "too many allocations are queued; back off and retry with the same request_id",
        {"queued": str(queued)},
    )
