"""What only the SQLite store has: pragmas, schema versions, group commit, lock contention,
faults, several stores (processes) on one file."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
import types
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import uuid_utils

from turnid.service.domain import Allocation, ErrorCategory, TurnIdError, TurnKind
from turnid.service.domain.model import Turn
from turnid.service.stores import open_store, sqlite_path
from turnid.service.stores import sqlite as sqlite_module
from turnid.service.stores.sqlite import MIGRATIONS, SqliteStore, migrate, storage_error

REALTIME = TurnKind.REALTIME_DELEGATION
COMPACTION = TurnKind.AUTO_COMPACTION
USER = TurnKind.USER_INPUT

# The schema of version 1, as `git show HEAD~3:service/turnid/service/stores/sqlite.py` wrote it
# (kept here verbatim, so the migration test does not depend on MIGRATIONS[0]).
V1_DDL = """
    CREATE TABLE threads (
        thread_id       TEXT PRIMARY KEY,
        next_sequence   INTEGER NOT NULL,
        next_compaction INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE turns (
        thread_id      TEXT NOT NULL,
        sequence       INTEGER NOT NULL,
        turn_id        TEXT NOT NULL,
        kind           INTEGER NOT NULL,
        request_id     TEXT NOT NULL,
        claimed        INTEGER NOT NULL,
        create_time_us INTEGER NOT NULL,
        PRIMARY KEY (thread_id, sequence),
        UNIQUE (thread_id, turn_id)
    ) WITHOUT ROWID;
    CREATE TABLE requests (
        thread_id       TEXT NOT NULL,
        request_id      TEXT NOT NULL,
        kind            INTEGER NOT NULL,
        count           INTEGER NOT NULL,
        claimed_turn_id TEXT,
        first_sequence  INTEGER NOT NULL,
        PRIMARY KEY (thread_id, request_id)
    ) WITHOUT ROWID;
"""


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Opens SqliteStores (on tmp_path/t.db unless told) and closes them after the test."""
    stores: list[SqliteStore] = []

    async def open_one(path: Path | str | None = None, **kwargs: Any) -> SqliteStore:
        store = SqliteStore(str(path or tmp_path / "t.db"), **kwargs)
        await store.open()
        stores.append(store)
        return store

    yield open_one
    for store in stores:
        await store.close()


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


# --- files, pragmas, URLs ---------------------------------------------------------------------


def test_database_urls() -> None:
    assert sqlite_path("sqlite:///var/lib/turnid.db") == "/var/lib/turnid.db"
    assert sqlite_path("sqlite:relative/t.db") == "relative/t.db"
    with pytest.raises(ValueError, match="names no file"):
        sqlite_path("sqlite://")
    with pytest.raises(ValueError, match="unsupported database URL"):
        open_store("mysql://x")


async def test_file_is_wal_with_full_sync_current_schema_and_a_short_busy_timeout(
    tmp_path: Path, opened: Callable[..., Any]
) -> None:
    store = await opened(tmp_path / "deep" / "dir" / "t.db")
    await store.allocate(Allocation("t", COMPACTION, 1))
    assert store._write_conn is not None
    pragmas = {
        name: store._write_conn.execute(f"PRAGMA {name}").fetchone()[0]
        for name in ("journal_mode", "synchronous", "user_version", "busy_timeout")
    }
    # At rest the write connection never waits for the lock (a group on the event loop must
    # not); only the writer thread's BEGIN does, for busy_timeout (below).
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 2,
        "user_version": len(MIGRATIONS),
        "busy_timeout": 0,
    }
    assert store._busy_timeout_s == 5.0  # below the client's 10 s default deadline (inv. 9)


async def test_a_group_waits_busy_timeout_for_a_lock_held_elsewhere_and_the_loop_never_does(
    tmp_path: Path, opened: Callable[..., Any]
) -> None:
    path = tmp_path / "t.db"
    store = await opened(path, busy_timeout_s=0.25)
    statements: list[tuple[str, str]] = []
    assert store._write_conn is not None
    store._write_conn.set_trace_callback(
        lambda sql: statements.append((threading.current_thread().name, sql))
    )
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        started = time.monotonic()
        with pytest.raises(TurnIdError) as caught:
            await store.allocate(Allocation("t", COMPACTION, 1, "rid"))
        assert caught.value.reason == "STORE_UNAVAILABLE"
        assert time.monotonic() - started >= 0.25  # it waited for the lock, then gave up
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    statements.clear()
    await store.allocate_many([Allocation(f"t{n}", COMPACTION, 1) for n in range(3)])
    loop_thread = threading.current_thread().name
    on_loop = [sql for thread, sql in statements if thread == loop_thread]
    assert on_loop[0] == "BEGIN IMMEDIATE"
    assert not [sql for sql in on_loop if sql.startswith("PRAGMA")]


@pytest.mark.parametrize("url", ["sqlite::memory:", "sqlite://:memory:"])
async def test_an_in_memory_database_works_and_is_private(url: str) -> None:
    first, second = open_store(url), open_store(url)
    assert isinstance(first, SqliteStore)
    await first.open()
    await second.open()
    try:
        turns = await first.allocate(Allocation("t", COMPACTION, 3, "r"))
        assert await first.list("", "t", 0, 10) == turns
        assert await first.get("", "t", "auto-compact-1") == turns[1]
        info = await first.get_thread("", "t")
        assert info is not None and info.last_turn == turns[-1]
        assert await first.allocate(Allocation("t", COMPACTION, 3, "r")) == turns  # replay
        assert await second.list("", "t", 0, 10) == []  # another store, another database
    finally:
        await first.close()
        await second.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    store = SqliteStore(str(path))
    with pytest.raises(RuntimeError, match="newer than this turnid"):
        await store.open()


@pytest.mark.parametrize("content", [b"this is not a database" * 100, None])
async def test_an_unusable_file_is_one_clear_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "t.db"
    if content is None:
        path.mkdir()  # a directory where the file should be
    else:
        path.write_bytes(content)
    with pytest.raises(RuntimeError, match="cannot open SQLite database"):
        await SqliteStore(str(path)).open()


# --- migrations -------------------------------------------------------------------------------


