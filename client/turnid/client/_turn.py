"""The client's plain values: `TurnKind`, `Turn`, `Thread`, and turn-id parsing (no server)."""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

COMPACTION_PREFIX = "auto-compact-"

_COMPACTION = re.compile(r"auto-compact-(0|[1-9][0-9]*)")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class TurnKind(enum.IntEnum):
    """What a turn is, and so how its id is made. Numbers match `turnid.v1.TurnKind`."""

    #: Never valid in a request (the service refuses it with INVALID_KIND). A turn read from a
    #: newer service with a kind this client does not know also reads as UNSPECIFIED.
    UNSPECIFIED = 0
    #: A turn routed to a realtime delegate. Id: UUIDv7.
    REALTIME_DELEGATION = 1
    #: An automatic context compaction. Id: `auto-compact-N`, N counted per thread.
    AUTO_COMPACTION = 2
    #: An ordinary user turn. Id: UUIDv7.
    USER_INPUT = 3

    @classmethod
    def _missing_(cls, value: object) -> TurnKind | None:
        if isinstance(value, int):
            return cls.UNSPECIFIED
        return None

    @classmethod
    def parse(cls, text: str) -> TurnKind:
        """`realtime-delegation`, `REALTIME_DELEGATION`, `TURN_KIND_REALTIME_DELEGATION` or `1`."""
        name = text.strip().upper().replace("-", "_").removeprefix("TURN_KIND_")
        if name.isdigit():
            number = int(name)
            if number in cls._value2member_map_:
                return cls(number)
        elif name in cls.__members__:
            return cls[name]
        raise ValueError(f"unknown turn kind {text!r}")

    @property
    def label(self) -> str:
        """`realtime-delegation`, `auto-compaction`, `user-input` (for people and the CLI)."""
        return self.name.lower().replace("_", "-")


class TurnIdForm(enum.Enum):
    """Which shape a turn id has."""

    UUID7 = "uuid7"
    AUTO_COMPACTION = "auto-compaction"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ParsedTurnId:
    """A turn id taken apart: its form, and the UUID and timestamp or compaction index in it."""

    turn_id: str
    form: TurnIdForm
    #: The UUID, for UUIDv7 ids.
    uuid: uuid.UUID | None = None
    #: The millisecond timestamp embedded in a UUIDv7 id, as an aware UTC datetime.
    timestamp: datetime | None = None
    #: N of an `auto-compact-N` id.
    compaction_index: int | None = None


def parse_turn_id(turn_id: str) -> ParsedTurnId:
    """Tell a UUIDv7 (RFC 9562: version 7, variant 10), an `auto-compact-N` and anything else apart.

    Needs no server. UUIDs are recognised in the hyphenated 8-4-4-4-12 form (the form turnid
    mints, in lower case); any other UUID version, or other text, is `TurnIdForm.OTHER`.
    """
    match = _COMPACTION.fullmatch(turn_id)
    if match is not None:
        return ParsedTurnId(turn_id, TurnIdForm.AUTO_COMPACTION, compaction_index=int(match[1]))
    if _UUID.fullmatch(turn_id):
        value = uuid.UUID(turn_id)
        if value.version == 7 and value.variant == uuid.RFC_4122:
            millis = value.int >> 80
            stamp = datetime.fromtimestamp(millis / 1000, tz=UTC)
            return ParsedTurnId(turn_id, TurnIdForm.UUID7, uuid=value, timestamp=stamp)
    return ParsedTurnId(turn_id, TurnIdForm.OTHER)


@dataclass(frozen=True, slots=True)
class Turn:
    """One recorded turn of a thread. Immutable; sort a thread's history by `sequence`."""

    thread_id: str
    turn_id: str
    kind: TurnKind
    #: 1-based, gap-free position in the thread, across all kinds.
    sequence: int
    #: When the service recorded the turn (aware, UTC).
    create_time: datetime
    #: The request_id of the request that created the turn ("" when it had none).
    request_id: str
    #: True when the id was minted elsewhere and registered with `claim`.
    claimed: bool

    @property
    def compaction_index(self) -> int | None:
        """N of an `auto-compact-N` turn id, else None."""
        return parse_turn_id(self.turn_id).compaction_index

    @property
    def uuid_time(self) -> datetime | None:
        """The millisecond timestamp embedded in a UUIDv7 turn id (aware, UTC), else None.

        Only a hint across processes whose clocks differ; `sequence` is the order.
        """
        return parse_turn_id(self.turn_id).timestamp

    def parsed(self) -> ParsedTurnId:
        return parse_turn_id(self.turn_id)


@dataclass(frozen=True, slots=True)
class Thread:
    """Where a thread stands (`get_thread`). Immutable; times are aware UTC datetimes."""

    thread_id: str
    #: The sequence of the thread's last turn.
    last_sequence: int
    #: N of the next `auto-compact-N` the thread will hand out.
    next_compaction_index: int
    #: The thread's last turn (None only if the service sent none).
    last_turn: Turn | None
    #: When the thread's first turn was recorded.
    create_time: datetime
    #: When the thread's last turn was recorded.
    update_time: datetime
