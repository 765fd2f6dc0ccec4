"""Plain values of the domain: kinds, turns, threads and allocation requests."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

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


class Replayed(list[Turn]):
    """The answer to an allocation whose request_id the thread had seen: its original turns,
    answered again, nothing written. Every store returns one for a replay, so that the
    servicer can count replays apart from new turns (metrics)."""

    __slots__ = ()


# Turn(...) costs ~1.9 µs: a frozen dataclass's __init__ sets each field through
# object.__setattr__. Setting the slots through their descriptors makes the same value in about
# half of that; the paths that make turns by the thousand (a batch, a page, a replay) use it.
_new_object = object.__new__
(
    _set_thread_id,
    _set_turn_id,
    _set_kind,
    _set_sequence,
    _set_create_time_us,
    _set_request_id,
    _set_claimed,
) = (
    Turn.__dict__[name].__set__
    for name in (
        "thread_id",
        "turn_id",
        "kind",
        "sequence",
        "create_time_us",
        "request_id",
        "claimed",
    )
)


def make_turn(
    thread_id: str,
    turn_id: str,
    kind: TurnKind,
    sequence: int,
    create_time_us: int,
    request_id: str,
    claimed: bool,
) -> Turn:
    """The same Turn as `Turn(...)` with these arguments, in about half the time."""
    turn: Turn = _new_object(Turn)
    _set_thread_id(turn, thread_id)
    _set_turn_id(turn, turn_id)
    _set_kind(turn, kind)
    _set_sequence(turn, sequence)
    _set_create_time_us(turn, create_time_us)
    _set_request_id(turn, request_id)
    _set_claimed(turn, claimed)
    return turn


class TurnRun(Sequence[Turn]):
    """The turns one allocation grants: consecutive sequences from `first_sequence`, one
    `turn_ids` entry each, and every other field the same. An allocation's answer is a run,
    not a list of Turns: a batch's thousand turns are one value that the stores write (the
    ids and what they share) and the servicer answers from without a Turn apiece (1,000 Turns
    cost 0.4-0.5 ms of the writer thread's CPU, which a batch's group commit waits for); a
    Turn is made only when one is asked for (indexing, iterating), equal to the one the run
    stands for. A run compares equal to any sequence of the same turns, a list included.
    """

    __slots__ = (
        "claimed",
        "create_time_us",
        "first_sequence",
        "kind",
        "request_id",
        "thread_id",
        "turn_ids",
    )

    def __init__(
        self,
        thread_id: str,
        turn_ids: list[str],
        kind: TurnKind,
        first_sequence: int,
        create_time_us: int,
        request_id: str,
        claimed: bool,
    ) -> None:
        self.thread_id = thread_id
        self.turn_ids = turn_ids
        self.kind = kind
        self.first_sequence = first_sequence
        self.create_time_us = create_time_us
        self.request_id = request_id
        self.claimed = claimed

    def __len__(self) -> int:
        return len(self.turn_ids)

    @overload
    def __getitem__(self, index: int) -> Turn: ...

    @overload
    def __getitem__(self, index: slice) -> list[Turn]: ...

    def __getitem__(self, index: int | slice) -> Turn | list[Turn]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self.turn_ids)))]
        turn_id = self.turn_ids[index]  # IndexError past the end, as a list's
        if index < 0:
            index += len(self.turn_ids)
        return make_turn(
            self.thread_id,
            turn_id,
            self.kind,
            self.first_sequence + index,
            self.create_time_us,
            self.request_id,
            self.claimed,
        )

    def __iter__(self) -> Iterator[Turn]:
        ids = self.turn_ids
        thread_id, kind, when = self.thread_id, self.kind, self.create_time_us
        request_id, claimed, first = self.request_id, self.claimed, self.first_sequence
        if len(ids) == 1:  # a unary call's: no list, no loop
            return iter((make_turn(thread_id, ids[0], kind, first, when, request_id, claimed),))
        return iter(
            [
                make_turn(thread_id, turn_id, kind, first + i, when, request_id, claimed)
                for i, turn_id in enumerate(ids)
            ]
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which do not hash

    def __repr__(self) -> str:
        return f"TurnRun({list(self)!r})"


@dataclass(frozen=True, slots=True)
class Allocation:
    """One validated request for new turns: `count` turns of `kind` in one thread.

    A claim is an allocation of one turn whose id was minted elsewhere (`claimed_turn_id`).
    `expected_last_sequence` makes it conditional. Stores apply it with `decide()`
    (domain/allocation.py) at the thread's serialization point, in one transaction.
    """

    thread_id: str
    kind: TurnKind
    count: int
    request_id: str = ""
    claimed_turn_id: str | None = None
    namespace: str = ""
    expected_last_sequence: int | None = None

    @property
    def compactions(self) -> int:
        """How far this allocation advances the thread's compaction counter."""
        return self.count if self.kind is TurnKind.AUTO_COMPACTION else 0

    @property
    def mints(self) -> bool:
        """Whether its ids are UUIDv7s minted by turnid (not claimed, not counted)."""
        return self.claimed_turn_id is None and self.kind is not TurnKind.AUTO_COMPACTION

    def same_request(self, kind: int, count: int, claimed_turn_id: str | None) -> bool:
        """Whether a stored request (by request_id) asked for exactly this."""
        return (
            kind == self.kind
            and count == self.count
            and (claimed_turn_id or None) == self.claimed_turn_id
        )


@dataclass(frozen=True, slots=True)
class ThreadState:
    """A thread's counters, as a store keeps them in its threads row.

    `last_minted` is the greatest UUIDv7 turnid minted in the thread (invariant 8);
    `max_claimed` the greatest claimed id (text order), so minted ids are checked against the
    thread's claims only when they could collide with one.
    """

    next_sequence: int = 1
    next_compaction: int = 0
    last_minted: str = ""
    max_claimed: str = ""
    create_time_us: int = 0
    update_time_us: int = 0

    @property
    def last_sequence(self) -> int:
        return self.next_sequence - 1


NEW_THREAD = ThreadState()


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What a request_id was used for in a thread, and where its turns start."""

    kind: int
    count: int
    claimed_turn_id: str | None
    first_sequence: int


@dataclass(frozen=True, slots=True)
class ThreadInfo:
    """Where a thread stands (GetThread)."""

    thread_id: str
    state: ThreadState
    last_turn: Turn
