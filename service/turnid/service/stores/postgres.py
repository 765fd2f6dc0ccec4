"""The PostgreSQL store: any number of stateless `turnid serve` replicas on one database.

Allocation (invariants 1, 2, 4, 5, 8): one READ COMMITTED transaction, two round trips, the
statements of each sent together in a psycopg pipeline (explicit BEGIN/COMMIT: psycopg's
transaction() syncs the pipeline at every step):

1. `BEGIN`; `INSERT INTO threads ... ON CONFLICT DO NOTHING` (a new thread gets its row);
   `SELECT ... FOR UPDATE` of the thread row, which waits for and then holds the thread's lock
   and returns its state as the previous holder committed it; then, in new statements (so new
   snapshots, taken after the lock was granted, that see whatever the previous holder
   committed), the request_ids' records and whether the thread has the claimed ids.
2. `domain.allocation.decide()` in Python, then the replayed turns' read, one write statement
   (CTEs: the thread's new state, the request rows, the turns) and `COMMIT`.

Allocations of one thread that queue up in one store go in one such transaction (a group),
decided one after the other against the state the previous one left: a hot thread costs one
lock wait per replica, not one per caller, and one commit per group. A refusal refuses only its
allocation. The thread row lock serializes groups across every replica (other threads proceed
in parallel), and every id is minted under it from the thread's `last_minted`, so UUID order is
history order whatever the replicas' clocks. A minted id that collides with a claimed one
(astronomically rare) fails the turns' unique key: the transaction rolls back and is retried
with that id reported taken. Serialization failures and deadlocks (engines running
SERIALIZABLE) are retried too.

Watch (invariant 11): after each commit the store wakes its own watchers and queues the thread
for a background notifier that sends the queued threads in one `pg_notify` statement (one
transaction per batch, outside the allocation: NOTIFY takes a cluster-wide lock at commit that
would serialize every allocation's commit). One listening connection per store turns other
replicas' notifications into `changes.publish`; after it (re)connects it wakes every watcher,
since notifications may have been lost. Notifications are only wake-ups: watchers re-read
`sequence > last`, and re-read every `fallback_interval` anyway.

Faults (invariants 7, 9): every server-side wait is bounded below the client's 10 s deadline:
pool acquire, `statement_timeout`, `lock_timeout` and `idle_in_transaction_session_timeout` on
every connection, TCP keepalives. Timeouts, lock waits, connection errors and any other
database error become STORE_UNAVAILABLE (details in the log only). Pooled connections are
checked when taken from the pool (no round trip unless the server sent something while the
connection was idle, as it does when it restarts or terminates the backend: then a full check),
so dead connections are replaced before use; an attempt whose connection died before its
commit was sent is repeated on another connection. When the database cannot be reached at
`open()` or `migrate()` fails, they raise `PostgresUnreachableError` / `PostgresSchemaError`
(RuntimeErrors) with a one-line message.

Migrations are the SQL files in `postgres_migrations/` (`NNNN_name.sql`), applied in order in one
transaction under a transaction-level advisory lock and recorded in `turnid_schema_migrations`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import select
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from turnid.service.config import redact_url
from turnid.service.domain.allocation import Replay, decide
from turnid.service.domain.errors import TurnIdError, store_unavailable
from turnid.service.domain.model import (
    Allocation,
    RequestRecord,
    ThreadInfo,
    ThreadState,
    Turn,
    TurnKind,
)
from turnid.service.domain.watch import ChangeFeed, ThreadKey

log = logging.getLogger("turnid.postgres")
_T = TypeVar("_T")

Connection = psycopg.AsyncConnection[TupleRow]

SCHEMA_TABLE = "turnid_schema_migrations"
# pg_advisory_xact_lock key that serializes migrations across replicas: "turnid" in ASCII.
MIGRATION_LOCK_KEY = 0x7475726E6964
#: The channel every replica NOTIFYs after allocations and LISTENs on.
NOTIFY_CHANNEL = "turnid_turns"
_MIGRATION_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_DEFAULT_CONNECT_TIMEOUT_S = 5
# Dead peers are noticed within idle + interval * count = 8 s, below the client's deadline.
_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 1,
    "keepalives_count": 3,
}
_NOTIFY_PAYLOAD_MAX = 7900  # bytes; PostgreSQL's limit is 8000
_LISTEN_BACKOFF_S = (0.05, 2.0)
# A thread's allocations committed in one transaction: at most this many, or this many turns.
_GROUP_MAX = 256
_GROUP_TURNS = 4096

_TURN_COLUMNS = "thread_id, turn_id, kind, sequence, create_time_us, request_id, claimed"
_STATE_COLUMNS = (
    "next_sequence, next_compaction, last_minted, max_claimed, create_time_us, update_time_us"
)
_NEW_THREAD = (
    f"INSERT INTO threads (namespace, thread_id, {_STATE_COLUMNS}) "
    "VALUES (%s, %s, 1, 0, '', '', 0, 0) ON CONFLICT DO NOTHING"
)
_LOCK_THREAD = (
    f"SELECT {_STATE_COLUMNS} FROM threads WHERE namespace = %s AND thread_id = %s FOR UPDATE"
)
_SEEN = (
    "SELECT request_id, kind, count, claimed_turn_id, first_sequence FROM requests "
    "WHERE namespace = %s AND thread_id = %s AND request_id = ANY(%s)"
)
_TAKEN = "SELECT turn_id FROM turns WHERE namespace = %s AND thread_id = %s AND turn_id = ANY(%s)"
_REPLAYED = (
    f"SELECT {_TURN_COLUMNS} FROM turns WHERE namespace = %s AND thread_id = %s "
    "AND sequence = ANY(%s)"
)
# The group's writes in one statement: the thread's final state, its request rows and turns.
_WRITE = """
WITH thread AS (
    UPDATE threads SET
        next_sequence = %(next_sequence)s, next_compaction = %(next_compaction)s,
        last_minted = %(last_minted)s, max_claimed = %(max_claimed)s,
        create_time_us = %(create_time_us)s, update_time_us = %(update_time_us)s
    WHERE namespace = %(namespace)s AND thread_id = %(thread_id)s
), request AS (
    INSERT INTO requests
        (namespace, thread_id, request_id, kind, count, claimed_turn_id, first_sequence)
    SELECT %(namespace)s, %(thread_id)s, r.*
    FROM unnest(%(r_ids)s::text[], %(r_kinds)s::smallint[], %(r_counts)s::integer[],
                %(r_claimed)s::text[], %(r_firsts)s::bigint[]) AS r
)
INSERT INTO turns
    (namespace, thread_id, sequence, turn_id, kind, request_id, claimed, create_time_us)
