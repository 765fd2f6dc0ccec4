"""Allocations of many threads in one transaction (issue 13): what one store has queued for
different threads when a batch starts goes to the database together, the threads' rows locked in
one fixed order, and every outcome stays its own allocation's."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence

import psycopg
import pytest

from turnid.service.domain import Allocation, Turn, TurnIdError, TurnKind
from turnid.service.stores.postgres import PostgresStore

from .conftest import StoreMaker

pytestmark = pytest.mark.postgres

USER, COMPACTION = TurnKind.USER_INPUT, TurnKind.AUTO_COMPACTION
Commits = list[tuple[int, int, float]]


def counting(store: PostgresStore) -> Commits:
    calls: Commits = []
    store.on_commit = lambda allocations, turns, seconds: calls.append(
        (allocations, turns, seconds)
    )
    return calls


async def test_allocations_of_many_threads_commit_in_one_transaction(
    make_store: StoreMaker, thread_id: str
) -> None:
    store = await make_store()
    commits = counting(store)
    threads = [f"{thread_id}-{n}" for n in range(20)]
    allocations = [
        Allocation(t, (USER, COMPACTION)[n % 2], 1 + n % 3, f"r{n}") for n, t in enumerate(threads)
    ]
    # A second allocation of one thread joins the same transaction, decided after the first.
    allocations.append(Allocation(threads[0], USER, 2, "again"))
    results = await asyncio.gather(*(store.allocate(a) for a in allocations))
    assert [(a, t) for a, t, _ in commits] == [(21, sum(a.count for a in allocations))]
    assert [t.sequence for t in [*results[0], *results[-1]]] == [1, 2, 3]
    for allocation, turns in zip(allocations[1:-1], results[1:-1], strict=True):
        assert [t.sequence for t in turns] == list(range(1, allocation.count + 1))
        assert await store.list("", allocation.thread_id, 0, 10) == turns
    # Retries replay, in a batch as alone, and commit nothing.
    again = await asyncio.gather(*(store.allocate(a) for a in allocations))
    assert again == results
    assert len(commits) == 1


async def _lock_waiters(conn: psycopg.AsyncConnection[tuple[object, ...]], count: int) -> None:
    """Until `count` allocating transactions wait for a row lock (polled, with a deadline)."""
    deadline = time.monotonic() + 10
    while True:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%%INSERT INTO threads AS th%%'"
        )
        row = await cursor.fetchone()
        if row is not None and int(str(row[0])) >= count:
            return
        assert time.monotonic() < deadline, "the stores' batches never waited for the lock"
        await asyncio.sleep(0.01)  # polling the database for the event, not waiting it out


async def test_two_stores_batching_the_same_threads_in_opposite_orders_never_deadlock(
    make_store: StoreMaker, schema_url: str, thread_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="turnid.postgres")
    first, second = await make_store(), await make_store()
    commits = counting(first), counting(second)
    threads = [f"{thread_id}-{n:02d}" for n in range(40)]
    rounds = 4

    def race(r: int) -> asyncio.Future[list[list[Turn] | BaseException]]:
        return asyncio.gather(
            *(first.allocate(Allocation(t, USER, 1, f"a{r}")) for t in threads),
            *(second.allocate(Allocation(t, USER, 1, f"b{r}")) for t in reversed(threads)),
            return_exceptions=True,
        )

    # The first round creates the threads' rows (both stores insert them), the others lock
    # them. Each of these starts with the first thread of one store's order (the last of the
    # other's) locked elsewhere, so both batches are under way at once when it is released:
    # locking in arrival order, each would hold what the other waits for.
    assert not [o for o in await race(0) if isinstance(o, BaseException)]
    for r in range(1, rounds):
        async with await psycopg.AsyncConnection.connect(schema_url) as holder:
            await holder.execute(
                "SELECT 1 FROM threads WHERE namespace = '' AND thread_id = %s FOR UPDATE",
                (threads[0],),
            )
            racing = race(r)
            async with await psycopg.AsyncConnection.connect(schema_url) as watcher:
                await _lock_waiters(watcher, 2)
            await holder.rollback()
        assert not [o for o in await racing if isinstance(o, BaseException)]
    assert not [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    # Batches did go together: far fewer commits than allocations.
    assert sum(len(calls) for calls in commits) < rounds * 2 * len(threads) / 4
    for t in threads:
        turns = await first.list("", t, 0, 100)
        assert [turn.sequence for turn in turns] == list(range(1, 2 * rounds + 1))


async def test_refusals_in_a_batch_refuse_only_their_allocation(
    make_store: StoreMaker, thread_id: str
) -> None:
    store = await make_store()
    threads = [f"{thread_id}-{n}" for n in range(6)]
    await store.allocate(Allocation(threads[1], USER, 1, "used", claimed_turn_id="rollout-1"))
    await store.allocate(Allocation(threads[2], USER, 1, "kept"))
    commits = counting(store)
    outcomes = await asyncio.gather(
        store.allocate(Allocation(threads[0], USER, 1, "fine")),
        store.allocate(Allocation(threads[1], USER, 1, "dup", claimed_turn_id="rollout-1")),
        store.allocate(Allocation(threads[2], USER, 2, "kept")),  # the same id, another count
        store.allocate(Allocation(threads[3], USER, 1, expected_last_sequence=4)),
        store.allocate(Allocation(threads[4], COMPACTION, 1, "fine")),
        store.allocate(Allocation(threads[1], USER, 1, "after")),  # behind its thread's refusal
        store.allocate(Allocation(threads[5], USER, 3)),
        return_exceptions=True,
    )
    reasons = [o.reason if isinstance(o, TurnIdError) else None for o in outcomes]
    assert reasons == [None, "TURN_ID_TAKEN", "REQUEST_ID_REUSED", "THREAD_ADVANCED"] + [None] * 3
    assert [(a, t) for a, t, _ in commits] == [(4, 6)]
    granted = [o for o in outcomes if isinstance(o, Sequence)]
    assert [[t.sequence for t in turns] for turns in granted] == [[1], [1], [2], [1, 2, 3]]
    assert await store.get_thread("", threads[3]) is None  # nothing written for it


async def test_a_minted_id_colliding_in_a_batch_is_minted_again_and_fails_nothing(
    make_store: StoreMaker, thread_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from turnid.service.domain import allocation

    store = await make_store()
    threads = [f"{thread_id}-{n}" for n in range(5)]
    claimed = str(uuid.UUID(int=(int(time.time() * 1000) << 80) | (0x7 << 76) | (2 << 62)))
    await store.allocate(Allocation(threads[2], USER, 1, claimed_turn_id=claimed))
    # Every thread's first minted id is `claimed`: it collides in threads[2] only.
    from turnid.service.domain.minting import mint_uuid7_after as real

    monkeypatch.setattr(
        allocation, "mint_uuid7_after", lambda last: claimed if not last else real(last)
    )
    monkeypatch.setattr(allocation, "mint_uuid7s", lambda count: [claimed] * count)
    commits = counting(store)
    results: list[Sequence[Turn]] = await asyncio.gather(
        *(store.allocate(Allocation(t, USER, 1, f"r-{t}")) for t in threads)
    )
    assert [(a, t) for a, t, _ in commits] == [(5, 5)]  # the rolled-back attempt is not counted
    ids = [turns[0].turn_id for turns in results]
    assert ids[2] > claimed
    assert ids[:2] + ids[3:] == [claimed] * 4  # unique per thread: no collision there
    assert [t.turn_id for t in await store.list("", threads[2], 0, 10)] == [claimed, ids[2]]


async def test_a_thread_locked_elsewhere_fails_only_its_allocation(
    make_store: StoreMaker, schema_url: str, thread_id: str
) -> None:
    store = await make_store(lock_timeout_s=0.3)
    threads = [f"{thread_id}-{n}" for n in range(5)]
    await asyncio.gather(*(store.allocate(Allocation(t, USER, 1)) for t in threads))
    async with await psycopg.AsyncConnection.connect(schema_url) as holder:
        await holder.execute(
            "SELECT 1 FROM threads WHERE namespace = '' AND thread_id = %s FOR UPDATE",
            (threads[3],),
        )
        outcomes = await asyncio.gather(
            *(store.allocate(Allocation(t, USER, 1, "second")) for t in threads),
            return_exceptions=True,
        )
        await holder.rollback()
    reasons = [o.reason if isinstance(o, TurnIdError) else None for o in outcomes]
    assert reasons == [None, None, None, "STORE_UNAVAILABLE", None]
    assert all(o[0].sequence == 2 for o in outcomes if isinstance(o, Sequence))
    (turn,) = await store.allocate(Allocation(threads[3], USER, 1, "second"))
    assert turn.sequence == 2


@pytest.mark.parametrize("before", ["quick batches", "slow batches"])
async def test_a_batch_waiting_for_a_lock_does_not_hold_up_other_threads(
    make_store: StoreMaker, schema_url: str, thread_id: str, before: str
) -> None:
    """A batch that the database does not answer (a row lock held elsewhere, here) is stalled:
    the store starts another batch for the other threads, which commit while it waits. The
    stall bound follows how long batches take, up to a cap: after a run of batches that each
    waited seconds for a lock, too."""
    store = await make_store(lock_timeout_s=20, statement_timeout_s=20)
    stuck, free = f"{thread_id}-stuck", f"{thread_id}-free"
    for _ in range(3):
        await asyncio.gather(*(store.allocate(Allocation(t, USER, 1)) for t in (stuck, free)))
    if before == "slow batches":
        for _ in range(16):
            store._batch_took(2.0)  # what 16 batches that waited for lock_timeout leave behind
    async with await psycopg.AsyncConnection.connect(schema_url) as holder:
        await holder.execute(
            "SELECT 1 FROM threads WHERE namespace = '' AND thread_id = %s FOR UPDATE", (stuck,)
        )
        waiting = asyncio.ensure_future(store.allocate(Allocation(stuck, USER, 1, "waits")))
        async with await psycopg.AsyncConnection.connect(schema_url) as watcher:
            await _lock_waiters(watcher, 1)
        # Well within the lock's hold: behind the stalled batch it would wait until rollback.
        (turn,) = await asyncio.wait_for(store.allocate(Allocation(free, USER, 1, "goes")), 4)
        assert turn.sequence == 4
        assert not waiting.done()
        await holder.rollback()
    (turn,) = await waiting
    assert turn.sequence == 4
