"""The allocation decision: one pure function that every store calls at its serialization
point, so the stores cannot disagree (replay, reuse, conditions, taken ids, counters, minting).

A store holds the thread's lock (SQLite's write lock, PostgreSQL's row lock, the memory store's
event loop), reads what `decide` needs, calls it, and writes what it returns (or nothing, when
it raises or replays) in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from turnid.service.domain.errors import request_id_reused, thread_advanced, turn_id_taken
from turnid.service.domain.minting import mint_uuid7_after, mint_uuid7s, uuid7_successor
from turnid.service.domain.model import (
    COMPACTION_PREFIX,
    Allocation,
    RequestRecord,
    ThreadState,
    TurnKind,
    TurnRun,
)


@dataclass(frozen=True, slots=True)
class Replay:
    """The request_id was seen: return the turns at these sequences, write nothing."""

    first_sequence: int
    count: int


@dataclass(frozen=True, slots=True)
class Grant:
    """New turns: write them, the thread's new state, and the request record (if any)."""

    turns: TurnRun
    state: ThreadState
    record: RequestRecord | None


def decide(
    allocation: Allocation,
    state: ThreadState,
    seen: RequestRecord | None,
    is_taken: Callable[[str], bool],
    now_us: int,
) -> Replay | Grant:
    """Decide one allocation against the thread as it stands.

    `state` is the thread's row (NEW_THREAD when it has none), `seen` what the allocation's
    request_id was used for before (None when new or empty), `is_taken(turn_id)` whether the
    thread already has that id. Raises TurnIdError for a refusal (REQUEST_ID_REUSED,
    THREAD_ADVANCED, TURN_ID_TAKEN); nothing is to be written then.
    """
    thread_id = allocation.thread_id
    if seen is not None:
        if not allocation.same_request(seen.kind, seen.count, seen.claimed_turn_id):
            raise request_id_reused(thread_id, allocation.request_id)
        return Replay(seen.first_sequence, seen.count)
    expected = allocation.expected_last_sequence
    if expected is not None and expected != state.last_sequence:
        raise thread_advanced(thread_id, state.last_sequence, expected)

    claimed = allocation.claimed_turn_id
    last_minted, max_claimed = state.last_minted, state.max_claimed
    if claimed is not None:
        if is_taken(claimed):
            raise turn_id_taken(thread_id, claimed)
        turn_ids = [claimed]
        max_claimed = max(max_claimed, claimed)
    elif allocation.kind is TurnKind.AUTO_COMPACTION:
        start = state.next_compaction
        turn_ids = [f"{COMPACTION_PREFIX}{n}" for n in range(start, start + allocation.count)]
    else:
        # The generator's ids increase: when its next one sorts above the thread's last minted
        # id and its greatest claim, so do the ones after it (a batch's thousand, minted at
        # once with no check apiece). A thread whose claims sort above every UUIDv7 (say,
        # "rollout-7") takes the careful path every time, so only one id is minted to look.
        turn_ids = mint_uuid7s(1)
        if turn_ids[0] > last_minted and turn_ids[0] > max_claimed:
            if allocation.count > 1:
                turn_ids += mint_uuid7s(allocation.count - 1)
        else:
            turn_ids = []
            for _ in range(allocation.count):
                minted = mint_uuid7_after(last_minted)
                # A claimed id can only collide with a minted one if it sorts at or above it.
                while minted <= max_claimed and is_taken(minted):
                    minted = uuid7_successor(minted)
                turn_ids.append(minted)
                last_minted = minted
        last_minted = turn_ids[-1]

    first = state.next_sequence
    kind = allocation.kind
    request_id = allocation.request_id
    turns = TurnRun(thread_id, turn_ids, kind, first, now_us, request_id, claimed is not None)
    new_state = ThreadState(
        next_sequence=first + len(turn_ids),
        next_compaction=state.next_compaction + allocation.compactions,
        last_minted=last_minted,
        max_claimed=max_claimed,
        create_time_us=state.create_time_us or now_us,
        update_time_us=now_us,
    )
    record = RequestRecord(int(kind), allocation.count, claimed, first) if request_id else None
    return Grant(turns, new_state, record)