SELECT %(namespace)s, %(thread_id)s, t.*
FROM unnest(%(t_sequences)s::bigint[], %(t_ids)s::text[], %(t_kinds)s::smallint[],
            %(t_requests)s::text[], %(t_claimed)s::boolean[], %(t_times)s::bigint[]) AS t
"""
_TURN_ID_KEY = "turns_turn_id_key"
_GET_THREAD = f"""
SELECT {", ".join(f"th.{c.strip()}" for c in _STATE_COLUMNS.split(","))},
       {", ".join(f"t.{c.strip()}" for c in _TURN_COLUMNS.split(","))}
FROM threads th
JOIN turns t ON t.namespace = th.namespace AND t.thread_id = th.thread_id
             AND t.sequence = th.next_sequence - 1
WHERE th.namespace = %s AND th.thread_id = %s
"""


class PostgresUnreachableError(RuntimeError):
    """The database could not be reached (or its schema is not usable) when the store opened."""


class PostgresSchemaError(RuntimeError):
    """The schema could not be checked or migrated (permissions, version, a failed statement).
    The message is one line, fit for a CLI."""


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
        raise PostgresSchemaError(f"PostgreSQL migrations are not numbered 1..n: {names}")
    return found


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _described(error: psycopg.Error) -> str:
    state = f" [{error.sqlstate}]" if error.sqlstate else ""
    return f"{_one_line(error)}{state}"


def _connect_kwargs(
    url: str, connect_timeout_s: float = _DEFAULT_CONNECT_TIMEOUT_S
) -> dict[str, Any]:
    """autocommit (transactions are explicit), a connect timeout and TCP keepalives, each
    unless the URL sets it."""
    given = conninfo_to_dict(url)
    kwargs: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in given:
        kwargs["connect_timeout"] = max(1, round(connect_timeout_s))  # libpq: whole seconds
    for name, value in _KEEPALIVES.items():
        if name not in given:
            kwargs[name] = value
    return kwargs


async def migrate(url: str, *, apply: bool = True) -> MigrationResult:
    """Bring the schema up to date (`apply`), or only check that it is.

    Safe to run from several replicas at once: everything happens in one transaction that first
    takes a transaction-level advisory lock, so one replica migrates and the others then find
    nothing to do. DDL is transactional in PostgreSQL, so a failed migration leaves no trace.
    Every failure is a RuntimeError with a one-line message: PostgresUnreachableError when the
    database cannot be reached or the connection fails, PostgresSchemaError for everything
    else (missing privileges, a schema newer than this turnid or, with apply=False, older).
    """
    known = migrations()
    where = redact_url(url)
    try:
        conn = await psycopg.AsyncConnection.connect(url, **_connect_kwargs(url))
    except psycopg.Error as error:
        raise PostgresUnreachableError(
            f"cannot connect to PostgreSQL at {where}: {_one_line(error)}"
        ) from error
    step = "reading the schema version"
    pending: list[Migration] = []
    try:
        async with conn, conn.transaction():
            if apply:
                step = "taking the migration lock"
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                step = f"creating {SCHEMA_TABLE}"
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} ("
                    "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                    "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                step = "reading the schema version"
            applied = await _applied_versions(conn)
            current = max(applied, default=0)
            if current > len(known):
                raise PostgresSchemaError(
                    f"the PostgreSQL schema at {where} is at version {current}, newer than "
                    f"this turnid knows ({len(known)}); upgrade turnid"
                )
            pending = [m for m in known if m.version not in applied]
            if pending and not apply:
                raise PostgresSchemaError(
                    f"the PostgreSQL schema at {where} is at version {current}, this turnid "
                    f"needs {len(known)}: run `turnid migrate --database URL` first "
                    "(or start without --no-migrate)"
                )
            for migration in pending:
                step = f"applying {migration.name}"
                log.info("applying PostgreSQL migration %s", migration.name)
                await conn.execute(migration.sql)
                await conn.execute(
                    f"INSERT INTO {SCHEMA_TABLE} (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            step = "committing the migration"
    except psycopg.OperationalError as error:
        if conn.broken or conn.closed:
            raise PostgresUnreachableError(
                f"PostgreSQL at {where} failed while {step}: {_described(error)}"
            ) from error
        raise PostgresSchemaError(
            f"PostgreSQL at {where} failed while {step}: {_described(error)}"
        ) from error
    except psycopg.Error as error:
        # Permissions (InsufficientPrivilege), a statement the server refuses, ...
        raise PostgresSchemaError(
            f"PostgreSQL at {where} refused {step}: {_described(error)}"
        ) from error
    return MigrationResult(len(known), [m.name for m in pending])


async def _applied_versions(conn: Connection) -> set[int]:
    exists = await (await conn.execute("SELECT to_regclass(%s)", (SCHEMA_TABLE,))).fetchone()
    if exists is None or exists[0] is None:
        return set()
    rows = await (await conn.execute(f"SELECT version FROM {SCHEMA_TABLE}")).fetchall()
    return {int(row[0]) for row in rows}


def _turn(row: Sequence[Any]) -> Turn:
    return Turn(row[0], row[1], TurnKind(row[2]), row[3], row[4], row[5], bool(row[6]))


def _state(row: Sequence[Any]) -> ThreadState:
    return ThreadState(row[0], row[1], row[2], row[3], row[4], row[5])


def _unavailable(error: psycopg.Error) -> TurnIdError:
    if not isinstance(error, psycopg.OperationalError):
        # Not a transient fault: still UNAVAILABLE for the caller, but worth a look.
        log.error("unexpected PostgreSQL error", exc_info=error)
    return store_unavailable(f"postgresql: {_described(error)}")


def _readable(fd: int) -> bool:
    if hasattr(select, "poll"):  # no FD_SETSIZE limit
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])


async def _check_connection(conn: Connection) -> None:
    """The pool's check when a connection is taken: free unless the server sent something
    while the connection sat idle (a restart's or pg_terminate_backend's FATAL, then EOF); a
    full round-trip check then, which fails on a dead connection, so the pool replaces it."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("connection is closed")
    if _readable(conn.pgconn.socket):
        await AsyncConnectionPool.check_connection(conn)


