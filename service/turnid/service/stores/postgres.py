"""The PostgreSQL store: any number of stateless `turnid serve` replicas on one database.

An allocation is at most two statements on an autocommit connection:

1. with a request_id, look it up; a known one returns the original turns (or REQUEST_ID_REUSED);
2. one statement (so one transaction, READ COMMITTED is enough) whose data-modifying CTEs run
   `INSERT INTO threads ... ON CONFLICT DO UPDATE ... RETURNING` to create or bump the thread's
   counters, insert the request row (if any), and insert the turns at consecutive sequences.
   The counter update row-locks the thread until the statement commits, so allocations within a
   thread are serialized across every replica while other threads proceed in parallel; the lock
   is held for one statement and its commit, never across a network round trip to us.

A request with the same request_id that committed after step 1 (it held the lock we waited
for) makes step 2 hit the requests primary key (the request row is inserted before the turns,
so this holds for claims too): retried, and step 1 then finds it. A claimed id the thread
already has hits the (thread_id, turn_id) unique key: TURN_ID_TAKEN, nothing written.
Serialization failures and deadlocks (engines running SERIALIZABLE) are retried in here.

Faults: connection errors, pool timeouts and any other database error become STORE_UNAVAILABLE
(gRPC UNAVAILABLE, retryable with the same request_id), never INTERNAL. The pool replaces
broken connections in the background, so the store recovers by itself after a database restart;
a pooled connection found dead is replaced transparently when repeating the work is safe (reads,
allocations with a request_id). When the database cannot be reached at `open()`, it raises
`PostgresUnreachableError` (a RuntimeError) with a one-line message.

Migrations are the SQL files in `postgres_migrations/` (`NNNN_name.sql`), applied in order in one
transaction under a transaction-level advisory lock and recorded in `turnid_schema_migrations`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from turnid.service.config import redact_url
from turnid.service.domain.errors import (
    TurnIdError,
    request_id_reused,
    store_unavailable,
    turn_id_taken,
)
from turnid.service.domain.model import COMPACTION_PREFIX, Allocation, Turn, TurnKind

log = logging.getLogger("turnid.postgres")
_T = TypeVar("_T")

Connection = psycopg.AsyncConnection[TupleRow]

SCHEMA_TABLE = "turnid_schema_migrations"
# pg_advisory_xact_lock key that serializes migrations across replicas: "turnid" in ASCII.
MIGRATION_LOCK_KEY = 0x7475726E6964
_MIGRATION_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_DEFAULT_CONNECT_TIMEOUT_S = 5

_TURN_COLUMNS = "thread_id, turn_id, kind, sequence, create_time_us, request_id, claimed"
# One statement, so one transaction and one round trip: create or bump the thread's counter row
# (INSERT ... ON CONFLICT DO UPDATE row-locks it until the statement commits, serializing
# allocations within the thread), then insert the request row (if any) and the turns at the
# sequences the bump returned. `turn_ids` holds the minted or claimed ids, or NULLs for
# compaction turns, which take `auto-compact-<n>` from the counter.
#
# The request row must be inserted before the turns: a copy of this request that committed
# while we waited for the thread's lock must fail on requests_pkey (retried: the lookup then
# returns the original), not on the claimed turn id (TURN_ID_TAKEN). PostgreSQL runs
# data-modifying CTEs in no promised order (in practice one that nothing reads runs last), so
# the order is made a data dependency: the turns take their first sequence from the request
# row's RETURNING (`start`), which exists only once that row is in, past its unique check.
_ALLOCATE = """
WITH bump AS (
    INSERT INTO threads AS t (thread_id, next_sequence, next_compaction)
    VALUES (%(thread_id)s, 1 + %(count)s, %(compactions)s)
    ON CONFLICT (thread_id) DO UPDATE SET
        next_sequence = t.next_sequence + %(count)s,
        next_compaction = t.next_compaction + %(compactions)s
    RETURNING t.next_sequence - %(count)s AS first_sequence,
              t.next_compaction - %(compactions)s AS first_compaction
), request AS (
    INSERT INTO requests (thread_id, request_id, kind, count, claimed_turn_id, first_sequence)
    SELECT %(thread_id)s, %(request_id)s, %(kind)s, %(count)s, %(claimed_turn_id)s,
           bump.first_sequence
    FROM bump
    WHERE %(request_id)s <> ''
    RETURNING first_sequence
), start AS (
    SELECT first_sequence FROM request
    UNION ALL
    SELECT first_sequence FROM bump WHERE %(request_id)s = ''
), new_turns AS (
    INSERT INTO turns (thread_id, turn_id, kind, sequence, create_time_us, request_id, claimed)
    SELECT %(thread_id)s,
           COALESCE(ids.turn_id, %(compaction_prefix)s || (bump.first_compaction + ids.n - 1)),
           %(kind)s, start.first_sequence + ids.n - 1, %(create_time_us)s, %(request_id)s,
           %(claimed)s
    FROM bump, start, unnest(%(turn_ids)s::text[]) WITH ORDINALITY AS ids(turn_id, n)
    RETURNING turn_id, sequence
)
SELECT turn_id, sequence FROM new_turns ORDER BY sequence
"""
_TURN_ID_KEY = "turns_thread_id_turn_id_key"


class PostgresUnreachableError(RuntimeError):
    """The database could not be reached (or its schema is not usable) when the store opened."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: bytes