def _v1_file(path: Path) -> dict[str, Any]:
    """A version-1 file as the v1 store left it: two threads, every kind, claims, requests."""
    minted = [str(uuid_utils.uuid7()) for _ in range(3)]
    claimed_high = "zz-legacy"  # sorts above every UUID
    claimed_uuid = str(uuid_utils.uuid7())  # a claimed UUIDv7, greater than every minted one
    a = [  # (turn_id, kind, sequence, request_id, claimed, create_time_us)
        (minted[0], 1, 1, "r-rt", 0, 1_000),
        ("auto-compact-0", 2, 2, "r-comp", 0, 2_000),
        ("auto-compact-1", 2, 3, "r-comp", 0, 2_000),
        (claimed_high, 3, 4, "r-claim", 1, 3_000),
        (minted[1], 3, 5, "", 0, 4_000),
        (minted[2], 3, 6, "r-user", 0, 4_000),
        (claimed_uuid, 1, 7, "", 1, 5_000),
    ]
    b = [("auto-compact-0", 2, 1, "r-comp", 0, 7_000)]
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.executescript(V1_DDL)
        conn.executemany(
            "INSERT INTO turns (thread_id, turn_id, kind, sequence, request_id, claimed, "
            "create_time_us) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [("a", *row) for row in a] + [("b", *row) for row in b],
        )
        conn.executemany(
            "INSERT INTO threads (thread_id, next_sequence, next_compaction) VALUES (?, ?, ?)",
            [("a", 8, 2), ("b", 2, 1)],
        )
        conn.executemany(
            "INSERT INTO requests (thread_id, request_id, kind, count, claimed_turn_id, "
            "first_sequence) VALUES (?, ?, ?, ?, ?, ?)",
            [
                ("a", "r-rt", 1, 1, None, 1),
                ("a", "r-comp", 2, 2, None, 2),
                ("a", "r-claim", 3, 1, claimed_high, 4),
                ("a", "r-user", 3, 1, None, 6),
                ("b", "r-comp", 2, 1, None, 1),
            ],
        )
        conn.execute("PRAGMA user_version=1")
    turns = [
        Turn("a", tid, TurnKind(kind), seq, ts, rid, bool(claimed))
        for tid, kind, seq, rid, claimed, ts in a
    ]
    return {"a": turns, "minted": minted, "claimed": [claimed_high, claimed_uuid]}


async def test_a_version_1_file_migrates_keeping_every_turn_request_and_counter(
    tmp_path: Path, opened: Callable[..., Any]
) -> None:
    path = tmp_path / "t.db"
    v1 = _v1_file(path)
    store = await opened(path)
    assert store._write_conn is not None
    assert store._write_conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3
    turns_a = v1["a"]
    assert await store.list("", "a", 0, 100) == turns_a
    assert await store.get("", "a", "zz-legacy") == turns_a[3]
    # The new thread columns were computed from the rows.
    info = await store.get_thread("", "a")
    assert info is not None
    assert info.last_turn == turns_a[-1]
    state = info.state
    assert (state.next_sequence, state.next_compaction) == (8, 2)
    assert state.last_minted == max(v1["minted"])
    assert state.max_claimed == "zz-legacy"
    assert (state.create_time_us, state.update_time_us) == (1_000, 5_000)
    info_b = await store.get_thread("", "b")
    assert info_b is not None and info_b.state.last_minted == info_b.state.max_claimed == ""
    # Rows went to the default namespace; another namespace sees nothing.
    assert await store.list("team-b", "a", 0, 100) == []
    assert await store.get_thread("team-b", "a") is None
    # Requests replay, and a reused request_id is still refused.
    assert await store.allocate(Allocation("a", COMPACTION, 2, "r-comp")) == turns_a[1:3]
    assert await store.allocate(
        Allocation("a", USER, 1, "r-claim", claimed_turn_id="zz-legacy")
    ) == [turns_a[3]]
    with pytest.raises(TurnIdError) as caught:
        await store.allocate(Allocation("a", REALTIME, 2, "r-rt"))
    assert caught.value.reason == "REQUEST_ID_REUSED"
    # Counters continue: compaction index, sequence, minted ids after the last minted one.
    (compaction,) = await store.allocate(Allocation("a", COMPACTION, 1))
    assert (compaction.turn_id, compaction.sequence) == ("auto-compact-2", 8)
    (minted,) = await store.allocate(Allocation("a", REALTIME, 1))
    assert minted.sequence == 9 and minted.turn_id > max(v1["minted"])
    with pytest.raises(TurnIdError) as caught:
        await store.allocate(Allocation("a", USER, 1, claimed_turn_id=v1["claimed"][1]))
    assert caught.value.reason == "TURN_ID_TAKEN"
    (other,) = await store.allocate(Allocation("b", COMPACTION, 1))
    assert (other.turn_id, other.sequence) == ("auto-compact-1", 2)


def _v2_file(path: Path) -> dict[str, list[Turn]]:
    """A version-2 file: threads of one name in two namespaces, minted, compaction and claimed
    turns, request records (migration 3 rebuilds turns and requests)."""
    turns: dict[str, list[Turn]] = {}
    with sqlite3.connect(path, isolation_level=None) as conn:
        for script in MIGRATIONS[:2]:
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
        for namespace in ("", "team-b"):
            minted = [str(uuid_utils.uuid7()) for _ in range(2)]
            rows = [  # (sequence, turn_id, kind, request_id, claimed)
                (1, minted[0], 1, f"r-rt-{namespace}", 0),
                (2, "auto-compact-0", 2, "r-comp", 0),
                (3, f"claimed-{namespace}", 3, "r-claim", 1),
                (4, minted[1], 3, "", 0),
            ]
            conn.executemany(
                "INSERT INTO turns (namespace, thread_id, sequence, turn_id, kind, request_id, "
                "claimed, create_time_us) VALUES (?, 'a', ?, ?, ?, ?, ?, 1000)",
                [(namespace, *row) for row in rows],
            )
            conn.executemany(
                "INSERT INTO requests (namespace, thread_id, request_id, kind, count, "
                "claimed_turn_id, first_sequence) VALUES (?, 'a', ?, ?, 1, ?, ?)",
                [
                    (namespace, f"r-rt-{namespace}", 1, None, 1),
                    (namespace, "r-comp", 2, None, 2),
                    (namespace, "r-claim", 3, f"claimed-{namespace}", 3),
                ],
            )
            conn.execute(
                "INSERT INTO threads (namespace, thread_id, next_sequence, next_compaction, "
                "last_minted, max_claimed, create_time_us, update_time_us) "
                "VALUES (?, 'a', 5, 1, ?, ?, 1000, 1000)",
                (namespace, minted[1], f"claimed-{namespace}"),
            )
            turns[namespace] = [
                Turn("a", tid, TurnKind(kind), seq, 1000, rid, bool(claimed))
                for seq, tid, kind, rid, claimed in rows
            ]
        conn.execute("PRAGMA user_version=2")
    return turns