class _Retry(Exception):
    """The transaction was rolled back for a reason that a fresh attempt resolves."""


class _Lost(Exception):
    """The connection died before the commit was sent: nothing was written, so repeating the
    attempt on another connection is safe even without a request_id."""


@dataclass(eq=False, slots=True)
class _Queued:
    allocation: Allocation
    future: asyncio.Future[list[Turn]]
    since: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Decided:
    """A group decided: one outcome per allocation (turns, a refusal, or a replay of turns in
    the database), what to write, and the sequences to read for the replays."""

    outcomes: list[list[Turn] | TurnIdError | Replay]
    state: ThreadState
    turns: list[Turn]
    records: list[tuple[str, RequestRecord]]
    replayed: list[int]
    granted: int


def _decide_group(
    allocations: list[Allocation],
    state: ThreadState,
    records: dict[str, RequestRecord],
    taken: set[str],
    now_us: int | None = None,
) -> _Decided:
    """Each allocation decided against the state the previous one left (a request_id granted
    earlier in the group replays that grant; its ids count as taken)."""
    now_us = time.time_ns() // 1000 if now_us is None else now_us
    decided = _Decided([], state, [], [], [], 0)
    fresh: dict[str, list[Turn]] = {}  # request_id -> turns granted in this group
    for allocation in allocations:
        rid = allocation.request_id
        seen = records.get(rid) if rid else None
        try:
            decision = decide(allocation, decided.state, seen, taken.__contains__, now_us)
        except TurnIdError as refusal:
            decided.outcomes.append(refusal)
            continue
        if isinstance(decision, Replay):
            if rid in fresh:
                decided.outcomes.append(fresh[rid])
            else:
                decided.outcomes.append(decision)
                first = decision.first_sequence
                decided.replayed += range(first, first + decision.count)
            continue
        decided.state = decision.state
        decided.turns += decision.turns
        decided.granted += 1
        taken.update(turn.turn_id for turn in decision.turns)
        if decision.record is not None:
            records[rid] = decision.record
            fresh[rid] = decision.turns
            decided.records.append((rid, decision.record))
        decided.outcomes.append(decision.turns)
    return decided


