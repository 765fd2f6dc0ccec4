"""What only the SQLite store has: pragmas, schema versions, lock contention."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from turnid.service.domain import Allocation, TurnIdError, TurnKind
from turnid.service.stores import open_store, sqlite_path
from turnid.service.stores.sqlite import MIGRATIONS, SqliteStore


def test_database_urls() -> None:
    assert sqlite_path("sqlite:///var/lib/turnid.db") == "/var/lib/turnid.db"
    assert sqlite_path("sqlite:relative/t.db") == "relative/t.db"
    with pytest.raises(ValueError, match="names no file"):
        sqlite_path("sqlite://")
    with pytest.raises(ValueError, match="unsupported database URL"):
        open_store("mysql://x")


async def test_file_is_wal_with_full_sync_and_current_schema(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "deep" / "dir" / "t.db"))
    await store.open()
    await store.allocate(Allocation("t", TurnKind.AUTO_COMPACTION, 1))
    assert store._write_conn is not None
    pragmas = {
        name: store._write_conn.execute(f"PRAGMA {name}").fetchone()[0]
        for name in ("journal_mode", "synchronous", "user_version")
    }
    assert pragmas == {"journal_mode": "wal", "synchronous": 2, "user_version": len(MIGRATIONS)}
    await store.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    store = SqliteStore(str(path))
    with pytest.raises(RuntimeError, match="newer than this turnid"):
        await store.open()


async def test_a_locked_database_is_unavailable_not_internal(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SqliteStore(str(path), busy_timeout_s=0.1)
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        with pytest.raises(TurnIdError) as caught:
            await store.allocate(Allocation("t", TurnKind.AUTO_COMPACTION, 1, "rid"))
        assert caught.value.reason == "STORE_UNAVAILABLE"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # Once the lock is gone the same request goes through, and nothing half-written remains.
    (turn,) = await store.allocate(Allocation("t", TurnKind.AUTO_COMPACTION, 1, "rid"))
    assert (turn.turn_id, turn.sequence) == ("auto-compact-0", 1)
    await store.close()
