"""The embedded default store: one SQLite file, safe to share between service processes.

Durability: WAL with synchronous=FULL, so an acknowledged allocation survives kill -9 and
power loss. Throughput: every allocation goes through one writer thread that takes all requests
queued behind it and commits them in one `BEGIN IMMEDIATE` transaction (group commit), so the
fsync is shared. Every request of the group is decided (read-only) before anything is written,
then the group's rows go out in one executemany per table: a refused request has written
nothing, so it never undoes or blocks its neighbours, and needs no savepoint. Processes sharing
the file serialize on SQLite's write lock (busy_timeout); every transaction reads the threads'
counters under that lock, so ids stay unique.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from turnid.service.domain.errors import (
    TurnIdError,
    overloaded,
    request_id_reused,
    store_unavailable,
    turn_id_taken,
)
from turnid.service.domain.model import Allocation, Turn, TurnKind

# Forward-only migrations; PRAGMA user_version counts how many have been applied.
MIGRATIONS: Sequence[str] = (
    """
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
    """,
)

_TURN_COLUMNS = "thread_id, turn_id, kind, sequence, create_time_us, request_id, claimed"
_MAX_GROUP = 1024
# Commit delay: after a group of at least _COMMIT_SIBLINGS allocations, the writer waits this
# long (asyncio's timer resolution is 1 ms) before taking the next group, unless as many are
# queued already. Each commit costs ~150-200 µs of CPU (BEGIN IMMEDIATE, WAL frames, fsync)
# whatever its size, so on a CPU-bound server bigger groups mean more allocations per second:
# at concurrency 32 no delay gives ~3 allocations per commit, 1 ms ~10, 2 ms ~13 (bench/:
# commits/s vs allocations/s), with p50/p99 at c32 no worse, since the server keeps up better.
# A caller at concurrency 1 never waits; the first caller after a burst may wait up to 2 ms once.
_COMMIT_SIBLINGS = 4
_COMMIT_DELAY_S = 0.002
_T = TypeVar("_T")

log = logging.getLogger("turnid.stores.sqlite")


class _Batch:
    """One group's transaction while it is being decided: what to write, and what it knows.

    The transaction holds the file's write lock from BEGIN IMMEDIATE to COMMIT, so what it has
    read cannot change underneath it: each thread's counters are read once and then carried
    here from one allocation to the next. Nothing is written until every allocation of the
    group is decided; then one executemany per table writes them all (`write`), each thread's
    counters once. A refused request has queued nothing, so it needs no savepoint.
    """

    __slots__ = ("claims", "counters", "cursor", "request_rows", "requests", "turn_rows")

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.cursor = cursor
        # thread_id -> [next_sequence, next_compaction], as they stand after the group so far
        self.counters: dict[str, list[int]] = {}
        # (thread_id, request_id) -> the request and its turns, for copies later in the group
        self.requests: dict[tuple[str, str], tuple[Allocation, list[Turn]]] = {}
        self.claims: set[tuple[str, str]] = set()  # (thread_id, turn_id) claimed in the group
        self.turn_rows: list[tuple[str, str, int, int, int, str, bool]] = []
        self.request_rows: list[tuple[str, str, int, int, str | None, int]] = []

    def write(self) -> None:
        cursor = self.cursor
        if self.turn_rows:
            cursor.executemany(
                f"INSERT INTO turns ({_TURN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                self.turn_rows,
            )
        if self.counters:
            cursor.executemany(
                "INSERT INTO threads (thread_id, next_sequence, next_compaction) "
                "VALUES (?, ?, ?) ON CONFLICT (thread_id) DO UPDATE SET "
                "next_sequence = excluded.next_sequence, "
                "next_compaction = excluded.next_compaction",
                [(thread_id, seq, comp) for thread_id, (seq, comp) in self.counters.items()],
            )
        if self.request_rows:
            cursor.executemany(
                "INSERT INTO requests (thread_id, request_id, kind, count, claimed_turn_id, "
                "first_sequence) VALUES (?, ?, ?, ?, ?, ?)",
                self.request_rows,
            )


def _turn(row: tuple[str, str, int, int, int, str, int]) -> Turn:
    return Turn(row[0], row[1], TurnKind(row[2]), row[3], row[4], row[5], bool(row[6]))


def _connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves.
    conn = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    _set_wal(conn, time.monotonic() + busy_timeout_s)
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _set_wal(conn: sqlite3.Connection, deadline: float) -> None:
    """PRAGMA journal_mode=WAL, retried while another process holds the lock it needs.

    Switching a new file to WAL needs an exclusive lock, and when processes opening the same
    new file race for it (`turnid serve --workers N`), SQLite refuses the losers at once with
    SQLITE_BUSY instead of calling its busy handler; so wait here, up to the busy timeout.
    """
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            busy = getattr(error, "sqlite_errorname", "").startswith("SQLITE_BUSY")
            if not busy or time.monotonic() >= deadline:
                conn.close()
                raise
            time.sleep(0.005)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations under the write lock; returns the schema version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"database schema version {version} is newer than this turnid "
                f"(knows {len(MIGRATIONS)}); upgrade turnid"
            )
        for script in MIGRATIONS[version:]:
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={len(MIGRATIONS)}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(MIGRATIONS)


class SqliteStore:
    def __init__(
        self, path: str, *, busy_timeout_s: float = 10.0, max_pending: int = 10_000
    ) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        # Allocations queued for the writer beyond this are refused RESOURCE_EXHAUSTED/OVERLOADED
        # at once: a bounded queue keeps latency bounded and tells clients to back off.
        self._max_pending = max_pending
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="turnid-sqlite-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="turnid-sqlite-reader")
        self._write_conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._pending: deque[tuple[Allocation, asyncio.Future[list[Turn]]]] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._write_loop_task: asyncio.Task[None] | None = None
        # Group-commit figures, logged at close: allocations / commits = mean group size.
        self.allocations = 0  # allocations applied in committed transactions
        self.commits = 0  # transactions committed
        self._last_group = 0  # size of the last group committed, for the commit delay

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        try:
            self._write_conn = await loop.run_in_executor(self._writer, self._open_writer)
            self._read_conn = await loop.run_in_executor(
                self._reader, _connect, self.path, self._busy_timeout_s
            )
        except sqlite3.Error as error:
            raise RuntimeError(f"cannot open SQLite database {self.path}: {error}") from error
        self._write_loop_task = asyncio.create_task(self._write_loop(), name="sqlite-writer")

    def _open_writer(self) -> sqlite3.Connection:
        conn = _connect(self.path, self._busy_timeout_s)
        migrate(conn)
        return conn

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wakeup.set()
        if self._write_loop_task is not None:
            await self._write_loop_task
        loop = asyncio.get_running_loop()
        if self._write_conn is not None:
            await loop.run_in_executor(self._writer, self._write_conn.close)
        if self._read_conn is not None:
            await loop.run_in_executor(self._reader, self._read_conn.close)
        self._writer.shutdown()
        self._reader.shutdown()
        log.info(
            "sqlite store closed: %d allocations in %d commits", self.allocations, self.commits
        )

    # --- writes: group commit -------------------------------------------------------------

    async def allocate(self, allocation: Allocation) -> list[Turn]:
        if self._closing:
            raise store_unavailable("store is closing")
        if len(self._pending) >= self._max_pending:
            raise overloaded(len(self._pending))
        future: asyncio.Future[list[Turn]] = asyncio.get_running_loop().create_future()
        self._pending.append((allocation, future))
        self._wakeup.set()
        return await future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                if self._last_group >= _COMMIT_SIBLINGS and len(self._pending) < self._last_group:
                    # Requests are arriving faster than commits finish, and fewer are queued
                    # than joined the last group: let more join this one, so that one fsync
                    # serves them all (cf. PostgreSQL's commit_delay).
                    await asyncio.sleep(_COMMIT_DELAY_S)
                group = [
                    self._pending.popleft() for _ in range(min(len(self._pending), _MAX_GROUP))
                ]
                self._last_group = len(group)
                try:
                    results = await loop.run_in_executor(
                        self._writer, self._commit_group, [allocation for allocation, _ in group]
                    )
                except Exception as error:  # a bug must fail these calls, not stall the store
                    results = [error] * len(group)
                for (_, future), result in zip(group, results, strict=True):
                    if future.done():  # the caller gave up (deadline); the write stands
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
            if self._closing:
                return

    def _commit_group(self, group: list[Allocation]) -> Sequence[list[Turn] | BaseException]:
        conn = self._write_conn
        assert conn is not None
        results: list[list[Turn] | BaseException] = []
        # One cursor for the whole group: Connection.execute would make one per statement.
        cursor = conn.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            batch = _Batch(cursor)
            now_us = time.time_ns() // 1000
            for allocation in group:
                try:
                    results.append(self._apply(batch, allocation, now_us))
                except TurnIdError as error:
                    # _apply refuses before it has changed anything (it only reads), so the
                    # refusal needs no savepoint and its neighbours go on.
                    results.append(error)
            batch.write()
            cursor.execute("COMMIT")
        except Exception as error:
            # Never leave the transaction (and the file's write lock) open behind a failure.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(error, sqlite3.IntegrityError):
                if len(group) > 1:
                    # A write broke a constraint that _apply's checks did not foresee (none is
                    # known). The group's writes went out together, so the culprit is unknown:
                    # commit each allocation alone, and only the culprit fails.
                    log.warning(
                        "group commit: %s; retrying its %d allocations alone", error, len(group)
                    )
                    return [result for one in group for result in self._commit_group([one])]
                return [error]
            if isinstance(error, sqlite3.Error):
                return [store_unavailable(f"sqlite: {error}")] * len(group)
            log.exception("group commit failed; rolled back %d allocations", len(group))
            return [error] * len(group)
        self.commits += 1
        self.allocations += len(group)
        return results

    def _apply(self, batch: _Batch, allocation: Allocation, now_us: int) -> list[Turn]:
        """Decide one allocation of the group: its turns, or a refusal (TurnIdError).

        Only reads; the rows to write are queued on `batch`, which writes the whole group at
        once before COMMIT.
        """
        cursor = batch.cursor
        thread_id = allocation.thread_id
        request_id = allocation.request_id
        claimed = allocation.claimed_turn_id
        if request_id:
            earlier = batch.requests.get((thread_id, request_id))
            if earlier is not None:  # a copy of a request decided earlier in this group
                original, turns = earlier
                if not allocation.same_request(
                    original.kind, original.count, original.claimed_turn_id
                ):
                    raise request_id_reused(thread_id, request_id)
                return list(turns)
            seen = cursor.execute(
                "SELECT kind, count, claimed_turn_id, first_sequence FROM requests "
                "WHERE thread_id = ? AND request_id = ?",
                (thread_id, request_id),
            ).fetchone()
            if seen is not None:
                kind, count, claimed_turn_id, first = seen
                if not allocation.same_request(kind, count, claimed_turn_id):
                    raise request_id_reused(thread_id, request_id)
                return self._read_range(cursor, thread_id, first - 1, count)
        if claimed is not None and (
            (thread_id, claimed) in batch.claims
            or cursor.execute(
                "SELECT 1 FROM turns WHERE thread_id = ? AND turn_id = ?", (thread_id, claimed)
            ).fetchone()
        ):
            raise turn_id_taken(thread_id, claimed)

        counters = batch.counters.get(thread_id)
        if counters is None:
            # Read once per thread and group: the group holds the write lock, so no one else
            # can move them; later allocations in the group continue from the copy.
            row = cursor.execute(
                "SELECT next_sequence, next_compaction FROM threads WHERE thread_id = ?",
                (thread_id,),
            ).fetchone()
            counters = batch.counters[thread_id] = [row[0], row[1]] if row else [1, 0]
        first, next_compaction = counters
        kind = allocation.kind
        is_claim = claimed is not None
        turn_ids = allocation.turn_ids(next_compaction)
        turns = [
            Turn(thread_id, turn_id, kind, first + i, now_us, request_id, is_claim)
            for i, turn_id in enumerate(turn_ids)
        ]
        batch.turn_rows.extend(
            (thread_id, turn_id, kind, first + i, now_us, request_id, is_claim)
            for i, turn_id in enumerate(turn_ids)
        )
        counters[0] = first + len(turns)
        counters[1] = next_compaction + allocation.compactions
        if claimed is not None:
            batch.claims.add((thread_id, claimed))
        if request_id:
            batch.requests[(thread_id, request_id)] = (allocation, turns)
            batch.request_rows.append(
                (thread_id, request_id, kind, allocation.count, claimed, first)
            )
        return turns

    # --- reads: WAL readers never wait for the writer -------------------------------------

    @staticmethod
    def _read_range(
        conn: sqlite3.Connection | sqlite3.Cursor, thread_id: str, after_sequence: int, limit: int
    ) -> list[Turn]:
        rows = conn.execute(
            f"SELECT {_TURN_COLUMNS} FROM turns WHERE thread_id = ? AND sequence > ? "
            "ORDER BY sequence LIMIT ?",
            (thread_id, after_sequence, limit),
        ).fetchall()
        return [_turn(row) for row in rows]

    async def _read(self, query: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._read_conn
        if conn is None or self._closing:
            raise store_unavailable("store is closed")

        def run() -> _T:
            try:
                return query(conn)
            except sqlite3.OperationalError as error:
                raise store_unavailable(f"sqlite: {error}") from error

        return await asyncio.get_running_loop().run_in_executor(self._reader, run)

    async def get(self, thread_id: str, turn_id: str) -> Turn | None:
        def query(conn: sqlite3.Connection) -> Turn | None:
            row = conn.execute(
                f"SELECT {_TURN_COLUMNS} FROM turns WHERE thread_id = ? AND turn_id = ?",
                (thread_id, turn_id),
            ).fetchone()
            return _turn(row) if row else None

        return await self._read(query)

    async def list(self, thread_id: str, after_sequence: int, limit: int) -> list[Turn]:
        return await self._read(
            lambda conn: self._read_range(conn, thread_id, after_sequence, limit)
        )