def _write_params(
    key: ThreadKey,
    state: ThreadState,
    turns: list[Turn],
    records: list[tuple[str, RequestRecord]],
) -> dict[str, Any]:
    return {
        "namespace": key[0],
        "thread_id": key[1],
        "next_sequence": state.next_sequence,
        "next_compaction": state.next_compaction,
        "last_minted": state.last_minted,
        "max_claimed": state.max_claimed,
        "create_time_us": state.create_time_us,
        "update_time_us": state.update_time_us,
        "r_ids": [rid for rid, _ in records],
        "r_kinds": [r.kind for _, r in records],
        "r_counts": [r.count for _, r in records],
        "r_claimed": [r.claimed_turn_id for _, r in records],
        "r_firsts": [r.first_sequence for _, r in records],
        "t_sequences": [t.sequence for t in turns],
        "t_ids": [t.turn_id for t in turns],
        "t_kinds": [int(t.kind) for t in turns],
        "t_requests": [t.request_id for t in turns],
        "t_claimed": [t.claimed for t in turns],
        "t_times": [t.create_time_us for t in turns],
    }


def _payload(replica: str, key: ThreadKey) -> str:
    text = json.dumps([replica, *key], ensure_ascii=False, separators=(",", ":"))
    if len(text.encode()) > _NOTIFY_PAYLOAD_MAX:
        return json.dumps([replica])  # too long to name: every watcher re-reads
    return text


