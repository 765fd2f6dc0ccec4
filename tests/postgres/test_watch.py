"""WatchTurns on PostgreSQL (invariant 11): a watcher on one replica sees turns that another
replica allocated, woken by NOTIFY, and, where a notification is lost, by the fallback re-read or
the listener's reconnect."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator

import psycopg
import pytest
from psycopg import sql

from turnid.service.domain import Allocation, TurnKind, TurnService, WatchUpdate
from turnid.service.stores.postgres import NOTIFY_CHANNEL, PostgresStore, notify_channel

from .conftest import POSTGRES_DSN, StoreMaker, with_search_path

pytestmark = pytest.mark.postgres

USER = TurnKind.USER_INPUT
WAIT_S = 20.0  # an upper bound for an event that should take milliseconds


async def next_update(watch: AsyncGenerator[WatchUpdate, None]) -> WatchUpdate:
    async with asyncio.timeout(WAIT_S):
        return await anext(watch)


async def started_watch(
    store: PostgresStore, thread_id: str, namespace: str = ""
) -> AsyncGenerator[WatchUpdate, None]:
    watch = await TurnService(store).watch(thread_id, 0, namespace=namespace)
    first = await next_update(watch)
    assert first == WatchUpdate([], True)
    return watch


async def insert_behind_the_stores_back(url: str, thread_id: str, sequence: int) -> str:
    """A claimed turn committed without NOTIFY (as if the notification had been lost); the
    thread must exist."""
    turn_id = f"raw-{uuid.uuid4()}"
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO turns (namespace, thread_id, sequence, turn_id, kind, request_id, "
            "claimed, create_time_us) VALUES ('', %s, %s, %s, %s, '', true, 0)",
            (thread_id, sequence, turn_id, int(USER)),
        )
        await conn.execute(
            "UPDATE threads SET next_sequence = %s WHERE namespace = '' AND thread_id = %s",
            (sequence + 1, thread_id),
        )
    return turn_id


async def test_a_watcher_sees_another_replicas_turns_by_notify(make_store: StoreMaker) -> None:
    # No fallback re-read: only a notification can wake the watcher.
    watching = await make_store(watch_fallback_s=None)
    writing = await make_store()
    # Any printable character may appear in ids: the payload must carry them intact.
    for namespace, thread_id in (("", f"w-{uuid.uuid4()}"), ('n"s\\', f"ü\"\\'{uuid.uuid4()}")):
        watch = await started_watch(watching, thread_id, namespace)
        await asyncio.wait_for(watching.listening.wait(), WAIT_S)
        try:
            for n in range(3):
                turns = await writing.allocate(
                    Allocation(thread_id, USER, 2, f"r{n}", namespace=namespace)
                )
                update = await next_update(watch)
                assert update == WatchUpdate(turns, True)
        finally:
            await watch.aclose()
    assert watching.changes.watchers == 0


async def test_a_lost_notification_is_covered_by_the_fallback_read(
    make_store: StoreMaker, schema_url: str, thread_id: str
) -> None:
    store = await make_store(watch_fallback_s=0.1)
    (first,) = await store.allocate(Allocation(thread_id, USER, 1))
    watch = await TurnService(store).watch(thread_id, 0)
    try:
        assert await next_update(watch) == WatchUpdate([first], True)
        turn_id = await insert_behind_the_stores_back(schema_url, thread_id, 2)
        (update,) = (await next_update(watch)).turns
        assert (update.turn_id, update.sequence) == (turn_id, 2)
    finally:
        await watch.aclose()


async def test_the_listener_reconnects_and_wakes_every_watcher(
    make_store: StoreMaker, schema_url: str, thread_id: str
) -> None:
    tag = f"turnid-test-{uuid.uuid4().hex[:12]}"
    watching = await make_store(url=f"{schema_url}&application_name={tag}", watch_fallback_s=None)
    writing = await make_store()
    watch = await started_watch(watching, thread_id)
    await asyncio.wait_for(watching.listening.wait(), WAIT_S)
    try:
        # Committed unnoticed, then the listener's connection dies: on reconnecting it must
        # assume it missed notifications and wake every watcher.
        await writing.allocate(Allocation(thread_id, USER, 1))
        update = await next_update(watch)  # by NOTIFY
        turn_id = await insert_behind_the_stores_back(schema_url, thread_id, 2)
        async with await psycopg.AsyncConnection.connect(schema_url, autocommit=True) as admin:
            cursor = await admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s AND query LIKE 'LISTEN%%'",
                (tag,),
            )
            assert await cursor.fetchone() == (1,)
        update = await next_update(watch)
        assert [t.turn_id for t in update.turns] == [turn_id]
        # ... and it listens again.
        await asyncio.wait_for(watching.listening.wait(), WAIT_S)
        turns = await writing.allocate(Allocation(thread_id, USER, 1))
        assert await next_update(watch) == WatchUpdate(turns, True)
    finally:
        await watch.aclose()


def test_each_schema_has_a_channel_of_its_own_and_public_keeps_the_old_one() -> None:
    assert notify_channel("public") == notify_channel(None) == NOTIFY_CHANNEL == "turnid_turns"
    names = ["a", "b", "turnid_test_x", "Ünïcode schema", "x" * 63]
    channels = [notify_channel(name) for name in names]
    assert len(set(channels)) == len(names)
    assert channels == [notify_channel(name) for name in names]  # every replica agrees
    for channel in channels:  # a plain identifier: LISTEN takes it unquoted
        assert channel.isidentifier() and channel.islower() and len(channel) <= 63


def _hearing(store: PostgresStore) -> tuple[list[str], asyncio.Event]:
    """What the store's listener receives from now on, and an event set at each payload."""
    heard: list[str] = []
    got = asyncio.Event()
    original = store._on_notify

    def record(payload: str) -> None:
        heard.append(payload)
        got.set()
        original(payload)

    store._on_notify = record  # type: ignore[method-assign]
    return heard, got


