"""PostgreSQL-only behaviour: races between replicas, dead connections, timeouts, migrations and
their errors, start-up."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from turnid.service.domain import Allocation, TurnIdError, TurnKind
from turnid.service.stores.postgres import (
    PostgresSchemaError,
    PostgresStore,
    migrate,
    migrations,
)

from .conftest import POSTGRES_DSN, StoreMaker, with_search_path

pytestmark = pytest.mark.postgres

USER = TurnKind.USER_INPUT
COMPACTION = TurnKind.AUTO_COMPACTION
ALL_MIGRATIONS = [m.name for m in migrations()]


@pytest.fixture
async def two_replicas(make_store: StoreMaker) -> tuple[PostgresStore, PostgresStore]:
    """Two stores on one schema, as two replicas would have."""
    return await make_store(), await make_store()


async def test_one_request_id_raced_from_two_replicas_makes_one_turn(
    two_replicas: tuple[PostgresStore, PostgresStore], thread_id: str
) -> None:
    stores = two_replicas
    request = Allocation(thread_id, COMPACTION, 2, "same-step")
    results = await asyncio.gather(*(stores[i % 2].allocate(request) for i in range(20)))
    assert all(result == results[0] for result in results)
    assert [t.turn_id for t in results[0]] == ["auto-compact-0", "auto-compact-1"]
    assert await stores[0].list("", thread_id, 0, 100) == results[0]


async def test_one_id_claimed_from_two_replicas_is_granted_once(
    two_replicas: tuple[PostgresStore, PostgresStore], thread_id: str
) -> None:
    stores = two_replicas
    outcomes = await asyncio.gather(
        *(
            stores[i % 2].allocate(Allocation(thread_id, USER, 1, f"r{i}", "rollout-1"))
            for i in range(10)
        ),
        return_exceptions=True,
    )
    granted = [o for o in outcomes if isinstance(o, Sequence)]
    refused = [o for o in outcomes if isinstance(o, TurnIdError)]
    assert len(granted) == 1 and len(refused) == 9
    assert {error.reason for error in refused} == {"TURN_ID_TAKEN"}
    assert await stores[1].list("", thread_id, 0, 100) == granted[0]


async def test_namespaces_are_separate_threads(make_store: StoreMaker, thread_id: str) -> None:
    store = await make_store()
    (a,) = await store.allocate(Allocation(thread_id, COMPACTION, 1, "r", namespace="a"))
    (b,) = await store.allocate(Allocation(thread_id, COMPACTION, 1, "r", namespace="b"))
    assert (a.turn_id, a.sequence) == (b.turn_id, b.sequence) == ("auto-compact-0", 1)
    assert await store.get("a", thread_id, "auto-compact-0") == a
    assert await store.get("", thread_id, "auto-compact-0") is None
    assert await store.list("b", thread_id, 0, 10) == [b]
    assert await store.list("", thread_id, 0, 10) == []
    assert await store.get_thread("", thread_id) is None


async def test_get_thread(make_store: StoreMaker, thread_id: str) -> None:
    store = await make_store()
    assert await store.get_thread("", thread_id) is None
    first = await store.allocate(Allocation(thread_id, USER, 2))
    (last,) = await store.allocate(Allocation(thread_id, COMPACTION, 1, "c"))
    info = await store.get_thread("", thread_id)
    assert info is not None
    assert (info.thread_id, info.last_turn) == (thread_id, last)
    state = info.state
    assert (state.last_sequence, state.next_compaction) == (3, 1)
    assert state.last_minted == first[-1].turn_id
    assert (state.create_time_us, state.update_time_us) == (
        first[0].create_time_us,
        last.create_time_us,
    )


async def test_on_commit_hook(make_store: StoreMaker, thread_id: str) -> None:
    store = await make_store()
    calls: list[tuple[int, int, float]] = []
    store.on_commit = lambda allocations, turns, seconds: calls.append(
        (allocations, turns, seconds)
    )
    await store.allocate(Allocation(thread_id, USER, 3, "r"))
    await store.allocate(Allocation(thread_id, USER, 3, "r"))  # a replay commits nothing
    with pytest.raises(TurnIdError):
        await store.allocate(Allocation(thread_id, USER, 1, expected_last_sequence=0))
    assert [(a, t) for a, t, _ in calls] == [(1, 3)]
    assert calls[0][2] > 0


async def _kill_connections(tag: str, schema_url: str) -> int:
    """Terminates the backends whose application_name is `tag` (see _tagged)."""
    async with await psycopg.AsyncConnection.connect(schema_url, autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a "
            "WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() "
            "AND a.backend_type = 'client backend' "
            "AND a.application_name = %s",
            (tag,),
        )
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])


def _tagged(schema_url: str) -> tuple[str, str]:
    """`schema_url` with a unique application_name, so a test can find its connections."""
    tag = f"turnid-test-{uuid.uuid4().hex[:12]}"
    return f"{schema_url}&application_name={tag}", tag


async def test_dead_pooled_connections_are_replaced(
    make_store: StoreMaker, schema_url: str, thread_id: str
) -> None:
    url, tag = _tagged(schema_url)
    store = await make_store(url=url, pool_min=2, pool_max=2)
    await store.allocate(Allocation(thread_id, USER, 1, "first"))
    # The pooled connections and the listener.
    assert await _kill_connections(tag, schema_url) >= 2
    # Dead connections are found before use (or, at worst, before the commit was sent) and
    # replaced, so even an allocation without a request_id goes through.
    for expected in (2, 3):
        (turn,) = await store.allocate(Allocation(thread_id, USER, 1))
        assert turn.sequence == expected
    assert await _kill_connections(tag, schema_url) >= 2
    assert len(await store.list("", thread_id, 0, 10)) == 3  # reads repeat too
    assert await _kill_connections(tag, schema_url) >= 2
    outcomes = await asyncio.gather(
        *(store.allocate(Allocation(thread_id, USER, 1)) for _ in range(4))
    )
    assert sorted(t.sequence for (t,) in outcomes) == [4, 5, 6, 7]


async def test_closed_store_is_unavailable(make_store: StoreMaker) -> None:
    store = await make_store()
    await store.close()
    await store.close()
    with pytest.raises(TurnIdError) as caught:
        await store.get("", "t", "x")
    assert caught.value.reason == "STORE_UNAVAILABLE"


# --- bounded waits (invariant 9) -----------------------------------------------------------


async def test_every_pooled_connection_has_timeouts_and_keepalives(make_store: StoreMaker) -> None:
    store = await make_store(pool_min=3, pool_max=3, statement_timeout_s=2.5, lock_timeout_s=1.5)
    pool = store._pool
    assert pool is not None
    async with pool.connection() as a, pool.connection() as b, pool.connection() as c:
        for conn in (a, b, c):
            cursor = await conn.execute(
                "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), "
                "current_setting('idle_in_transaction_session_timeout')"
            )
            assert await cursor.fetchone() == ("2500ms", "1500ms", "2500ms")
            params = conn.info.get_parameters()
            assert params["keepalives"] == "1"
            assert int(params["keepalives_idle"]) > 0


async def test_a_locked_thread_is_unavailable_after_lock_timeout(
    make_store: StoreMaker, schema_url: str, thread_id: str
) -> None:
    store = await make_store(lock_timeout_s=0.2)
    await store.allocate(Allocation(thread_id, USER, 1))
    async with await psycopg.AsyncConnection.connect(schema_url) as holder:
        await holder.execute(
            "SELECT 1 FROM threads WHERE namespace = '' AND thread_id = %s FOR UPDATE",
            (thread_id,),
        )
        with pytest.raises(TurnIdError) as caught:
            await store.allocate(Allocation(thread_id, USER, 1, "waits"))
        assert caught.value.reason == "STORE_UNAVAILABLE"
        assert "lock" not in caught.value.message  # the detail goes to the log only
        await holder.rollback()
    (turn,) = await store.allocate(Allocation(thread_id, USER, 1, "waits"))
    assert turn.sequence == 2


async def test_a_long_statement_is_unavailable_after_statement_timeout(
    make_store: StoreMaker, schema_url: str, thread_id: str
) -> None:
    store = await make_store(lock_timeout_s=30, statement_timeout_s=0.2)
    await store.allocate(Allocation(thread_id, USER, 1))
    async with await psycopg.AsyncConnection.connect(schema_url) as holder:
        await holder.execute(
            "SELECT 1 FROM threads WHERE namespace = '' AND thread_id = %s FOR UPDATE",
            (thread_id,),
        )
        with pytest.raises(TurnIdError) as caught:
            await store.allocate(Allocation(thread_id, USER, 1))
        assert caught.value.reason == "STORE_UNAVAILABLE"
        await holder.rollback()
    assert len(await store.list("", thread_id, 0, 10)) == 1


async def test_an_exhausted_pool_is_unavailable_after_acquire_timeout(
    make_store: StoreMaker, thread_id: str
) -> None:
    store = await make_store(pool_min=1, pool_max=1, acquire_timeout_s=0.2)
    pool = store._pool
    assert pool is not None
    async with pool.connection():
        with pytest.raises(TurnIdError) as caught:
            await store.allocate(Allocation(thread_id, USER, 1))
        assert caught.value.reason == "STORE_UNAVAILABLE"
    (turn,) = await store.allocate(Allocation(thread_id, USER, 1))
    assert turn.sequence == 1


# --- migrations ----------------------------------------------------------------------------


async def test_migrate_is_idempotent_and_checkable(schema_url: str) -> None:
    with pytest.raises(PostgresSchemaError, match="run `turnid migrate"):
        await migrate(schema_url, apply=False)
    first = await migrate(schema_url)
    assert (first.version, list(first.applied)) == (len(migrations()), ALL_MIGRATIONS)
    again = await migrate(schema_url)
    assert list(again.applied) == []
    assert (await migrate(schema_url, apply=False)).version == len(migrations())


async def test_a_newer_schema_is_refused(schema_url: str) -> None:
    await migrate(schema_url)
    async with await psycopg.AsyncConnection.connect(schema_url, autocommit=True) as conn:
        await conn.execute("INSERT INTO turnid_schema_migrations VALUES (999, 'future.sql')")
    with pytest.raises(PostgresSchemaError, match="newer than this turnid") as caught:
        await migrate(schema_url)
    assert "\n" not in str(caught.value)


def _as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def unprivileged_url(schema_url: str) -> AsyncIterator[str]:
    """A login role that may use the private schema but not create anything in it; dropped
    afterwards."""
    assert POSTGRES_DSN
    role = f"turnid_noperm_{uuid.uuid4().hex[:12]}"
    schema = urlsplit(schema_url).query.split("search_path%3D", 1)[1].split("&", 1)[0]
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        await admin.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(schema), sql.Identifier(role)
            )
        )
    try:
        yield with_search_path(_as_user(POSTGRES_DSN, role), schema)
    finally:
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as admin:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            await admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            await admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_migrate_without_privileges_is_one_line(unprivileged_url: str) -> None:
    with pytest.raises(PostgresSchemaError) as caught:
        await migrate(unprivileged_url)
    message = str(caught.value)
    assert "\n" not in message and "permission denied" in message and "[42501]" in message
    assert isinstance(caught.value.__cause__, psycopg.errors.InsufficientPrivilege)
    result = _turnid("migrate", "--database", unprivileged_url)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "permission denied" in result.stderr, result.stderr


def _error_lines(stderr: str, command: str) -> list[str]:
    """The lines saying why `turnid COMMAND` failed (`turnid serve` may log its start first)."""
    return [line for line in stderr.splitlines() if line.startswith(f"turnid {command}:")]


def _turnid(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "turnid.service.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_cli_migrate_and_no_migrate(database_url: str) -> None:
    env = {**os.environ, "TURNID_MIGRATE": "0"}
    refused = _turnid("serve", "--listen", "127.0.0.1:0", "--database", database_url, env=env)
    assert refused.returncode == 1
    # One line says why (the server may log its start before it).
    (why,) = _error_lines(refused.stderr, "serve")
    assert "run `turnid migrate" in why and "Traceback" not in refused.stderr
    done = _turnid("migrate", "--database", database_url)
    assert done.returncode == 0, done.stderr
    names = ", ".join(ALL_MIGRATIONS)
    assert done.stdout == f"turnid migrate: schema at version {len(ALL_MIGRATIONS)} ({names})\n"
    again = _turnid("migrate", "--database", database_url)
    assert again.stdout == (
        f"turnid migrate: schema at version {len(ALL_MIGRATIONS)} (nothing to apply)\n"
    )


def test_unreachable_database_fails_start_with_one_line() -> None:
    url = "postgresql://turnid:secret@127.0.0.1:1/turnid"  # nothing listens on port 1
    for args in (("serve", "--listen", "127.0.0.1:0"), ("migrate",)):
        result = _turnid(*args, "--database", url)
        assert result.returncode == 1
        (why,) = _error_lines(result.stderr, args[0])
        assert "cannot connect to PostgreSQL at postgresql://turnid:***@127.0.0.1:1/turnid" in why
        assert "secret" not in result.stderr and "Traceback" not in result.stderr
