"""The PostgreSQL store: any number of stateless `turnid serve` replicas on one database.

Allocation is one transaction per request (READ COMMITTED is enough):

1. with a request_id, look it up; a known one returns the original turns (or REQUEST_ID_REUSED);
2. `INSERT INTO threads ... ON CONFLICT DO UPDATE ... RETURNING` bumps the thread's counters and
   returns where this allocation starts. The update row-locks the thread's counter row until
   commit, so allocations within one thread are serialized across every replica, while other
   threads proceed in parallel;
3. insert the request row (if any) and the turns with consecutive sequences; commit.

A request with the same request_id that committed while we waited for the lock makes step 3 hit
the requests primary key: the transaction is retried and step 1 then finds it. A claimed id the
thread already has hits the (thread_id, turn_id) unique key: TURN_ID_TAKEN, nothing written.
Serialization failures and deadlocks (engines running SERIALIZABLE) are retried in here.

Faults: connection errors, pool timeouts and other database errors become STORE_UNAVAILABLE
(gRPC UNAVAILABLE, retryable with the same request_id), never INTERNAL. The pool checks each
connection before handing it out and replaces broken ones in the background, so the store
recovers by itself after a database restart. When the database cannot be reached at `open()`,
it raises `PostgresUnreachableError` (a RuntimeError) with a one-line message.

Migrations are the SQL files in `postgres_migrations/` (`NNNN_name.sql`), applied in order in one
transaction under a transaction-level advisory lock and recorded in `turnid_schema_migrations`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from turnid.service.domain.errors import (
    TurnIdError,
    request_id_reused,
    store_unavailable,
    turn_id_taken,
)
from turnid.service.domain.model import Allocation, Turn, TurnKind

log = logging.getLogger("turnid.postgres")

Connection = psycopg.AsyncConnection[TupleRow]

SCHEMA_TABLE = "turnid_schema_migrations"
# pg_advisory_xact_lock key that serializes migrations across replicas: "turnid" in ASCII.
MIGRATION_LOCK_KEY = 0x7475726E6964
_MIGRATION_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_DEFAULT_CONNECT_TIMEOUT_S = 5

_TURN_COLUMNS = "thread_id, turn_id, kind, sequence, create_time_us, request_id, claimed"
_INSERT_TURN = (
    "INSERT INTO turns (thread_id, turn_id, kind, sequence, create_time_us, request_id, claimed) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
# Creates the counter row (first allocation of a thread) or bumps it; either way the row stays
# locked until commit. Returns the first sequence and first compaction index of this allocation.
_BUMP = (
    "INSERT INTO threads AS t (thread_id, next_sequence, next_compaction) "
    "VALUES (%(thread_id)s, 1 + %(count)s, %(compactions)s) "
    "ON CONFLICT (thread_id) DO UPDATE SET "
    "next_sequence = t.next_sequence + %(count)s, "
    "next_compaction = t.next_compaction + %(compactions)s "
    "RETURNING t.next_sequence - %(count)s, t.next_compaction - %(compactions)s"
)
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


def describe(url: str) -> str:
    """The database a URL names, for messages: never the password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparseable URL)"
    user = f"{info['user']}@" if info.get("user") else ""
    host = info.get("host") or "localhost"
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{host}{port}/{info.get('dbname') or ''}"


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
            f"cannot connect to PostgreSQL at {describe(url)}: {_one_line(error)}"
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
            f"PostgreSQL at {describe(url)} failed during migration: {_one_line(error)}"
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
            check=AsyncConnectionPool.check_connection,
            name="turnid",
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=self._open_timeout_s)
        except PoolTimeout as error:
            await pool.close()
            raise PostgresUnreachableError(
                f"cannot open a connection pool to PostgreSQL at {describe(self.url)}: "
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
        pool = self._require_pool()
        for attempt in range(1, self._max_attempts + 1):
            try:
                async with pool.connection() as conn:
                    return await self._allocate_once(conn, allocation)
            except (_Retry, pg_errors.SerializationFailure, pg_errors.DeadlockDetected) as error:
                if attempt == self._max_attempts:
                    raise store_unavailable(
                        f"postgresql: gave up after {attempt} attempts: {_one_line(error)}"
                    ) from error
                log.debug("retrying allocation (attempt %d): %s", attempt, error)
            except psycopg.Error as error:
                raise _unavailable(error) from error
        raise AssertionError("unreachable")

    async def _allocate_once(self, conn: Connection, allocation: Allocation) -> list[Turn]:
        thread_id = allocation.thread_id
        request_id = allocation.request_id
        claimed = allocation.claimed_turn_id
        async with conn.transaction():
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

            bumped = await (
                await conn.execute(
                    _BUMP,
                    {
                        "thread_id": thread_id,
                        "count": allocation.count,
                        "compactions": allocation.compactions,
                    },
                )
            ).fetchone()
            assert bumped is not None
            first, first_compaction = bumped
            now_us = time.time_ns() // 1000
            turns = [
                Turn(
                    thread_id,
                    turn_id,
                    allocation.kind,
                    first + i,
                    now_us,
                    request_id,
                    claimed is not None,
                )
                for i, turn_id in enumerate(allocation.turn_ids(first_compaction))
            ]
            try:
                if request_id:
                    await conn.execute(
                        "INSERT INTO requests (thread_id, request_id, kind, count, "
                        "claimed_turn_id, first_sequence) VALUES (%s, %s, %s, %s, %s, %s)",
                        (
                            thread_id,
                            request_id,
                            int(allocation.kind),
                            allocation.count,
                            claimed,
                            first,
                        ),
                    )
                async with conn.cursor() as cursor:
                    await cursor.executemany(
                        _INSERT_TURN,
                        [
                            (
                                t.thread_id,
                                t.turn_id,
                                int(t.kind),
                                t.sequence,
                                t.create_time_us,
                                t.request_id,
                                t.claimed,
                            )
                            for t in turns
                        ],
                    )
            except pg_errors.UniqueViolation as error:
                if claimed is not None and error.diag.constraint_name == _TURN_ID_KEY:
                    # Under the thread's lock, with the request_id new: the id is really taken.
                    raise turn_id_taken(thread_id, claimed) from error
                # requests_pkey: the same request_id committed while we waited for the lock;
                # the next attempt returns it. (Anything else cannot happen under the lock.)
                raise _Retry(_one_line(error)) from error
        return turns

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
        pool = self._require_pool()
        try:
            async with pool.connection() as conn:
                row = await (
                    await conn.execute(
                        f"SELECT {_TURN_COLUMNS} FROM turns WHERE thread_id = %s AND turn_id = %s",
                        (thread_id, turn_id),
                    )
                ).fetchone()
        except psycopg.Error as error:
            raise _unavailable(error) from error
        return _turn(row) if row else None

    async def list(self, thread_id: str, after_sequence: int, limit: int) -> list[Turn]:
        pool = self._require_pool()
        try:
            async with pool.connection() as conn:
                return await self._read_range(conn, thread_id, after_sequence, limit)
        except psycopg.Error as error:
            raise _unavailable(error) from error
