"""The domain: what a turn is, the rules for allocating one, and nothing of gRPC."""

from turnid.service.domain.allocation import Grant, Replay, decide
from turnid.service.domain.errors import ErrorCategory, FieldViolation, TurnIdError
from turnid.service.domain.model import (
    NEW_THREAD,
    Allocation,
    Replayed,
    RequestRecord,
    ThreadInfo,
    ThreadState,
    Turn,
    TurnKind,
    TurnRun,
)
from turnid.service.domain.turns import TurnService, WatchUpdate, WriteRequest
from turnid.service.domain.watch import ChangeFeed

__all__ = [
    "NEW_THREAD",
    "Allocation",
    "ChangeFeed",
    "ErrorCategory",
    "FieldViolation",
    "Grant",
    "Replay",
    "Replayed",
    "RequestRecord",
    "ThreadInfo",
    "ThreadState",
    "Turn",
    "TurnIdError",
    "TurnKind",
    "TurnRun",
    "TurnService",
    "WatchUpdate",
    "WriteRequest",
    "decide",
]
