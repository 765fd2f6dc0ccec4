"""turnid's Python client: thin, typed and retry-safe.

    from turnid.client import TurnIdClient

    with TurnIdClient("127.0.0.1:50051") as turnid:
        turn = turnid.auto_compaction("thread-42")   # Turn(turn_id='auto-compact-0', ...)
        with turnid.watch("thread-42") as watch:      # every turn, then live ones
            for turn in watch:
                ...

`AsyncTurnIdClient` has the same surface for asyncio. Nothing here imports the service.
"""

from turnid.client._core import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    NO_RETRY,
    ConnectOptions,
    RetryEvent,
    RetryPolicy,
    new_request_id,
)
from turnid.client._turn import (
    COMPACTION_PREFIX,
    ParsedTurnId,
    Thread,
    Turn,
    TurnIdForm,
    TurnKind,
    parse_turn_id,
)
from turnid.client.aio import AsyncTurnIdClient, AsyncTurnWatch
from turnid.client.errors import (
    Cancelled,
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TurnIdError,
    Unauthenticated,
    Unavailable,
)
from turnid.client.sync import TurnIdClient, TurnWatch

__all__ = [
    "COMPACTION_PREFIX",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "AsyncTurnIdClient",
    "AsyncTurnWatch",
    "Cancelled",
    "Conflict",
    "ConnectOptions",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "ParsedTurnId",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryEvent",
    "RetryPolicy",
    "Thread",
    "Turn",
    "TurnIdClient",
    "TurnIdError",
    "TurnIdForm",
    "TurnKind",
    "TurnWatch",
    "Unauthenticated",
    "Unavailable",
    "new_request_id",
    "parse_turn_id",
]
