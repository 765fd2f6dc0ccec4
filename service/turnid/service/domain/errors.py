"""Domain errors: a category (mapped to a status code by the transport), a reason, metadata.

Reasons are part of the API contract (see protos/turnid/v1/turnid.proto); clients branch on them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class ErrorCategory(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"


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


def store_unavailable(detail: str) -> TurnIdError:
    return TurnIdError(
        ErrorCategory.UNAVAILABLE,
        "STORE_UNAVAILABLE",
        f"the turn store is unavailable; retry with the same request_id ({detail})",
        {"detail": detail[:200]},
    )


def overloaded(queued: int) -> TurnIdError:
    return TurnIdError(
        ErrorCategory.RESOURCE_EXHAUSTED,
        "OVERLOADED",
        "too many allocations are queued; back off and retry with the same request_id",
        {"queued": str(queued)},
    )