async def test_deployments_in_other_schemas_do_not_hear_each_other(
    make_store: StoreMaker, thread_id: str
) -> None:
    assert POSTGRES_DSN
    other = f"turnid_test_{uuid.uuid4().hex[:16]}"
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(other)))
    watches: list[AsyncGenerator[WatchUpdate, None]] = []
    try:
        here = await make_store()
        there = await make_store(url=with_search_path(POSTGRES_DSN, other))
        assert here.channel != there.channel
        # A store listens only while someone watches it.
        for store in (here, there):
            watches.append(await started_watch(store, f"w-{uuid.uuid4()}"))
        await asyncio.wait_for(here.listening.wait(), WAIT_S)
        await asyncio.wait_for(there.listening.wait(), WAIT_S)
        heard_here, got_here = _hearing(here)
        heard_there, got_there = _hearing(there)
        # Each listener hears its own store's notifications (and ignores them). Here's is sent
        # and heard before there allocates; a listener receives notifications in commit order,
        # so on one channel there's listener would have heard here's first.
        await here.allocate(Allocation(thread_id, USER, 1))
        await asyncio.wait_for(got_here.wait(), WAIT_S)
        await there.allocate(Allocation(thread_id, USER, 1))
        await asyncio.wait_for(got_there.wait(), WAIT_S)
        assert any(here._replica in payload for payload in heard_here)
        assert heard_there and all(here._replica not in payload for payload in heard_there)
    finally:
        for watch in watches:
            await watch.aclose()
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as admin:
            await admin.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(other))
            )


async def _listen_backends(url: str, tag: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = %s AND query LIKE 'LISTEN%%'",
            (tag,),
        )
        (count,) = await cursor.fetchone() or (0,)
        return int(count)


