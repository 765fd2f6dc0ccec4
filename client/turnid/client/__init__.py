"""turnid's Python client: thin, typed and retry-safe.

    from turnid.client import TurnIdClient

    with TurnIdClient("127.0.0.1:50051") as turnid:
        turn = turnid.auto_compaction("thread-42")   # Turn(turn_id='auto-compact-0', ...)

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
    Turn,
    TurnIdForm,
    TurnKind,
    parse_turn_id,
)
from turnid.client.aio import AsyncTurnIdClient
from turnid.client.errors import (
    Conflict,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TurnIdError,
    Unavailable,
)
from turnid.client.sync import TurnIdClient

__all__ = [
    "COMPACTION_PREFIX",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "AsyncTurnIdClient",
    "Conflict",
    "ConnectOptions",
    "DeadlineExceeded",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "ParsedTurnId",
    "ResourceExhausted",
    "RetryEvent",
    "RetryPolicy",
    "Turn",
    "TurnIdClient",
    "TurnIdError",
    "TurnIdForm",
    "TurnKind",
    "Unavailable",
    "new_request_id",
    "parse_turn_id",
]