class PostgresStore:
    def __init__(
        self,
        url: str,
        *,
        migrate: bool = True,
        pool_min: int = 2,
        pool_max: int = 10,
        acquire_timeout_s: float = 3.0,
        statement_timeout_s: float = 3.0,
        lock_timeout_s: float = 2.0,
        open_timeout_s: float = 10.0,
        max_attempts: int = 5,
        watch_fallback_s: float = 1.5,
        connect_timeout_s: float = _DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        self.url = url
        self._connect_timeout_s = connect_timeout_s
        self.migrate = migrate
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._acquire_timeout_s = acquire_timeout_s
        self._statement_timeout_ms = max(1, round(statement_timeout_s * 1000))
        self._lock_timeout_ms = max(1, round(lock_timeout_s * 1000))
        self._open_timeout_s = open_timeout_s
        self._max_attempts = max_attempts
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._closed = False
        #: Woken at every commit here and, through NOTIFY, at every commit on other replicas.
        self.changes = ChangeFeed(fallback_interval=watch_fallback_s)
        #: Called after each commit with (allocations, turns, seconds in the transaction).
        self.on_commit: Callable[[int, int, float], None] | None = None
        self._replica = uuid.uuid4().hex[:12]  # tells our own notifications from others'
        self._pending: set[ThreadKey] = set()
        self._notify_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._queues: dict[ThreadKey, list[_Queued]] = {}  # allocations waiting, per thread
        self._drivers: set[asyncio.Task[None]] = set()
        #: Set each time the listener is (re)connected and LISTENing (tests wait on it).
        self.listening = asyncio.Event()

    async def _configure(self, conn: Connection) -> None:
        # Every server-side wait shorter than the client's 10 s default deadline (invariant 9).
        # A transaction left open (a stalled replica holding a thread's lock) is ended too.
        await conn.execute(
            f"SET statement_timeout = {self._statement_timeout_ms};"
            f"SET lock_timeout = {self._lock_timeout_ms};"
            f"SET idle_in_transaction_session_timeout = {self._statement_timeout_ms}"
        )

    async def open(self) -> None:
        await migrate(self.url, apply=self.migrate)
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self.url,
            kwargs=_connect_kwargs(self.url, self._connect_timeout_s),
            min_size=self._pool_min,
            max_size=self._pool_max,
            timeout=self._acquire_timeout_s,
            configure=self._configure,
            check=_check_connection,
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
        self._closed = False
        self._tasks = [
            asyncio.create_task(self._listen(), name="turnid-pg-listen"),
            asyncio.create_task(self._notify_loop(pool), name="turnid-pg-notify"),
        ]

    async def close(self) -> None:
        self._closed = True
        # Finish the queued allocations (each group's waits are bounded), then stop.
        while self._drivers:
            await asyncio.gather(*self._drivers, return_exceptions=True)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        self.changes.close()

    def _require_pool(self) -> AsyncConnectionPool[Connection]:
        if self._pool is None:
            raise store_unavailable("store is closed" if self._closed else "store is not open")
        return self._pool

    async def _run(self, work: Callable[[Connection], Awaitable[_T]], *, idempotent: bool) -> _T:
        """`work` on a pooled connection. Rolled-back conflicts are retried; a connection that
        turns out dead is replaced when repeating `work` is safe; everything else that goes
        wrong in the database is STORE_UNAVAILABLE."""
        pool = self._require_pool()
        attempt = 0
        while True:
            attempt += 1
            used: Connection | None = None
            try:
                try:
                    async with pool.connection() as conn:
                        used = conn
                        return await work(conn)
                except psycopg.OperationalError as error:
                    if used is not None and used.broken and idempotent:
                        raise _Lost(_one_line(error)) from error
                    raise
            except (
                _Retry,
                _Lost,
                pg_errors.SerializationFailure,
                pg_errors.DeadlockDetected,
            ) as error:
                if attempt >= self._max_attempts:
                    detail = _one_line(error.__cause__ or error)
                    raise store_unavailable(
                        f"postgresql: gave up after {attempt} attempts: {detail}"
                    ) from error
                log.info("PostgreSQL attempt %d failed, retrying: %s", attempt, error)
            except psycopg.Error as error:
                raise _unavailable(error) from error

    # --- writes ------------------------------------------------------------------------------
    #
    # Allocations of one thread queue up in this store and go to the database in groups: one
    # transaction, one row lock, one commit for every allocation queued behind the previous
    # group (so a hot thread costs one waiting connection per replica, not one per caller).

    async def allocate(self, allocation: Allocation) -> list[Turn]:
        if self._closed:
            raise store_unavailable("store is closed")
        self._require_pool()
        key = (allocation.namespace, allocation.thread_id)
        queued = _Queued(allocation, asyncio.get_running_loop().create_future())
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = [queued]
            driver = asyncio.create_task(self._drive(key), name="turnid-pg-thread")
            self._drivers.add(driver)
            driver.add_done_callback(self._drivers.discard)
        else:
            queue.append(queued)
        return await queued.future

    async def _drive(self, key: ThreadKey) -> None:
        """Commits the thread's queued allocations, group by group, until none are left."""
        queue = self._queues[key]
        try:
            while queue:
                group: list[_Queued] = []
                turns = 0
                while queue and len(group) < _GROUP_MAX and turns < _GROUP_TURNS:
                    queued = queue.pop(0)
                    if queued.future.done():  # the caller gave up
                        continue
                    if time.monotonic() - queued.since > self._acquire_timeout_s:
                        # Waited as long as for a pooled connection: let the caller retry.
                        queued.future.set_exception(
                            store_unavailable("postgresql: allocation queued too long")
                        )
                        continue
                    group.append(queued)
                    turns += queued.allocation.count
                if group:
                    await self._commit_group(key, group)
        finally:
            if self._queues.get(key) is queue:
                del self._queues[key]

    async def _commit_group(self, key: ThreadKey, group: list[_Queued]) -> None:
        suspects: list[str] = []  # ids a rolled-back attempt found taken
        try:
            outcomes = await self._run(
                lambda conn: self._group_once(conn, key, group, suspects),
                # Repeating is safe only where nothing was committed: _group_once says so by
                # raising _Lost when the connection died before the commit went out.
                idempotent=False,
            )
        except BaseException as error:
            failure = error if isinstance(error, Exception) else store_unavailable("cancelled")
            for queued in group:
                if not queued.future.done():
                    queued.future.set_exception(failure)
            if not isinstance(error, Exception):
                raise
            return
        for queued, outcome in zip(group, outcomes, strict=True):
            if queued.future.done():
                continue
            if isinstance(outcome, TurnIdError):
                queued.future.set_exception(outcome)
            else:
                queued.future.set_result(outcome)

    async def _group_once(
        self, conn: Connection, key: ThreadKey, group: list[_Queued], suspects: list[str]
    ) -> list[list[Turn] | TurnIdError]:
        """One transaction for the group, in two round trips. Explicit BEGIN/COMMIT in one
        pipeline: psycopg's transaction() inside a pipeline syncs at every step (five)."""
        namespace, thread_id = key
        allocations = [queued.allocation for queued in group]
        request_ids = sorted({a.request_id for a in allocations if a.request_id})
        candidates = [a.claimed_turn_id for a in allocations if a.claimed_turn_id is not None]
        candidates += suspects
        started = time.perf_counter()
        commit_sent = False
        decided: _Decided | None = None
        replay_cursor = None
        try:
            async with conn.pipeline() as pipeline:
                # Round trip 1: lock the thread, then read (new snapshots) what decide needs.
                await conn.execute("BEGIN")
                await conn.execute(_NEW_THREAD, key)
                locked = await conn.execute(_LOCK_THREAD, key)
                seen_cursor = (
                    await conn.execute(_SEEN, (namespace, thread_id, request_ids))
                    if request_ids
                    else None
                )
                taken_cursor = (
                    await conn.execute(_TAKEN, (namespace, thread_id, candidates))
                    if candidates
                    else None
                )
                try:
                    await pipeline.sync()
                except psycopg.Error:
                    if not conn.broken:
                        await conn.execute("ROLLBACK")  # sent as the block exits
                    raise
                row = await locked.fetchone()
                records: dict[str, RequestRecord] = {}
                if seen_cursor is not None:
                    for r in await seen_cursor.fetchall():
                        records[r[0]] = RequestRecord(r[1], r[2], r[3], r[4])
                taken = {r[0] for r in await taken_cursor.fetchall()} if taken_cursor else set()
                if row is None:  # the INSERT above guarantees the row
                    await conn.execute("ROLLBACK")
                    raise _Retry("thread row vanished")
                decided = _decide_group(allocations, _state(row), records, taken)

                # Round trip 2 (the block's exit): read what is replayed, write, commit.
                if decided.replayed:
                    replay_cursor = await conn.execute(
                        _REPLAYED, (namespace, thread_id, decided.replayed)
                    )
                if decided.turns:
                    await conn.execute(
                        _WRITE, _write_params(key, decided.state, decided.turns, decided.records)
                    )
                commit_sent = True
                await conn.execute("COMMIT")
            by_sequence = (
                {t.sequence: t for t in map(_turn, await replay_cursor.fetchall())}
                if replay_cursor is not None
                else {}
            )
        except BaseException as error:
            if not isinstance(error, Exception):
                raise  # cancelled: the pool discards a connection left mid-transaction
            # A failed statement skips the COMMIT queued behind it: end the transaction.
            if not conn.broken and conn.info.transaction_status != pq.TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):
                    await conn.execute("ROLLBACK")
            if isinstance(error, pg_errors.UniqueViolation):
                if error.diag.constraint_name == _TURN_ID_KEY and decided is not None:
                    # A minted id collided with a claimed one: retry with it reported taken.
                    suspects.extend(turn.turn_id for turn in decided.turns)
                raise _Retry(_one_line(error)) from error
            if isinstance(error, psycopg.OperationalError) and conn.broken and not commit_sent:
                raise _Lost(_one_line(error)) from error
            raise
        if decided.turns:
            seconds = time.perf_counter() - started
            self._committed(key, decided.granted, len(decided.turns), seconds)
        return [
            [by_sequence[s] for s in range(o.first_sequence, o.first_sequence + o.count)]
            if isinstance(o, Replay)
            else o
            for o in decided.outcomes
        ]

    def _committed(self, key: ThreadKey, allocations: int, turns: int, seconds: float) -> None:
        self.changes.publish(key)
        self._pending.add(key)
        self._notify_wanted.set()
        hook = self.on_commit
        if hook is not None:
            try:
                hook(allocations, turns, seconds)
            except Exception:
                log.exception("on_commit hook failed")

    # --- reads -------------------------------------------------------------------------------

    async def get(self, namespace: str, thread_id: str, turn_id: str) -> Turn | None:
        async def query(conn: Connection) -> Turn | None:
            cursor = await conn.execute(
                f"SELECT {_TURN_COLUMNS} FROM turns "
                "WHERE namespace = %s AND thread_id = %s AND turn_id = %s",
                (namespace, thread_id, turn_id),
            )
            row = await cursor.fetchone()
            return _turn(row) if row else None

        return await self._run(query, idempotent=True)

    async def list(
        self, namespace: str, thread_id: str, after_sequence: int, limit: int
    ) -> list[Turn]:
        async def query(conn: Connection) -> list[Turn]:
            cursor = await conn.execute(
                f"SELECT {_TURN_COLUMNS} FROM turns WHERE namespace = %s AND thread_id = %s "
                "AND sequence > %s ORDER BY sequence LIMIT %s",
                (namespace, thread_id, after_sequence, limit),
            )
            return [_turn(row) for row in await cursor.fetchall()]

        return await self._run(query, idempotent=True)

    async def get_thread(self, namespace: str, thread_id: str) -> ThreadInfo | None:
        async def query(conn: Connection) -> ThreadInfo | None:
            cursor = await conn.execute(_GET_THREAD, (namespace, thread_id))
            row = await cursor.fetchone()
            if row is None:
                return None
            return ThreadInfo(thread_id, _state(row[:6]), _turn(row[6:]))

        return await self._run(query, idempotent=True)

    # --- change notification -----------------------------------------------------------------

    async def _notify_loop(self, pool: AsyncConnectionPool[Connection]) -> None:
        """Sends the threads committed here since the last batch, in one statement: while it
        runs, the next batch gathers. Lost notifications cost watchers one fallback interval."""
        while True:
            await self._notify_wanted.wait()
            self._notify_wanted.clear()
            keys, self._pending = self._pending, set()
            if not keys:
                continue
            payloads = sorted({_payload(self._replica, key) for key in keys})
            try:
                async with pool.connection() as conn:
                    await conn.execute(
                        "SELECT pg_notify(%s, payload) FROM unnest(%s::text[]) AS payload",
                        (NOTIFY_CHANNEL, payloads),
                    )
            except psycopg.Error as error:
                log.info("PostgreSQL NOTIFY failed (watchers will re-read): %s", error)

    async def _listen(self) -> None:
        """One LISTEN connection per store, reconnecting until the store closes."""
        backoff = _LISTEN_BACKOFF_S[0]
        kwargs = _connect_kwargs(self.url, self._connect_timeout_s)
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.url, **kwargs)
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    backoff = _LISTEN_BACKOFF_S[0]
                    # Notifications sent while we were not listening are lost: re-read all.
                    self.changes.publish_all()
                    self.listening.set()
                    async for notify in conn.notifies():
                        self._on_notify(notify.payload)
            except psycopg.Error as error:
                log.info("PostgreSQL LISTEN connection lost (reconnecting): %s", error)
            self.listening.clear()
            self.changes.publish_all()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _LISTEN_BACKOFF_S[1])

    def _on_notify(self, payload: str) -> None:
        try:
            fields = json.loads(payload)
        except ValueError:
            log.debug("ignoring NOTIFY payload %r", payload)
            return
        if not isinstance(fields, list) or not fields or fields[0] == self._replica:
            return  # our own commit: its watchers were woken at commit
        if len(fields) == 3 and all(isinstance(f, str) for f in fields):
            self.changes.publish((fields[1], fields[2]))
        else:
            self.changes.publish_all()
