"""Plain values of the domain: kinds, turns and allocation requests."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from turnid.service.domain.minting import mint_uuid7

COMPACTION_PREFIX = "auto-compact-"


class TurnKind(enum.IntEnum):
    """Numbers match turnid.v1.TurnKind."""

    REALTIME_DELEGATION = 1
    AUTO_COMPACTION = 2
    USER_INPUT = 3


@dataclass(frozen=True, slots=True)
class Turn:
    thread_id: str
    turn_id: str
    kind: TurnKind
    sequence: int
    create_time_us: int  # microseconds since the Unix epoch, UTC
    request_id: str  # "" when the request carried none
    claimed: bool


@dataclass(frozen=True, slots=True)
class Allocation:
    """One validated request for new turns: `count` turns of `kind` in one thread.

    A claim is an allocation of one turn whose id was minted elsewhere (`claimed_turn_id`).
    Stores apply it in one transaction: a known request_id returns the original turns
    (or is refused when the parameters differ), else counters are bumped and turns inserted.
    """

    thread_id: str
    kind: TurnKind
    count: int
    request_id: str = ""
    claimed_turn_id: str | None = None

    def turn_ids(self, first_compaction_index: int) -> list[str]:
        """The ids of the new turns, given the thread's next compaction index."""
        if self.claimed_turn_id is not None:
            return [self.claimed_turn_id]
        if self.kind is TurnKind.AUTO_COMPACTION:
            start = first_compaction_index
            return [f"{COMPACTION_PREFIX}{n}" for n in range(start, start + self.count)]
        return [mint_uuid7() for _ in range(self.count)]

    @property
    def compactions(self) -> int:
        """How far this allocation advances the thread's compaction counter."""
        return self.count if self.kind is TurnKind.AUTO_COMPACTION else 0

    def same_request(self, kind: int, count: int, claimed_turn_id: str | None) -> bool:
        """Whether a stored request (by request_id) asked for exactly this."""
        return (
            kind == self.kind
            and count == self.count
            and (claimed_turn_id or None) == self.claimed_turn_id
        )