@dataclass(frozen=True, slots=True)
class MigrationResult:
    version: int  # the schema version after the run
    applied: Sequence[str]  # file names applied by this run


def migrations() -> list[Migration]:
    """The migrations shipped with this turnid, in order; versions must run 1, 2, 3, ..."""
    folder = resources.files("turnid.service.stores").joinpath("postgres_migrations")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), entry.name, entry.read_bytes()))
    found.sort(key=lambda migration: migration.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        names = [m.name for m in found]
        raise RuntimeError(f"PostgreSQL migrations are not numbered 1..n: {names}")
    return found


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _connect_kwargs(url: str) -> dict[str, Any]:
    """autocommit (transactions are explicit), and a connect timeout unless the URL sets one."""
    kwargs: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in conninfo_to_dict(url):
        kwargs["connect_timeout"] = _DEFAULT_CONNECT_TIMEOUT_S
    return kwargs


async def migrate(url: str, *, apply: bool = True) -> MigrationResult:
    """Bring the schema up to date (`apply`), or only check that it is.

    Safe to run from several replicas at once: everything happens in one transaction that first
    takes a transaction-level advisory lock, so one replica migrates and the others then find
    nothing to do. DDL is transactional in PostgreSQL, so a failed migration leaves no trace.
    Raises PostgresUnreachableError when the database cannot be reached, and RuntimeError when
    the schema is newer than this turnid or (with apply=False) older.
    """
    known = migrations()
    try:
        conn = await psycopg.AsyncConnection.connect(url, **_connect_kwargs(url))
    except psycopg.Error as error:
        raise PostgresUnreachableError(
            f"cannot connect to PostgreSQL at {redact_url(url)}: {_one_line(error)}"
        ) from error
    try:
        async with conn, conn.transaction():
            if apply:
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} ("
                    "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                    "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
            applied = await _applied_versions(conn)
            current = max(applied, default=0)
            if current > len(known):
                raise RuntimeError(
                    f"the PostgreSQL schema is at version {current}, newer than this turnid "
                    f"knows ({len(known)}); upgrade turnid"
                )
            pending = [m for m in known if m.version not in applied]
            if pending and not apply:
                raise RuntimeError(
                    f"the PostgreSQL schema is at version {current}, this turnid needs "
                    f"{len(known)}: run `turnid migrate --database URL` first "
                    "(or start without --no-migrate)"
                )
            for migration in pending:
                log.info("applying PostgreSQL migration %s", migration.name)
                await conn.execute(migration.sql)
                await conn.execute(
                    f"INSERT INTO {SCHEMA_TABLE} (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
    except psycopg.OperationalError as error:
        raise PostgresUnreachableError(
            f"PostgreSQL at {redact_url(url)} failed during migration: {_one_line(error)}"
        ) from error
    return MigrationResult(len(known), [m.name for m in pending])


async def _applied_versions(conn: Connection) -> set[int]:
    exists = await (await conn.execute("SELECT to_regclass(%s)", (SCHEMA_TABLE,))).fetchone()
    if exists is None or exists[0] is None:
        return set()
    rows = await (await conn.execute(f"SELECT version FROM {SCHEMA_TABLE}")).fetchall()
    return {int(row[0]) for row in rows}


def _turn(row: TupleRow) -> Turn:
    return Turn(row[0], row[1], TurnKind(row[2]), row[3], row[4], row[5], bool(row[6]))


def _unavailable(error: psycopg.Error) -> TurnIdError:
    if not isinstance(error, psycopg.OperationalError):
        # Not a transient fault: still UNAVAILABLE for the caller, but worth a look.
        log.error("unexpected PostgreSQL error", exc_info=error)
    state = f" [{error.sqlstate}]" if error.sqlstate else ""
    return store_unavailable(f"postgresql{state}: {_one_line(error)}")


class _Retry(Exception):
    """The transaction was rolled back for a reason that a fresh attempt resolves."""


class PostgresStore:
    def __init__(
        self,
        url: str,
        *,
        migrate: bool = True,
        min_size: int = 2,
        max_size: int = 10,
        acquire_timeout_s: float = 5.0,
        open_timeout_s: float = 10.0,
        max_attempts: int = 5,
    ) -> None:
        self.url = url
        self.migrate = migrate
        self._min_size = min_size
        self._max_size = max_size
        self._acquire_timeout_s = acquire_timeout_s
        self._open_timeout_s = open_timeout_s
        self._max_attempts = max_attempts
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._closed = False

    async def open(self) -> None:
        await migrate(self.url, apply=self.migrate)
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self.url,
            kwargs=_connect_kwargs(self.url),
            min_size=self._min_size,
            max_size=self._max_size,
            timeout=self._acquire_timeout_s,
            name="turnid",
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=self._open_timeout_s)
        except PoolTimeout as error:
            await pool.close()
            raise PostgresUnreachableError(
                f"cannot open a connection pool to PostgreSQL at {redact_url(self.url)}: "
                f"{_one_line(error)}"
            ) from error
        self._pool = pool

    async def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _require_pool(self) -> AsyncConnectionPool[Connection]:
        if self._pool is None:
            raise store_unavailable("store is closed" if self._closed else "store is not open")
        return self._pool

    # --- writes ------------------------------------------------------------------------------

    async def allocate(self, allocation: Allocation) -> list[Turn]:
        # With a request_id a repeat is harmless (it returns what the first attempt committed),
        # so a pooled connection found dead can be replaced transparently.
        return await self._run(
            lambda conn: self._allocate_once(conn, allocation),
            idempotent=bool(allocation.request_id),
        )

    async def _run(self, work: Callable[[Connection], Awaitable[_T]], *, idempotent: bool) -> _T:
        """`work` on a pooled connection. Rolled-back conflicts are retried; a connection that
        turns out dead is replaced once when repeating `work` is safe; everything else that
        goes wrong in the database is STORE_UNAVAILABLE."""
        pool = self._require_pool()
        attempt = 0
        replaced = False
        while True:
            attempt += 1
            used: Connection | None = None
            try:
                async with pool.connection() as conn:
                    used = conn
                    return await work(conn)
            except (_Retry, pg_errors.SerializationFailure, pg_errors.DeadlockDetected) as error:
                if attempt >= self._max_attempts:
                    raise store_unavailable(
                        f"postgresql: gave up after {attempt} attempts: {_one_line(error)}"
                    ) from error
                log.debug("retrying (attempt %d): %s", attempt, error)
            except psycopg.Error as error:
                # A pooled connection that died while idle (say the database restarted): the
                # pool discards it; a repeat gets a fresh one or waits for the pool to reconnect.
                if idempotent and not replaced and used is not None and used.broken:
                    replaced = True
                    log.info("PostgreSQL connection lost (%s); retrying", _one_line(error))
                    continue
                raise _unavailable(error) from error

    async def _allocate_once(self, conn: Connection, allocation: Allocation) -> list[Turn]:
        thread_id = allocation.thread_id
        request_id = allocation.request_id
        claimed = allocation.claimed_turn_id
        if request_id:
            seen = await (
                await conn.execute(
                    "SELECT kind, count, claimed_turn_id, first_sequence FROM requests "
                    "WHERE thread_id = %s AND request_id = %s",
                    (thread_id, request_id),
                )
            ).fetchone()
            if seen is not None:
                kind, count, claimed_turn_id, first = seen
                if not allocation.same_request(kind, count, claimed_turn_id):
                    raise request_id_reused(thread_id, request_id)
                return await self._read_range(conn, thread_id, first - 1, count)

        counted = claimed is None and allocation.kind is TurnKind.AUTO_COMPACTION
        now_us = time.time_ns() // 1000
        try:
            cursor = await conn.execute(
                _ALLOCATE,
                {
                    "thread_id": thread_id,
                    "count": allocation.count,
                    "compactions": allocation.compactions,
                    "request_id": request_id,
                    "kind": int(allocation.kind),
                    "claimed_turn_id": claimed,
                    "claimed": claimed is not None,
                    "compaction_prefix": COMPACTION_PREFIX,
                    "create_time_us": now_us,
                    # Minted ids do not depend on the counter: mint before the statement.
                    "turn_ids": [None] * allocation.count if counted else allocation.turn_ids(0),
                },
            )
            rows = await cursor.fetchall()
        except pg_errors.UniqueViolation as error:
            if claimed is not None and error.diag.constraint_name == _TURN_ID_KEY:
                # The request row went in first (see _ALLOCATE), so the request_id (if any) is
                # new: the thread really has the claimed id already.
                raise turn_id_taken(thread_id, claimed) from error
            # requests_pkey: the same request_id committed after our lookup (we waited for the
            # thread's lock); the next attempt returns it. Nothing else can collide.
            raise _Retry(_one_line(error)) from error
        if len(rows) != allocation.count:
            raise RuntimeError(f"allocated {len(rows)} turns, wanted {allocation.count}")
        return [
            Turn(
                thread_id,
                turn_id,
                allocation.kind,
                sequence,
                now_us,
                request_id,
                claimed is not None,
            )
            for turn_id, sequence in rows
        ]

    # --- reads -------------------------------------------------------------------------------

    @staticmethod
    async def _read_range(
        conn: Connection, thread_id: str, after_sequence: int, limit: int
    ) -> list[Turn]:
        cursor = await conn.execute(
            f"SELECT {_TURN_COLUMNS} FROM turns WHERE thread_id = %s AND sequence > %s "
            "ORDER BY sequence LIMIT %s",
            (thread_id, after_sequence, limit),
        )
        return [_turn(row) for row in await cursor.fetchall()]

    async def get(self, thread_id: str, turn_id: str) -> Turn | None:
        async def query(conn: Connection) -> Turn | None:
            cursor = await conn.execute(
                f"SELECT {_TURN_COLUMNS} FROM turns WHERE thread_id = %s AND turn_id = %s",
                (thread_id, turn_id),
            )
            row = await cursor.fetchone()
            return _turn(row) if row else None

        return await self._run(query, idempotent=True)

    async def list(self, thread_id: str, after_sequence: int, limit: int) -> list[Turn]:
        return await self._run(
            lambda conn: self._read_range(conn, thread_id, after_sequence, limit),
            idempotent=True,
        )
