"""What only the SQLite store has: pragmas, schema versions, lock contention."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from turnid.service.domain import Allocation, ErrorCategory, TurnIdError, TurnKind
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


async def test_a_full_queue_is_refused_overloaded_not_queued(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "t.db"), max_pending=2)
    await store.open()
    # gather starts all four before the writer runs, so two are queued when the third arrives.
    outcomes = await asyncio.gather(
        *(store.allocate(Allocation("t", TurnKind.AUTO_COMPACTION, 1)) for _ in range(4)),
        return_exceptions=True,
    )
    reasons = [o.reason if isinstance(o, TurnIdError) else "OK" for o in outcomes]
    assert reasons == ["OK", "OK", "OVERLOADED", "OVERLOADED"]
    assert outcomes[2].category is ErrorCategory.RESOURCE_EXHAUSTED  # type: ignore[union-attr]
    assert [t.turn_id for t in await store.list("t", 0, 10)] == ["auto-compact-0", "auto-compact-1"]
    await store.close()


async def test_an_unexpected_failure_mid_group_rolls_back_and_frees_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.db"
    store = SqliteStore(str(path))
    await store.open()
    real_apply = SqliteStore._apply

    def failing_apply(self, cursor, allocation, now_us):  # type: ignore[no-untyped-def]
        if allocation.thread_id == "boom":
            raise ValueError("a bug")
        return real_apply(self, cursor, allocation, now_us)

    monkeypatch.setattr(SqliteStore, "_apply", failing_apply)
    outcomes = await asyncio.gather(
        store.allocate(Allocation("t", TurnKind.AUTO_COMPACTION, 1)),
        store.allocate(Allocation("boom", TurnKind.AUTO_COMPACTION, 1)),
        return_exceptions=True,
    )
    assert all(isinstance(o, ValueError) for o in outcomes)  # one group, rolled back whole
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the write lock is free again
    other.execute("ROLLBACK")
    other.close()
    (turn,) = await store.allocate(Allocation("t", TurnKind.AUTO_COMPACTION, 1))
    assert (turn.turn_id, turn.sequence) == ("auto-compact-0", 1)
    await store.close()


@pytest.mark.parametrize("content", [b"this is not a database" * 100, None])
async def test_an_unusable_file_is_one_clear_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "t.db"
    if content is None:
        path.mkdir()  # a directory where the file should be
    else:
        path.write_bytes(content)
    with pytest.raises(RuntimeError, match="cannot open SQLite database"):
        await SqliteStore(str(path)).open()


async def test_an_unforeseen_constraint_failure_fails_only_its_culprit(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SqliteStore(str(path))
    await store.open()
    # A row the store's checks cannot foresee: sequence 1 of thread "bad" without its counters.
    with sqlite3.connect(path) as planted:
        planted.execute(
            "INSERT INTO turns (thread_id, turn_id, kind, sequence, create_time_us, request_id, "
            "claimed) VALUES ('bad', 'planted', 3, 1, 0, '', 1)"
        )
    # gather queues all three before the writer runs: one group, whose joint write fails.
    outcomes = await asyncio.gather(
        store.allocate(Allocation("good-1", TurnKind.AUTO_COMPACTION, 1, "r")),
        store.allocate(Allocation("bad", TurnKind.AUTO_COMPACTION, 1)),
        store.allocate(Allocation("good-2", TurnKind.USER_INPUT, 2)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    assert [t.turn_id for t in outcomes[0]] == ["auto-compact-0"]  # type: ignore[union-attr]
    assert [t.sequence for t in outcomes[2]] == [1, 2]  # type: ignore[union-attr]
    assert await store.list("good-1", 0, 10) == outcomes[0]
    assert await store.list("good-2", 0, 10) == outcomes[2]
    assert [t.turn_id for t in await store.list("bad", 0, 10)] == ["planted"]
    await store.close()
