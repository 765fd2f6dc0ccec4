"""PostgreSQL-only behaviour: races between replicas, dead connections, migrations, start-up."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import psycopg
import pytest

from turnid.service.domain import Allocation, TurnIdError, TurnKind
from turnid.service.stores.postgres import PostgresStore, migrate, migrations

USER = TurnKind.USER_INPUT
COMPACTION = TurnKind.AUTO_COMPACTION


@pytest.fixture
async def two_replicas(database_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database, as two replicas would have."""
    first, second = PostgresStore(database_url), PostgresStore(database_url)
    await first.open()
    await second.open()
    yield first, second
    await first.close()
    await second.close()


async def test_one_request_id_raced_from_two_replicas_makes_one_turn(
    two_replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    stores = two_replicas
    request = Allocation("race", COMPACTION, 2, "same-step")
    results = await asyncio.gather(*(stores[i % 2].allocate(request) for i in range(20)))
    assert all(result == results[0] for result in results)
    assert [t.turn_id for t in results[0]] == ["auto-compact-0", "auto-compact-1"]
    assert await stores[0].list("race", 0, 100) == results[0]


async def test_one_id_claimed_from_two_replicas_is_granted_once(
    two_replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    stores = two_replicas
    outcomes = await asyncio.gather(
        *(
            stores[i % 2].allocate(Allocation("claims", USER, 1, f"r{i}", "rollout-1"))
            for i in range(10)
        ),
        return_exceptions=True,
    )
    granted = [o for o in outcomes if isinstance(o, list)]
    refused = [o for o in outcomes if isinstance(o, TurnIdError)]
    assert len(granted) == 1 and len(refused) == 9
    assert {error.reason for error in refused} == {"TURN_ID_TAKEN"}
    assert await stores[1].list("claims", 0, 100) == granted[0]


async def _kill_connections(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])


async def test_dead_pooled_connections_are_replaced(database_url: str) -> None:
    store = PostgresStore(database_url, min_size=1, max_size=1)
    await store.open()
    try:
        await store.allocate(Allocation("t", USER, 1, "first"))
        assert await _kill_connections(database_url) == 1
        # With a request_id a repeat is safe: the store replaces the connection and goes on.
        (turn,) = await store.allocate(Allocation("t", USER, 1, "second"))
        assert turn.sequence == 2
        assert await _kill_connections(database_url) == 1
        # Without one the first attempt might have committed: UNAVAILABLE, never INTERNAL.
        with pytest.raises(TurnIdError) as caught:
            await store.allocate(Allocation("t", USER, 1))
        assert caught.value.reason == "STORE_UNAVAILABLE"
        # ... and the pool has recovered by itself.
        (turn,) = await store.allocate(Allocation("t", USER, 1))
        assert turn.sequence == 3
        assert await _kill_connections(database_url) == 1
        assert len(await store.list("t", 0, 10)) == 3  # reads repeat too
    finally:
        await store.close()


async def test_closed_store_is_unavailable(database_url: str) -> None:
    store = PostgresStore(database_url)
    await store.open()
    await store.close()
    await store.close()
    with pytest.raises(TurnIdError) as caught:
        await store.get("t", "x")
    assert caught.value.reason == "STORE_UNAVAILABLE"


async def test_migrate_is_idempotent_and_checkable(database_url: str) -> None:
    with pytest.raises(RuntimeError, match="run `turnid migrate"):
        await migrate(database_url, apply=False)
    first = await migrate(database_url)
    assert (first.version, list(first.applied)) == (len(migrations()), ["0001_init.sql"])
    again = await migrate(database_url)
    assert list(again.applied) == []
    assert (await migrate(database_url, apply=False)).version == len(migrations())


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
    assert refused.stderr.count("\n") == 1 and "run `turnid migrate" in refused.stderr
    done = _turnid("migrate", "--database", database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "turnid migrate: schema at version 1 (0001_init.sql)\n"
    again = _turnid("migrate", "--database", database_url)
    assert again.stdout == "turnid migrate: schema at version 1 (nothing to apply)\n"


def test_unreachable_database_fails_start_with_one_line() -> None:
    url = "postgresql://turnid:secret@127.0.0.1:1/turnid"  # nothing listens on port 1
    for args in (("serve", "--listen", "127.0.0.1:0"), ("migrate",)):
        result = _turnid(*args, "--database", url)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1, result.stderr
        assert "cannot connect to PostgreSQL at postgresql://turnid:***@127.0.0.1:1/turnid" in (
            result.stderr
        )
        assert "secret" not in result.stderr
