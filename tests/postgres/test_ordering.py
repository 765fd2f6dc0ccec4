"""Invariant 8 across replicas (UUIDv7 order is history order) and conditional allocation races:
three stores on one schema stand for three replicas of the service."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import psycopg
import pytest

from turnid.service.domain import Allocation, Turn, TurnIdError, TurnKind
from turnid.service.domain.minting import mint_uuid7
from turnid.service.stores.postgres import PostgresStore

from .conftest import StoreMaker

pytestmark = pytest.mark.postgres

REALTIME, COMPACTION, USER = (
    TurnKind.REALTIME_DELEGATION,
    TurnKind.AUTO_COMPACTION,
    TurnKind.USER_INPUT,
)
IN_FLIGHT = 48  # concurrent allocations at any moment (16 per replica)


async def three(make_store: StoreMaker) -> list[PostgresStore]:
    return [await make_store(pool_max=16) for _ in range(3)]


async def allocate_concurrently(
    stores: list[PostgresStore], allocations: list[Allocation]
) -> list[list[Turn]]:
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(k: int, allocation: Allocation) -> list[Turn]:
        async with gate:
            return await stores[k % len(stores)].allocate(allocation)

    return await asyncio.gather(*(one(k, a) for k, a in enumerate(allocations)))


def assert_history_order(turns: list[Turn]) -> None:
    assert [t.sequence for t in turns] == list(range(1, len(turns) + 1))
    minted = [t.turn_id for t in turns if t.kind is not COMPACTION and not t.claimed]
    assert minted == sorted(minted) and len(set(minted)) == len(minted)


async def test_uuid_order_is_sequence_order_across_three_replicas(
    make_store: StoreMaker, thread_id: str
) -> None:
    stores = await three(make_store)
    kinds = (REALTIME, USER, COMPACTION, USER)
    allocations = [
        Allocation(thread_id, kinds[k % 4], 1 + (k % 7 == 0) * 3, f"r{k}") for k in range(2000)
    ]
    # A few claims of ids that sort among the minted ones: they do not count (invariant 8).
    allocations += [
        Allocation(thread_id, USER, 1, f"c{k}", claimed_turn_id=mint_uuid7()) for k in range(20)
    ]
    results = await allocate_concurrently(stores, allocations)
    turns = await stores[0].list("", thread_id, 0, 100_000)
    assert sorted((t for r in results for t in r), key=lambda t: t.sequence) == turns
    assert_history_order(turns)
    compactions = [t.turn_id for t in turns if t.kind is COMPACTION]
    assert compactions == [f"auto-compact-{n}" for n in range(len(compactions))]


async def test_ids_follow_a_thread_minted_by_a_clock_ahead_of_ours(
    make_store: StoreMaker, schema_url: str, thread_id: str
) -> None:
    """A replica whose clock is a day ahead minted the thread's last id: the others must not
    go back in time, they take its millisecond and a higher counter."""
    stores = await three(make_store)
    (first,) = await stores[0].allocate(Allocation(thread_id, USER, 1))
    now_ms = uuid.UUID(first.turn_id).int >> 80
    ahead = str(uuid.UUID(int=(now_ms + 86_400_000) << 80 | 0x7 << 76 | 0b10 << 62 | 12345))
    async with await psycopg.AsyncConnection.connect(schema_url, autocommit=True) as conn:
        # What the fast replica's commit left: its turn and the thread's last minted id.
        await conn.execute(
            "INSERT INTO turns (namespace, thread_id, sequence, turn_id, kind, request_id, "
            "claimed, create_time_us) VALUES ('', %s, 2, %s, %s, '', false, 0)",
            (thread_id, ahead, int(USER)),
        )
        await conn.execute(
            "UPDATE threads SET next_sequence = 3, last_minted = %s "
            "WHERE namespace = '' AND thread_id = %s",
            (ahead, thread_id),
        )
    allocations = [Allocation(thread_id, (REALTIME, USER)[k % 2], 1 + k % 3) for k in range(300)]
    await allocate_concurrently(stores, allocations)
    turns = await stores[1].list("", thread_id, 0, 100_000)
    assert len(turns) == 2 + sum(a.count for a in allocations)
    assert_history_order(turns)
    assert all(t.turn_id[:13] == ahead[:13] for t in turns[1:])  # the fast clock's millisecond


async def test_conditional_allocation_race_has_one_winner_per_round(
    make_store: StoreMaker, thread_id: str
) -> None:
    stores = await three(make_store)
    racers, rounds = 16, 60
    for last in range(rounds):
        outcomes = await asyncio.gather(
            *(
                stores[r % 3].allocate(
                    Allocation(
                        thread_id,
                        (REALTIME, COMPACTION, USER)[r % 3],
                        1,
                        f"round{last}-racer{r}",
                        expected_last_sequence=last,
                    )
                )
                for r in range(racers)
            ),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if isinstance(o, Sequence)]
        losers = [o for o in outcomes if isinstance(o, TurnIdError)]
        assert len(winners) == 1 and len(losers) == racers - 1, outcomes
        assert winners[0][0].sequence == last + 1
        assert {(e.reason, e.metadata["last_sequence"]) for e in losers} == {
            ("THREAD_ADVANCED", str(last + 1))
        }
        # A retry of the winner replays it, though the thread has moved on.
        (won,) = winners[0]
        again = Allocation(thread_id, won.kind, 1, won.request_id, expected_last_sequence=last)
        assert await stores[(last + 1) % 3].allocate(again) == [won]
    turns = await stores[0].list("", thread_id, 0, 1000)
    assert [t.sequence for t in turns] == list(range(1, rounds + 1))