async def test_a_version_2_file_migrates_keeping_every_namespace_turn_and_request(
    tmp_path: Path, opened: Callable[..., Any]
) -> None:
    path = tmp_path / "t.db"
    v2 = _v2_file(path)
    store = await opened(path)
    assert store._write_conn is not None
    conn = store._write_conn
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3
    # The id leads the turn_id index and the requests key now.
    keys = [
        [row[2] for row in conn.execute(f"PRAGMA index_info('{index[1]}')")]
        for table in ("turns", "requests")
        for index in conn.execute(f"PRAGMA index_list('{table}')").fetchall()
    ]
    assert sorted(keys) == [
        ["namespace", "thread_id", "sequence"],
        ["request_id", "namespace", "thread_id"],
        ["turn_id", "namespace", "thread_id"],
    ]
    for namespace, turns in v2.items():
        assert await store.list(namespace, "a", 0, 100) == turns
        for turn in turns:
            assert await store.get(namespace, "a", turn.turn_id) == turn
        # Requests replay in their own namespace; a reused one is refused; claims stay taken.
        replay = Allocation("a", COMPACTION, 1, "r-comp", namespace=namespace)
        assert await store.allocate(replay) == [turns[1]]
        reused = Allocation("a", REALTIME, 2, f"r-rt-{namespace}", namespace=namespace)
        with pytest.raises(TurnIdError) as caught:
            await store.allocate(reused)
        assert caught.value.reason == "REQUEST_ID_REUSED"
        claim = Allocation(
            "a", USER, 1, claimed_turn_id=f"claimed-{namespace}", namespace=namespace
        )
        with pytest.raises(TurnIdError) as caught:
            await store.allocate(claim)
        assert caught.value.reason == "TURN_ID_TAKEN"
        (compaction,) = await store.allocate(Allocation("a", COMPACTION, 1, namespace=namespace))
        assert (compaction.turn_id, compaction.sequence) == ("auto-compact-1", 5)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_migrate_waits_for_another_process_holding_the_write_lock(tmp_path: Path) -> None:
    """Past busy_timeout: another process may be migrating the same big file."""
    path = tmp_path / "t.db"
    _v2_file(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # as another process's migration would
    waiting = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for the write lock" in record.getMessage():
                waiting.set()

    handler = Seen()
    logger = sqlite_module.log
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    result: list[int | BaseException] = []

    def migrating() -> None:
        conn = sqlite3.connect(path, isolation_level=None, timeout=0.01)  # busy_timeout 10 ms
        try:
            result.append(migrate(conn))
        except BaseException as error:
            result.append(error)
        finally:
            conn.close()

    thread = threading.Thread(target=migrating)
    try:
        thread.start()
        assert waiting.wait(30)  # it found the lock held, past its busy timeout, and waits
        assert result == []
        holder.execute("COMMIT")
        thread.join(30)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        holder.close()
    assert result == [len(MIGRATIONS)]


async def test_a_current_file_is_left_untouched_by_migrate(
    tmp_path: Path, opened: Callable[..., Any]
) -> None:
    path = tmp_path / "t.db"
    store = await opened(path)
    await store.allocate(Allocation("t", COMPACTION, 1))
    await store.close()
    observer = sqlite3.connect(path, isolation_level=None)
    version_before = _data_version(observer)
    mtime_before = os.stat(path).st_mtime_ns
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(conn) == len(MIGRATIONS)
        assert not conn.in_transaction
    finally:
        conn.close()
    reopened = await opened(path)  # a whole store's open and close as well
    await reopened.close()
    assert _data_version(observer) == version_before
    assert os.stat(path).st_mtime_ns == mtime_before
    # (The observer does see writes: the check above can fail.)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA user_version=2")
    writer.close()
    assert _data_version(observer) != version_before
    observer.close()


class _FailingCommit:
    """A connection whose COMMIT fails like a full disk does: SQLite has already rolled the
    transaction back when the error arrives."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def _fail_commit(self, sql: str) -> None:
        if sql.strip().upper() == "COMMIT":
            self._conn.execute("ROLLBACK")
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorname = "SQLITE_FULL"  # type: ignore[attr-defined]
            raise error

    def execute(self, sql: str, *args: Any) -> Any:
        self._fail_commit(sql)
        return self._conn.execute(sql, *args)

    def cursor(self) -> Any:
        outer = self
        real = self._conn.cursor()

        class Cursor:
            def execute(self, sql: str, *args: Any) -> Any:
                outer._fail_commit(sql)
                return real.execute(sql, *args)

            def executemany(self, sql: str, rows: Any) -> Any:
                return real.executemany(sql, rows)

        return Cursor()


def test_a_failed_commit_in_migrate_raises_its_own_error(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        migrate(_FailingCommit(conn))  # type: ignore[arg-type]
    assert not conn.in_transaction
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    assert migrate(conn) == len(MIGRATIONS)  # and it can be done again
    conn.close()


# --- faults -----------------------------------------------------------------------------------


def test_sqlite_errors_map_to_storage_full_unavailable_or_a_bug() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorname = "SQLITE_FULL"  # type: ignore[attr-defined]
    mapped = storage_error(full)
    assert mapped is not None
    assert (mapped.category, mapped.reason) == (ErrorCategory.RESOURCE_EXHAUSTED, "STORAGE_FULL")
    busy = sqlite3.OperationalError("database is locked SELECT secret FROM x")
    busy.sqlite_errorname = "SQLITE_BUSY"  # type: ignore[attr-defined]
    for error in (busy, sqlite3.DatabaseError("database disk image is malformed")):
        mapped = storage_error(error)
        assert mapped is not None
        assert (mapped.category, mapped.reason) == (ErrorCategory.UNAVAILABLE, "STORE_UNAVAILABLE")
        assert "secret" not in mapped.message and "malformed" not in mapped.message
    assert storage_error(sqlite3.ProgrammingError("misuse")) is None
    assert storage_error(sqlite3.IntegrityError("UNIQUE constraint failed")) is None


async def test_a_full_database_is_storage_full_and_recovers_once_space_is_freed(
    opened: Callable[..., Any],
) -> None:
    store = await opened()
    await store.allocate(Allocation("t", COMPACTION, 1))
    conn = store._write_conn
    assert conn is not None
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count={pages}")  # the file cannot grow: SQLITE_FULL
    with pytest.raises(TurnIdError) as caught:
        await store.allocate(Allocation("t", USER, 1000, "big"))
    assert (caught.value.category, caught.value.reason) == (
        ErrorCategory.RESOURCE_EXHAUSTED,
        "STORAGE_FULL",
    )
    assert not conn.in_transaction
    conn.execute("PRAGMA max_page_count=1073741823")  # space freed
    turns = await store.allocate(Allocation("t", USER, 1000, "big"))
    assert [t.sequence for t in turns] == list(range(2, 1002))


async def test_a_failed_commit_in_the_writer_is_storage_full_not_a_rollback_error(
    opened: Callable[..., Any],
) -> None:
    store = await opened()
    real = store._write_conn
    store._write_conn = _FailingCommit(real)
    with pytest.raises(TurnIdError) as caught:
        await store.allocate(Allocation("t", COMPACTION, 1, "r"))
    assert caught.value.reason == "STORAGE_FULL"
    store._write_conn = real
    (turn,) = await store.allocate(Allocation("t", COMPACTION, 1, "r"))
    assert (turn.turn_id, turn.sequence) == ("auto-compact-0", 1)


async def test_a_locked_database_is_unavailable_not_internal(
    tmp_path: Path, opened: Callable[..., Any]
) -> None:
    path = tmp_path / "t.db"
    store = await opened(path, busy_timeout_s=0.1)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        with pytest.raises(TurnIdError) as caught:
            await store.allocate(Allocation("t", COMPACTION, 1, "rid"))
        assert caught.value.reason == "STORE_UNAVAILABLE"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # Once the lock is gone the same request goes through, and nothing half-written remains.
    (turn,) = await store.allocate(Allocation("t", COMPACTION, 1, "rid"))
    assert (turn.turn_id, turn.sequence) == ("auto-compact-0", 1)


async def test_an_unexpected_failure_mid_group_rolls_back_and_frees_the_file(
    tmp_path: Path, opened: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.db"
    store = await opened(path)
    real_apply = SqliteStore._apply

    def failing_apply(self, batch, allocation, now_us):  # type: ignore[no-untyped-def]
        if allocation.thread_id == "boom":
            raise ValueError("a bug")
        return real_apply(self, batch, allocation, now_us)

    monkeypatch.setattr(SqliteStore, "_apply", failing_apply)
    outcomes = await store.allocate_many(
        [Allocation("t", COMPACTION, 1), Allocation("boom", COMPACTION, 1)]
    )
    assert all(isinstance(o, ValueError) for o in outcomes)  # one group, rolled back whole
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the write lock is free again
    other.execute("ROLLBACK")
    other.close()
    (turn,) = await store.allocate(Allocation("t", COMPACTION, 1))
    assert (turn.turn_id, turn.sequence) == ("auto-compact-0", 1)


async def test_an_unforeseen_constraint_failure_fails_only_its_culprit(
    tmp_path: Path, opened: Callable[..., Any]
) -> None:
    path = tmp_path / "t.db"
    store = await opened(path)
    # A row the store's checks cannot foresee: sequence 1 of thread "bad" without its counters.
    with sqlite3.connect(path) as planted:
        planted.execute(
            "INSERT INTO turns (namespace, thread_id, turn_id, kind, sequence, create_time_us, "
            "request_id, claimed) VALUES ('', 'bad', 'planted', 3, 1, 0, '', 1)"
        )
    # gather queues all three before the writer runs: one group, whose joint write fails.
    outcomes = await asyncio.gather(
        store.allocate(Allocation("good-1", COMPACTION, 1, "r")),
        store.allocate(Allocation("bad", COMPACTION, 1)),
        store.allocate(Allocation("good-2", USER, 2)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    assert [t.turn_id for t in outcomes[0]] == ["auto-compact-0"]  # type: ignore[union-attr]
    assert [t.sequence for t in outcomes[2]] == [1, 2]  # type: ignore[union-attr]
    assert await store.list("", "good-1", 0, 10) == outcomes[0]
    assert await store.list("", "good-2", 0, 10) == outcomes[2]
    assert [t.turn_id for t in await store.list("", "bad", 0, 10)] == ["planted"]


# --- the writer's queue and groups ------------------------------------------------------------


async def test_a_full_queue_is_refused_overloaded_not_queued(opened: Callable[..., Any]) -> None:
    store = await opened(max_pending=2)
    # All four queue before the writer runs, so two are queued when the third arrives.
    outcomes = await store.allocate_many([Allocation("t", COMPACTION, 1) for _ in range(4)])
    reasons = [o.reason if isinstance(o, TurnIdError) else "OK" for o in outcomes]
    assert reasons == ["OK", "OK", "OVERLOADED", "OVERLOADED"]
    assert outcomes[2].category is ErrorCategory.RESOURCE_EXHAUSTED  # type: ignore[union-attr]
    turns = await store.list("", "t", 0, 10)
    assert [t.turn_id for t in turns] == ["auto-compact-0", "auto-compact-1"]


async def test_a_lone_allocation_commits_in_its_callers_coroutine(
    opened: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an idle store a lone allocate() is committed before it first yields to the event
    loop (no hop to the writer and back); once groups are big enough for the commit delay,
    or when the loop was busy all the while the writer was idle (calls reaching it one by
    one under load), allocations queue for the writer again, so that they join groups."""
    store = await opened()
    # No checkpoint of the store's own: one that commits overtook makes the write loop catch
    # up after its group, and an allocation meanwhile rightly queues (a loaded CI machine saw
    # the last step below queue so).
    monkeypatch.setattr(store, "_schedule_checkpoint", lambda: None)
    idle = 10 * sqlite_module._ALONE_IDLE_S
    # The writer went idle a while ago, and the loop has spent no CPU since.
    store._writer_idle_since, store._writer_idle_cpu = time.monotonic() - idle, time.thread_time()
    coro = store.allocate(Allocation("t", COMPACTION, 1))
    with pytest.raises(StopIteration) as finished:
        coro.send(None)  # runs to its end at once: nothing was awaited
    (turn,) = finished.value.value
    assert (turn.turn_id, turn.sequence) == ("auto-compact-0", 1)
    assert store.commits == 1  # counted, published and checkpointed as any commit
    assert await store.get("", "t", "auto-compact-0") == turn
    # A loop that was on the CPU all the time the writer was idle: that is load.
    store._writer_idle_since = time.monotonic() - idle
    store._writer_idle_cpu = time.thread_time() - idle
    busy = store.allocate(Allocation("t", COMPACTION, 1))
    waiting = busy.send(None)
    assert isinstance(waiting, asyncio.Future) and not waiting.done()
    committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting.add_done_callback(lambda _: committed.set_result(None))
    await committed  # the writer committed it, in a group of its own
    with pytest.raises(StopIteration) as finished:
        busy.send(None)
    (second,) = finished.value.value
    assert (second.turn_id, second.sequence) == ("auto-compact-1", 2)
    # Under load: a group from as many calls as the commit delay waits for (the writer is
    # not idle long enough for any of them to commit alone)...
    store._writer_idle_since = time.monotonic() + 60
    siblings = sqlite_module._COMMIT_SIBLINGS
    await asyncio.gather(
        *(store.allocate(Allocation(f"u{i}", COMPACTION, 1)) for i in range(siblings))
    )
    assert store.last_group_calls == siblings
    # ... and then, however long writer and loop have been idle, the next call queues.
    store._writer_idle_since, store._writer_idle_cpu = time.monotonic() - idle, time.thread_time()
    queued = store.allocate(Allocation("t", COMPACTION, 1))
    waiting = queued.send(None)  # it yielded: its future, which the writer will settle
    assert isinstance(waiting, asyncio.Future) and not waiting.done()
    waiting.cancel()  # given up: the writer drops it unwritten
    queued.close()
    # A group of 32 allocations from two allocate_many calls is too few calls for the commit
    # delay (a coalescing client's): after it a lone allocation commits alone again.
    await asyncio.gather(
        *(
            store.allocate_many([Allocation(f"{p}{i}", COMPACTION, 1) for i in range(16)])
            for p in "ab"
        )
    )
    assert (store.last_group_allocations, store.last_group_calls) == (32, 2)
    store._writer_idle_since, store._writer_idle_cpu = time.monotonic() - idle, time.thread_time()
    alone = store.allocate(Allocation("t", COMPACTION, 1))
    with pytest.raises(StopIteration):
        alone.send(None)


async def test_the_queue_bound_counts_turns(opened: Callable[..., Any]) -> None:
    store = await opened(max_pending=1500)
    outcomes = await asyncio.gather(
        store.allocate(Allocation("t", USER, 1000)),  # an empty queue takes any batch
        store.allocate(Allocation("t", USER, 1000)),  # 2000 turns > 1500
        store.allocate(Allocation("t", USER, 500)),  # 1500 turns: fits
        return_exceptions=True,
    )
    reasons = [o.reason if isinstance(o, TurnIdError) else "OK" for o in outcomes]
    assert reasons == ["OK", "OVERLOADED", "OK"]
    assert store.pending_turns == 0


async def test_groups_are_bounded_by_turns(opened: Callable[..., Any]) -> None:
    store = await opened()
    commits: list[tuple[int, int, float]] = []
    store.on_commit = lambda allocations, turns, seconds: commits.append(
        (allocations, turns, seconds)
    )
    batches = await asyncio.gather(
        *(store.allocate(Allocation(f"t{i % 3}", USER, 1000)) for i in range(10))
    )
    assert sum(len(batch) for batch in batches) == 10_000
    assert len(commits) >= 3  # 10 batches of 1000 turns, at most 4096 turns per commit
    assert all(turns <= 4096 and seconds >= 0 for _, turns, seconds in commits)
    assert sum(allocations for allocations, _, _ in commits) == 10
    assert sum(turns for _, turns, _ in commits) == 10_000
    assert (store.commits, store.allocations, store.turns) == (len(commits), 10, 10_000)
    assert (store.last_group_allocations, store.last_group_turns) == commits[-1][:2]


async def test_a_group_on_many_threads_writes_the_id_keyed_b_trees_at_their_edge(
    tmp_path: Path, opened: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema 3: the turn_id index and the requests key lead with the (time-ordered) id, so a
    commit of one allocation on each of N long threads dirties only the right edge of those
    two B-trees, where thread-leading keys dirtied a leaf per thread in each (every page a
    WAL frame). The turns themselves still take a leaf per thread."""
    path = tmp_path / "t.db"
    store = await opened(path)
    # No checkpoint of the store's own: one running would make the TRUNCATE below give up
    # (SQLITE_BUSY) and leave the earlier commits' frames in the WAL.
    monkeypatch.setattr(store, "_schedule_checkpoint", lambda: None)
    threads = [f"thread-{i:03d}" for i in range(32)]
    for _ in range(24):  # 96 turns and 24 requests per thread: each spans leaves of its own
        await asyncio.gather(
            *(store.allocate(Allocation(t, REALTIME, 4, str(uuid_utils.uuid7()))) for t in threads)
        )
    observer = sqlite3.connect(path, isolation_level=None)
    try:
        try:
            pages = dict(observer.execute("SELECT pageno, name FROM dbstat").fetchall())
        except sqlite3.OperationalError as error:
            pytest.skip(f"this SQLite has no dbstat table to tell pages apart: {error}")
        busy, frames, _ = observer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert (busy, frames) == (0, 0)  # the WAL starts empty
        (page_size,) = observer.execute("PRAGMA page_size").fetchone()
        commits = store.commits
        await asyncio.gather(
            *(store.allocate(Allocation(t, REALTIME, 1, str(uuid_utils.uuid7()))) for t in threads)
        )
        assert store.commits == commits + 1  # one group
        wal = await asyncio.to_thread(Path(f"{path}-wal").read_bytes)
    finally:
        observer.close()
    written = [
        int.from_bytes(wal[offset : offset + 4], "big")  # a frame's header: its page number
        for offset in range(32, len(wal), page_size + 24)
    ]
    by_tree: dict[str, int] = {}
    for page in written:
        name = pages.get(page, "new pages")
        by_tree[name] = by_tree.get(name, 0) + 1
    assert by_tree.get("turns", 0) >= len(threads), by_tree
    id_keyed = sum(
        n for name, n in by_tree.items() if name.startswith(("sqlite_autoindex_turns", "requests"))
    )
    assert id_keyed <= 6, by_tree


async def test_commits_are_checkpointed_in_the_background_and_the_wal_stays_bounded(
    tmp_path: Path, opened: Callable[..., Any]
) -> None:
    """The store turns SQLite's automatic checkpoint off (it would run inside a COMMIT, which may
    run on the event loop) and checkpoints in its own thread: commits still reach the database
    file without anyone else checkpointing, and the WAL restarts instead of growing."""
    path = tmp_path / "t.db"
    store = await opened(path)
    results: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue()
    store.on_checkpoint = results.put_nowait
    threads = [f"thread-{i:02d}" for i in range(32)]

    async def round_checkpointed() -> int:
        """One group on every thread, then wait until a checkpoint has taken the whole WAL:
        the WAL file's size then."""
        await asyncio.gather(
            *(store.allocate(Allocation(t, REALTIME, 4, str(uuid_utils.uuid7()))) for t in threads)
        )
        while True:  # a checkpoint that started before the last commit leaves frames behind
            busy, frames, done = await asyncio.wait_for(results.get(), timeout=10)
            if not busy and frames == done and store.commits == store._checkpoint_commits:
                return await asyncio.to_thread(os.path.getsize, f"{path}-wal")

    for _ in range(24):  # 96 turns per thread: each spans leaves of its own, as in the test above
        await round_checkpointed()
    rounds = 10
    sizes = [await round_checkpointed() for _ in range(rounds)]
    # Each round dirties at least a turns leaf per thread (a WAL frame of a page and its 24-byte
    # header each): a WAL that never restarted would hold them all.
    (page_size,) = store._write_conn.execute("PRAGMA page_size").fetchone()
    written = rounds * len(threads) * (page_size + 24)
    assert max(sizes) < written / 3, (sizes, written)
    # The database file alone (a copy without its WAL) has every turn.
    copy = tmp_path / "copy.db"
    copy.write_bytes(path.read_bytes())
    with sqlite3.connect(copy) as alone:
        (count,) = alone.execute("SELECT count(*) FROM turns").fetchone()
    assert count == (24 + rounds) * 4 * len(threads)


async def test_the_wal_restarts_under_sustained_load(
    tmp_path: Path, opened: Callable[..., Any]
) -> None:
    """A background pass (PASSIVE) takes only the frames there when it started, and SQLite
    restarts the WAL only at a write that finds all of it checkpointed: with commits that never
    pause, every pass is overtaken and the WAL would grow by every commit's frames (it did, ~100
    MB/s under load). The write loop's catch-up after such a pass lets it restart."""
    path = tmp_path / "t.db"
    store = await opened(path)
    passes: list[tuple[int, int, int]] = []
    store.on_checkpoint = passes.append
    threads = [f"thread-{i:02d}" for i in range(32)]
    for _ in range(24):  # 96 turns per thread: each spans leaves of its own
        await asyncio.gather(
            *(store.allocate(Allocation(t, REALTIME, 4, str(uuid_utils.uuid7()))) for t in threads)
        )
    (page_size,) = store._write_conn.execute("PRAGMA page_size").fetchone()
    allocations = store.allocations
    passes.clear()
    wanted = 12

    async def keep_allocating(thread_id: str) -> None:
        """One allocation in flight on this thread at all times: the queue never empties."""
        while len(passes) < wanted:
            await store.allocate(Allocation(thread_id, REALTIME, 1, str(uuid_utils.uuid7())))

    await asyncio.wait_for(asyncio.gather(*(keep_allocating(t) for t in threads)), 60)
    # Each allocation is on a thread of its own in its group, whose last leaf is its own: a WAL
    # frame at least. A WAL that never restarted would hold them all.
    written = (store.allocations - allocations) * (page_size + 24)
    size = await asyncio.to_thread(os.path.getsize, f"{path}-wal")
    assert size < written / 2, (size, written)
    assert store.catch_ups >= 1


async def test_big_groups_commit_on_the_event_loop_unless_the_disk_is_slow(
    opened: Callable[..., Any],
) -> None:
    """A group of _LOOP_COMMIT_MIN or more commits on the loop's thread, while such COMMITs
    are quick; once they are slow (a slow disk would stall the loop for every fsync) big groups
    commit in the writer thread, but one in _LOOP_COMMIT_PROBE still on the loop, to measure
    again; a disk that is quick again brings them back."""
    store = await opened()
    committed_by: list[str] = []

    def trace(statement: str) -> None:
        if statement == "COMMIT":
            committed_by.append(threading.current_thread().name)

    assert store._write_conn is not None
    store._write_conn.set_trace_callback(trace)
    loop_thread = threading.current_thread().name
    size = sqlite_module._LOOP_COMMIT_MIN

    async def big_group() -> str:
        before = store.commits
        await store.allocate_many([Allocation(f"t-{i}", REALTIME, 1) for i in range(size)])
        assert store.commits == before + 1  # one group
        return committed_by[-1]

    assert await big_group() == loop_thread
    # The disk turns slow: the last window of such COMMITs took 5 ms each.
    slow = [0.005] * sqlite_module._LOOP_COMMIT_WINDOW
    store._loop_commit_s.extend(slow)
    probe = sqlite_module._LOOP_COMMIT_PROBE
    threads = [await big_group() for _ in range(probe)]
    assert threads[:-1] == ["turnid-sqlite-writer"] * (probe - 1)
    assert threads[-1] == loop_thread  # the probe
    # The disk is quick again: the probes' quick COMMITs fill the window back.
    store._loop_commit_s.extend([0.0001] * sqlite_module._LOOP_COMMIT_WINDOW)
    assert await big_group() == loop_thread


async def test_one_quick_commit_among_slow_ones_means_the_disk_is_quick(
    opened: Callable[..., Any],
) -> None:
    """A COMMIT's time off the CPU is the disk plus the waits for the GIL and a CPU after it,
    which only add: the disk is slow only when every COMMIT of the window waited long."""
    store = await opened()
    size = sqlite_module._LOOP_COMMIT_MIN
    window = sqlite_module._LOOP_COMMIT_WINDOW
    slow, quick = sqlite_module._LOOP_COMMIT_MAX_S * 5, sqlite_module._LOOP_COMMIT_MAX_S / 2
    group = [Allocation(f"t-{i}", REALTIME, 1) for i in range(size)]
    store._loop_commit_s.extend([slow] * (window - 1) + [quick])  # most waited, one did not
    assert store._commits_on_loop(group)
    store._loop_commit_s.extend([slow] * window)
    assert not store._commits_on_loop(group)


async def test_the_commit_delay_counts_calls_not_allocations(opened: Callable[..., Any]) -> None:
    """After a group from _COMMIT_SIBLINGS calls or more the writer waits for as many calls (or
    allocations) to queue, or _COMMIT_DELAY_S; an allocate_many is one call however many
    allocations it holds, so a coalescing client's call never waits for its other one (they
    would then take turns), and a big one never waits for more calls."""
    store = await opened()
    delays: list[int] = []
    gather = store._gather

    async def counted(calls: int, allocations: int) -> None:
        delays.append(calls)
        await gather(calls, allocations)

    store._gather = counted

    def many(prefix: str) -> Any:
        return store.allocate_many([Allocation(f"{prefix}-{i}", REALTIME, 1) for i in range(16)])

    await asyncio.gather(many("a"), many("b"))  # queued together: one group from two calls
    assert (store.last_group_allocations, store.last_group_calls) == (32, 2)
    await many("c")  # 16 queued of the last group's 32 allocations: it goes at once
    assert (store.last_group_allocations, delays) == (16, [])
    # Unary calls: a group from _COMMIT_SIBLINGS of them makes the next call wait for more.
    store._writer_idle_since = time.monotonic() + 60  # none commits alone
    siblings = sqlite_module._COMMIT_SIBLINGS
    await asyncio.gather(
        *(store.allocate(Allocation(f"u{i}", REALTIME, 1)) for i in range(siblings))
    )
    assert store.last_group_calls == siblings
    await store.allocate(Allocation("u0", REALTIME, 1))
    assert delays == [siblings]
    # ... but not one that brings as many allocations as the last group had, or more.
    await asyncio.gather(
        *(store.allocate(Allocation(f"u{i}", REALTIME, 1)) for i in range(siblings))
    )
    assert store.last_group_calls == siblings
    await many("d")
    assert delays == [siblings]


async def test_the_rest_of_a_call_split_between_groups_counts_as_a_call(
    opened: Callable[..., Any],
) -> None:
    """A call whose allocations do not fit in one group (here by turns) goes on in the next
    group, where its rest counts as a call of its own for the commit delay."""
    store = await opened()
    await store.allocate_many([Allocation(f"t{i}", USER, 1000) for i in range(5)])
    assert store.commits >= 2  # at most 4,096 turns per group
    assert store.last_group_calls == 1


async def test_the_pieces_of_a_call_cut_twice_are_one_call_again_in_one_group(
    opened: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call cut by the turn bound, and then by the time bound inside its first group, has
    two pieces queued one behind the other; in the next group they count as one call."""
    store = await opened()
    clock, applied = [0.0], [0]
    real_apply = SqliteStore._apply

    def apply(self: SqliteStore, *args: Any) -> list[Turn]:
        applied[0] += 1
        if applied[0] == 2:  # the first group's time runs out after its second allocation
            clock[0] += 3600.0
        return real_apply(self, *args)

    # The store's own clock only (asyncio keeps the real one).
    shifted = types.SimpleNamespace(
        monotonic=lambda: time.monotonic() + clock[0],
        thread_time=time.thread_time,
        time_ns=time.time_ns,
        sleep=time.sleep,
    )
    monkeypatch.setattr(sqlite_module, "time", shifted)
    monkeypatch.setattr(SqliteStore, "_apply", apply)
    commits: list[int] = []
    store.on_commit = lambda allocations, turns, seconds: commits.append(allocations)
    await store.allocate_many([Allocation(f"t{i}", USER, 1000) for i in range(5)])
    # 4 fit the turn bound and 2 of them the time; then the other 2 and the fifth.
    assert commits == [2, 3]
    assert store.last_group_calls == 1


async def test_the_slow_disk_test_counts_a_commits_time_off_the_cpu(
    opened: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a big group's COMMIT on the loop tells of the disk (see _LOOP_COMMIT_MAX_S) is its
    wall time less the loop thread's CPU time: writing the group's WAL frames is the loop's own
    work, which grows with the group, not a slow disk."""
    store = await opened()
    size = sqlite_module._LOOP_COMMIT_MIN

    async def big_group(prefix: str) -> float:
        await store.allocate_many([Allocation(f"{prefix}-{i}", REALTIME, 1) for i in range(size)])
        return store._loop_commit_s[-1]

    # A COMMIT that never left the CPU waited for nothing, however long it took...
    monkeypatch.setattr(sqlite_module.time, "thread_time", time.monotonic)
    assert await big_group("cpu") == pytest.approx(0, abs=1e-4)
    # ... and one that spent no CPU waited all along.
    monkeypatch.setattr(sqlite_module.time, "thread_time", lambda: 0.0)
    waited = await big_group("disk")
    assert 0 < waited <= store.last_commit_seconds


async def test_groups_are_bounded_by_time_under_the_lock(
    opened: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await opened()
    monkeypatch.setattr(sqlite_module, "_MAX_GROUP_S", 0.0)  # every group runs out at once
    commits: list[int] = []
    store.on_commit = lambda allocations, turns, seconds: commits.append(allocations)
    turns = await asyncio.gather(
        *(store.allocate(Allocation("t", COMPACTION, 1)) for _ in range(8))
    )
    # Each transaction decided one allocation; the rest went back to the head of the queue,
    # so the queue's order still holds.
    assert commits == [1] * 8
    assert [t.turn_id for (t,) in turns] == [f"auto-compact-{n}" for n in range(8)]


async def test_a_broken_commit_hook_does_not_stop_the_writer(opened: Callable[..., Any]) -> None:
    store = await opened()

    def hook(allocations: int, turns: int, seconds: float) -> None:
        raise RuntimeError("metrics bug")

    store.on_commit = hook
    await store.allocate(Allocation("t", COMPACTION, 1))
    (turn,) = await store.allocate(Allocation("t", COMPACTION, 1))
    assert turn.sequence == 2


async def _a_group_waiting_for_the_lock(
    store: SqliteStore, path: Path
) -> tuple[sqlite3.Connection, asyncio.Task[list[Turn]]]:
    """Hold the file's write lock on another connection, and queue an allocation ("first" on
    thread "t") whose group waits for it: what the writer takes next stays queued meanwhile.
    Returns the connection (ROLLBACK and close it to let the writer on) and the allocation."""
    formed = asyncio.Event()
    take_group = store._take_group

    def take() -> Any:
        group = take_group()
        formed.set()
        return group

    store._take_group = take
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the writer's next group waits for the lock
    first = asyncio.create_task(store.allocate(Allocation("t", COMPACTION, 1, "first")))
    await asyncio.wait_for(formed.wait(), 10)  # "first" is in a group, waiting for the lock
    return blocker, first


async def test_requests_whose_caller_gave_up_are_not_written(
    tmp_path: Path, opened: Callable[..., Any]
) -> None:
    path = tmp_path / "t.db"
    store = await opened(path)
    blocker, first = await _a_group_waiting_for_the_lock(store, path)
    with pytest.raises(TimeoutError):  # a caller's deadline runs out while it is queued
        await asyncio.wait_for(store.allocate(Allocation("t", COMPACTION, 1, "gave-up")), 0.05)
    assert store.pending_turns == 1  # still queued, its future cancelled
    kept = asyncio.create_task(store.allocate(Allocation("t", COMPACTION, 1, "kept")))
    blocker.execute("ROLLBACK")
    blocker.close()
    (a,) = await asyncio.wait_for(first, 10)
    (b,) = await asyncio.wait_for(kept, 10)
    assert (a.sequence, b.sequence) == (1, 2)
    assert [t.request_id for t in await store.list("", "t", 0, 10)] == ["first", "kept"]
    assert store.dropped == 1
    assert store._write_conn is not None
    assert store._write_conn.execute(
        "SELECT count(*) FROM requests WHERE request_id = 'gave-up'"
    ).fetchone() == (0,)


async def test_an_allocate_many_whose_caller_gave_up_writes_none_of_its_allocations(
    tmp_path: Path, opened: Callable[..., Any]
) -> None:
    """A call's allocations share one future: cancelling it drops every one still queued."""
    path = tmp_path / "t.db"
    store = await opened(path)
    blocker, first = await _a_group_waiting_for_the_lock(store, path)
    given_up = [Allocation(f"g{i}", COMPACTION, 1, f"gave-up-{i}") for i in range(3)]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(store.allocate_many(given_up), 0.05)
    kept = asyncio.create_task(
        store.allocate_many([Allocation("t", COMPACTION, 1, "kept"), Allocation("g0", USER, 1)])
    )
    blocker.execute("ROLLBACK")
    blocker.close()
    (a,) = await asyncio.wait_for(first, 10)
    b, c = await asyncio.wait_for(kept, 10)
    assert isinstance(b, Sequence) and isinstance(c, Sequence)
    assert (a.sequence, b[0].sequence, c[0].sequence) == (1, 2, 1)
    assert store.dropped == 3
    assert store._write_conn is not None
    assert store._write_conn.execute(
        "SELECT count(*) FROM requests WHERE request_id LIKE 'gave-up-%'"
    ).fetchone() == (0,)


# --- several stores (processes) on one file ---------------------------------------------------


async def test_a_watcher_on_one_store_is_woken_by_a_commit_through_another(
    opened: Callable[..., Any],
) -> None:
    watched, writer = await opened(), await opened()
    with watched.changes.subscribe(("ns", "t")) as subscription:
        subscription.clear()
        await writer.allocate(Allocation("t", COMPACTION, 1, namespace="ns"))
        await asyncio.wait_for(subscription.wait(None), 10)
        # And again: the poller keeps following the file.
        subscription.clear()
        await writer.allocate(Allocation("t", COMPACTION, 1, namespace="ns"))
        await asyncio.wait_for(subscription.wait(None), 10)
    assert watched.changes.watchers == 0


async def test_a_store_tells_its_own_commits_from_other_connections(
    opened: Callable[..., Any],
) -> None:
    store, other = await opened(), await opened()
    loop = asyncio.get_running_loop()

    async def foreign() -> bool:
        return bool(await loop.run_in_executor(store._writer, store._foreign_commits))

    await foreign()  # a baseline
    await store.allocate(Allocation("t", COMPACTION, 1))
    assert not await foreign()  # its own commit
    await other.allocate(Allocation("t", COMPACTION, 1))
    assert await foreign()
    assert not await foreign()


async def test_uuid_order_is_sequence_order_across_two_stores_on_one_file(
    opened: Callable[..., Any],
) -> None:
    stores = [await opened(), await opened()]
    kinds = [REALTIME, USER]
    await asyncio.gather(
        *(stores[i % 2].allocate(Allocation("t", kinds[i // 2 % 2], 1)) for i in range(2000))
    )
    turns = await stores[0].list("", "t", 0, 5000)
    assert [t.sequence for t in turns] == list(range(1, 2001))
    ids = [t.turn_id for t in turns]
    assert ids == sorted(ids) and len(set(ids)) == 2000  # invariant 8


async def test_a_conditional_race_across_two_stores_has_one_winner_per_round(
    opened: Callable[..., Any],
) -> None:
    stores = [await opened(), await opened()]
    last = 0
    for round_ in range(25):
        outcomes = await asyncio.gather(
            *(
                stores[i % 2].allocate(
                    Allocation("t", kinds, 1 + i % 2, f"r{round_}-{i}", expected_last_sequence=last)
                )
                for i, kinds in enumerate([REALTIME, COMPACTION, USER, COMPACTION] * 4)
            ),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if isinstance(o, Sequence)]
        losers = [o for o in outcomes if isinstance(o, TurnIdError)]
        assert len(winners) == 1 and len(losers) == 15, outcomes
        assert {e.reason for e in losers} == {"THREAD_ADVANCED"}
        (won,) = winners
        assert won[0].sequence == last + 1
        last = won[-1].sequence
        assert {e.metadata["last_sequence"] for e in losers} == {str(last)}
    info = await stores[1].get_thread("", "t")
    assert info is not None and info.state.last_sequence == last


async def test_the_wal_file_is_cut_back_when_it_restarts(
    tmp_path: Path, opened: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite reuses the WAL from its start after a checkpoint has caught up but keeps the
    file's size; with journal_size_limit the first commit after such a restart truncates it,
    so the file (and turnid_sqlite_wal_bytes) comes back down after a burst."""
    limit = 64 * 1024
    monkeypatch.setattr(sqlite_module, "WAL_SIZE_LIMIT_BYTES", limit)
    path = tmp_path / "t.db"
    store = await opened(path)
    # No checkpoint of the store's own: the one below must be the one that catches up.
    monkeypatch.setattr(store, "_schedule_checkpoint", lambda: None)
    for n in range(4):  # a burst: 4,000 turns in the WAL, well past the limit
        await store.allocate(Allocation("burst", USER, 1000, f"r{n}"))
    burst = store.wal_bytes()
    assert burst > 4 * limit
    # A checkpoint that catches up (nobody reads), then one more commit restarts the WAL.
    with sqlite3.connect(path) as observer:
        busy, frames, checkpointed = observer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and checkpointed == frames
    await store.allocate(Allocation("after", USER, 1))
    assert 0 < store.wal_bytes() <= limit
    assert store.wal_bytes() == os.stat(f"{path}-wal").st_size