async def test_a_replica_listens_only_while_someone_watches_it(
    make_store: StoreMaker, schema_url: str, thread_id: str
) -> None:
    tag = f"turnid-test-{uuid.uuid4().hex[:12]}"
    idle = await make_store(url=f"{schema_url}&application_name={tag}", listen_linger_s=0.05)
    writing = await make_store()
    witness = await make_store(watch_fallback_s=None)
    heard_idle, got_idle = _hearing(idle)
    heard_witness, got_witness = _hearing(witness)
    replica = writing._replica
    witnessed = await started_watch(witness, thread_id)
    await asyncio.wait_for(witness.listening.wait(), WAIT_S)
    watch = None
    try:
        # Nobody watches `idle`: it holds no LISTEN. The witness hears the writer's
        # notification, so it was sent and delivered to the listeners, and `idle` is none.
        turns = await writing.allocate(Allocation(thread_id, USER, 1))
        await _until_heard(heard_witness, got_witness, replica, 1)
        assert not idle.listening.is_set()
        assert await _listen_backends(schema_url, tag) == 0
        assert heard_idle == []
        # A watcher makes it listen; it hears the others from then on.
        watch = await TurnService(idle).watch(thread_id, 0)
        assert await next_update(watch) == WatchUpdate(turns, True)
        await asyncio.wait_for(idle.listening.wait(), WAIT_S)
        assert await _listen_backends(schema_url, tag) == 1
        await writing.allocate(Allocation(thread_id, USER, 1))
        await _until_heard(heard_idle, got_idle, replica, 1)
        await _until_heard(heard_witness, got_witness, replica, 2)
        # The last watcher gone, it stops listening once the linger is over.
        await watch.aclose()
        await asyncio.wait_for(idle.stopped_listening.wait(), WAIT_S)
        assert not idle.listening.is_set()
        await writing.allocate(Allocation(thread_id, USER, 1))
        await _until_heard(heard_witness, got_witness, replica, 3)
        assert _count(heard_idle, replica) == 1
    finally:
        if watch is not None:
            await watch.aclose()
        await witnessed.aclose()


def _count(heard: list[str], replica: str) -> int:
    return sum(replica in payload for payload in heard)


async def _until_heard(heard: list[str], got: asyncio.Event, replica: str, times: int) -> None:
    """Until `heard` holds `times` notifications from `replica` (one per commit here)."""
    async with asyncio.timeout(WAIT_S):
        while _count(heard, replica) < times:
            got.clear()  # nothing is heard between the count and this: no await between
            await got.wait()


def test_a_negative_linger_is_refused() -> None:
    with pytest.raises(ValueError, match="listen_linger_s"):
        PostgresStore("postgresql://unused", listen_linger_s=-1)


async def test_a_watcher_that_starts_before_the_listener_connects_misses_nothing(
    make_store: StoreMaker, schema_url: str, thread_id: str
) -> None:
    # No fallback re-read: what wakes the watcher is the listener's re-read once it listens.
    watching = await make_store(watch_fallback_s=None)
    gate = asyncio.Event()
    connect = watching._listen_connection

    async def held_connect() -> object:
        await gate.wait()
        return await connect()

    watching._listen_connection = held_connect  # type: ignore[assignment,method-assign]
    watch = await started_watch(watching, thread_id)
    try:
        # A turn of its own store first: the watch delivers it and then waits for a wake-up
        # (it re-reads at once only after its first update).
        own = await watching.allocate(Allocation(thread_id, USER, 1))
        assert await next_update(watch) == WatchUpdate(own, True)
        # Committed before the watcher's store listens, and with no NOTIFY at all.
        turn_id = await insert_behind_the_stores_back(schema_url, thread_id, 2)
        assert not watching.listening.is_set()
        gate.set()
        (update,) = (await next_update(watch)).turns
        assert (update.turn_id, update.sequence) == (turn_id, 2)
    finally:
        await watch.aclose()
