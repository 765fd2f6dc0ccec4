"""The PostgreSQL store: any number of stateless `turnid serve` replicas on one database.

Allocation (invariants 1, 2, 4, 5, 8): allocations queue up in the store, per thread, and go to
the database in batches: one READ COMMITTED transaction for every thread queued when the batch
starts (at most _BATCH_THREADS threads, about _BATCH_TURNS turns), in two round trips, each one
simple query (statements joined, parameters bound client-side; each statement takes its rows as
one JSON array, which psycopg dumps in C):

1. `BEGIN`; one upsert of the threads' rows in a fixed order, (namespace, thread_id) in byte
   order, that inserts a new thread's row or waits for and locks an existing one and returns its
   state as the previous holder committed it; then, in new statements (new snapshots, taken
   after the locks were granted), the request_ids' records and which claimed ids are taken.
2. `domain.allocation.decide()` in Python, each thread's allocations one after the other
   against the state the previous one left; then the replayed turns' read, one write statement
   (CTEs: every thread's new state, the request rows, the turns) and `COMMIT`.

Every replica locks in the same order, so batches over overlapping threads never deadlock
(deadlocks and serialization failures are retried all the same). A store runs one batch at a
time, so what queues behind it goes in the next (the most allocations per commit when the
database answers quickly), and more, up to `max_batches`, only while those in flight have all
run longer than _STALL_S (a slow database, a lock wait). A thread is in one batch at a time,
so its allocations stay in order. A refusal refuses only its allocation; a batch that times out
waiting for a lock (a stalled replica holds one thread) is retried thread by thread, so only
that thread's allocations fail. Every id is minted under the thread's lock from its
`last_minted`, so UUID order is history order whatever the replicas' clocks. A minted id that
collides with a claimed one (astronomically rare) fails the turns' unique key: the batch rolls
back and is retried with the ids it minted checked, so the colliding one is found taken and
minted again; the other threads' allocations go through in the retry.

Watch (invariant 11): after each commit the store wakes its own watchers and queues the thread
for a background notifier that sends the queued threads in one `pg_notify` statement (one
transaction per batch, outside the allocation: NOTIFY takes a cluster-wide lock at commit that
would serialize every allocation's commit), as many threads in a payload as fit, on the channel
of the store's schema (`notify_channel`: deployments in other schemas of the database do not hear
them). One listening connection per store, open only while anyone watches there (and
`listen_linger_s` after), turns other replicas' notifications into `changes.publish`; after it
(re)connects it wakes every watcher, since notifications may have been lost. A replica nobody
watches holds no LISTEN, so the others' commits do not wake it. Notifications are only
wake-ups: watchers re-read `sequence > last`, and re-read every `fallback_interval` anyway.

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
import hashlib
import json
import logging
import re
import select
import statistics
import time
import uuid
from collections import deque
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
    Replayed,
    RequestRecord,
    ThreadInfo,
    ThreadState,
    Turn,
    TurnKind,
    TurnRun,
    make_turn,
)
from turnid.service.domain.store import allocate_queued
from turnid.service.domain.watch import ChangeFeed, ThreadKey

log = logging.getLogger("turnid.postgres")
_T = TypeVar("_T")

Connection = psycopg.AsyncConnection[TupleRow]

SCHEMA_TABLE = "turnid_schema_migrations"
# pg_advisory_xact_lock key that serializes migrations across replicas: "turnid" in ASCII.
MIGRATION_LOCK_KEY = 0x7475726E6964
#: The channel every replica of a deployment in the `public` schema NOTIFYs after allocations
#: and LISTENs on; in any other schema, `notify_channel(schema)`.
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
#: How long the LISTEN connection stays after the last watcher here leaves: a watcher that
#: reconnects (an orchestrator resuming its thread) finds it still open.
_LISTEN_LINGER_S = 10.0
_LISTEN_RECHECK_S = 1.0
# A thread's allocations committed in one transaction: at most this many, or this many turns.
_GROUP_MAX = 256
_GROUP_TURNS = 4096
# A batch (one transaction) holds at most this many threads' locks, or about this many turns.
# A store has one batch in flight, and more (up to max_batches) only while those in flight are
# all stalled (a lock held elsewhere, a slow disk): running for longer than _STALL_FACTOR times
# the median of the last _STALL_WINDOW batches' durations, within [_STALL_S, _STALL_MAX_S]. A
# fixed 5 ms took a machine busy with our own work for a stalled database: at c=32 on 2 cores
# batches take 5-10 ms there, and it split the queue into 2-4 smaller transactions that cost
# about the same each (3.1 allocations per batch, 570-810 calls/s; with this bound ~8 per batch
# and 870-1,170). The upper bound keeps a run of stalled batches (their seconds-long lock
# waits fill the window) from holding up the other threads for as long.
_BATCH_THREADS = 64
_BATCH_TURNS = 4096
_MAX_BATCHES = 4
_STALL_S = 0.005
_STALL_MAX_S = 0.050
_STALL_FACTOR = 4
_STALL_WINDOW = 16

_TURN_COLUMNS = "thread_id, turn_id, kind, sequence, create_time_us, request_id, claimed"
_STATE_COLUMNS = (
    "next_sequence, next_compaction, last_minted, max_claimed, create_time_us, update_time_us"
)
# Every statement of a batch takes its rows (one a thread, request or turn) as one JSON array of
# arrays: psycopg dumps a str in C, where it dumps lists element by element in Python (about
# 30 times as long for a batch's writes). As jsonb, parsed once: json parses an element's text
# again at every ->> (PostgreSQL's CPU per allocation -12% at 16 per batch). Thread rows are
# created and locked in one fixed order, (namespace, thread_id) in byte order, whatever order
# the allocations arrived in, so replicas locking overlapping sets of threads never deadlock.
# One upsert does both: it takes its rows in that order, inserts a new thread's row or locks
# (waits for) an existing one, and returns the state as the lock's previous holder committed it.
_LOCK_THREADS = f"""
INSERT INTO threads AS th (namespace, thread_id, {_STATE_COLUMNS})
SELECT k->>0, k->>1, 1, 0, '', '', 0, 0 FROM jsonb_array_elements(%s::jsonb) AS k
ORDER BY (k->>0) COLLATE "C", (k->>1) COLLATE "C"
ON CONFLICT (namespace, thread_id) DO UPDATE SET next_sequence = th.next_sequence
RETURNING th.namespace, th.thread_id, {_STATE_COLUMNS}
"""


def _rows(alias: str) -> str:
    """The rows of a JSON parameter, `alias.v` each, followed by their count as a LIMIT: the
    planner then knows how few they are and looks each one up in the index (it assumes 100
    rows of a function otherwise, and may hash-join a whole table)."""
    return f"(SELECT value AS v FROM jsonb_array_elements(%s::jsonb) LIMIT %s) AS {alias}"


# These run after the locks were granted, in new snapshots: they see what the previous holders
# of the threads' locks committed.
_SEEN = f"""
SELECT r.namespace, r.thread_id, r.request_id, r.kind, r.count, r.claimed_turn_id,
       r.first_sequence
FROM {_rows("k")}
JOIN requests r ON r.namespace = k.v->>0 AND r.thread_id = k.v->>1 AND r.request_id = k.v->>2
"""
_TAKEN = f"""
SELECT t.namespace, t.thread_id, t.turn_id
FROM {_rows("k")}
JOIN turns t ON t.namespace = k.v->>0 AND t.thread_id = k.v->>1 AND t.turn_id = k.v->>2
"""
_REPLAYED = f"""
SELECT t.namespace, {", ".join(f"t.{c.strip()}" for c in _TURN_COLUMNS.split(","))}
FROM {_rows("k")}
JOIN turns t ON t.namespace = k.v->>0 AND t.thread_id = k.v->>1
            AND t.sequence = (k.v->>2)::bigint
"""
# The batch's writes in one statement: every thread's new state, the request rows, the turns.
_WRITE = f"""
WITH thread AS (
    UPDATE threads AS th SET
        next_sequence = (s.v->>2)::bigint, next_compaction = (s.v->>3)::bigint,
        last_minted = s.v->>4, max_claimed = s.v->>5,
        create_time_us = (s.v->>6)::bigint, update_time_us = (s.v->>7)::bigint
    FROM {_rows("s")}
    WHERE th.namespace = s.v->>0 AND th.thread_id = s.v->>1
), request AS (
    INSERT INTO requests
        (namespace, thread_id, request_id, kind, count, claimed_turn_id, first_sequence)
    SELECT r->>0, r->>1, r->>2, (r->>3)::smallint, (r->>4)::integer, r->>5, (r->>6)::bigint
    FROM jsonb_array_elements(%s::jsonb) AS r
)
INSERT INTO turns
    (namespace, thread_id, sequence, turn_id, kind, request_id, claimed, create_time_us)
SELECT t->>0, t->>1, (t->>2)::bigint, t->>3, (t->>4)::smallint, t->>5, (t->>6)::boolean,
       (t->>7)::bigint
FROM jsonb_array_elements(%s::jsonb) AS t
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
    return make_turn(row[0], row[1], TurnKind(row[2]), row[3], row[4], row[5], bool(row[6]))


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
    future: asyncio.Future[Sequence[Turn]]
    since: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Decided:
    """A group decided: one outcome per allocation (turns, a refusal, or a replay of turns in
    the database), what to write, and the sequences to read for the replays."""

    outcomes: list[Sequence[Turn] | TurnIdError | Replay]
    state: ThreadState
    runs: list[TurnRun]  # the turns granted, one run per allocation
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
    fresh: dict[str, Sequence[Turn]] = {}  # request_id -> turns granted in this group
    for allocation in allocations:
        rid = allocation.request_id
        seen = records.get(rid) if rid else None
        try:
            decision = decide(allocation, decided.state, seen, taken.__contains__, now_us)
        except TurnIdError as refusal:
            decided.outcomes.append(refusal)
            continue
        if isinstance(decision, Replay):
            if rid in fresh:  # granted earlier in this batch (a retry within one batch)
                decided.outcomes.append(Replayed(fresh[rid]))
            else:
                decided.outcomes.append(decision)
                first = decision.first_sequence
                decided.replayed += range(first, first + decision.count)
            continue
        decided.state = decision.state
        decided.runs.append(decision.turns)
        decided.granted += 1
        taken.update(decision.turns.turn_ids)
        if decision.record is not None:
            records[rid] = decision.record
            fresh[rid] = decision.turns
            decided.records.append((rid, decision.record))
        decided.outcomes.append(decision.turns)
    return decided


def notify_channel(schema: str | None) -> str:
    """The channel of the deployment whose tables are in `schema` (the replicas' current_schema).

    Channels are database-wide: deployments in different schemas of one database on one channel
    would each wake for the others' commits (every replica's listener, and PostgreSQL, working
    for nothing: four idle servers in other schemas took a server's unary calls/s down by a
    quarter here). A digest keeps the name a short plain identifier whatever the schema's name;
    `public` keeps the channel of the releases before, so that its replicas can be upgraded one
    at a time and still hear each other.
    """
    if schema is None or schema == "public":
        return NOTIFY_CHANNEL
    return f"{NOTIFY_CHANNEL}_{hashlib.sha256(schema.encode()).hexdigest()[:16]}"


def _json(rows: list[Any]) -> str:
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":"))


def _rows_param(rows: list[Any]) -> tuple[str, int]:
    """The parameters of a _rows() subquery."""
    return _json(rows), len(rows)


def _write_params(decided: dict[ThreadKey, _Decided]) -> tuple[str, int, str, str]:
    """The rows of _WRITE for the threads of a batch that were granted turns: their states,
    request records and turns."""
    states: list[Any] = []
    requests: list[Any] = []
    turns: list[Any] = []
    for (namespace, thread_id), group in decided.items():
        if not group.runs:
            continue
        s = group.state
        states.append(
            [
                namespace,
                thread_id,
                s.next_sequence,
                s.next_compaction,
                s.last_minted,
                s.max_claimed,
                s.create_time_us,
                s.update_time_us,
            ]
        )
        requests += (
            [namespace, thread_id, rid, r.kind, r.count, r.claimed_turn_id, r.first_sequence]
            for rid, r in group.records
        )
        for run in group.runs:
            kind, first, when = int(run.kind), run.first_sequence, run.create_time_us
            request_id, claimed = run.request_id, run.claimed
            turns += (
                [namespace, thread_id, first + i, turn_id, kind, request_id, claimed, when]
                for i, turn_id in enumerate(run.turn_ids)
            )
    return _json(states), len(states), _json(requests), _json(turns)


async def _script(
    cursor: psycopg.AsyncClientCursor[TupleRow], statements: list[tuple[str, Sequence[Any]]]
) -> list[list[TupleRow]]:
    """`statements` in one simple query, so one round trip and one server reply (parameters
    bound client-side, each a JSON text or a number); the rows of those that return rows, in
    order. The first that fails ends the script and raises."""
    await cursor.execute(
        ";".join(sql for sql, _ in statements), [p for _, ps in statements for p in ps]
    )
    results = []
    while True:
        result = cursor.pgresult
        if result is not None and result.status == pq.ExecStatus.TUPLES_OK:
            results.append(await cursor.fetchall())
        if not cursor.nextset():
            return results


def _lock_wait(error: TurnIdError) -> bool:
    """Whether the batch failed waiting for a lock (lock_timeout, or statement_timeout)."""
    cause = error.__cause__
    return isinstance(cause, pg_errors.LockNotAvailable | pg_errors.QueryCanceled)


def _payloads(replica: str, keys: Sequence[ThreadKey]) -> list[str]:
    """NOTIFY payloads naming `keys`: `[replica, namespace, thread_id, namespace, thread_id,
    ...]`, as many threads in each as fit. A key too long to name is sent as `[replica]`
    (every watcher re-reads); so is everything a replica that reads only `[replica, namespace,
    thread_id]` does not understand, which makes the packed form safe in a rolling upgrade."""
    head = _json([replica])[:-1]  # '["replica"'
    limit = _NOTIFY_PAYLOAD_MAX - len(head.encode()) - 1
    payloads: list[str] = []
    parts: list[str] = []
    size = 0
    for key in keys:
        part = _json(list(key))[1:-1]  # '"namespace","thread_id"'
        length = len(part.encode()) + 1
        if length > limit:
            payloads.append(head + "]")
            continue
        if size + length > limit:
            payloads.append(",".join((head, *parts)) + "]")
            parts, size = [], 0
        parts.append(part)
        size += length
    if parts:
        payloads.append(",".join((head, *parts)) + "]")
    return sorted(set(payloads))


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
        max_batches: int = _MAX_BATCHES,
        listen_linger_s: float = _LISTEN_LINGER_S,
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
        self._sweep: asyncio.Future[None] | None = None  # the pool check after a dead connection
        self._closed = False
        #: Woken at every commit here and, through NOTIFY, at every commit on other replicas.
        self.changes = ChangeFeed(fallback_interval=watch_fallback_s)
        #: Called after each commit with (allocations, turns, seconds in the transaction).
        self.on_commit: Callable[[int, int, float], None] | None = None
        self._replica = uuid.uuid4().hex[:12]  # tells our own notifications from others'
        self._pending: set[ThreadKey] = set()
        self._notify_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Allocations waiting, per thread, in the order their threads queued; the threads of
        # the batches in flight (a thread is in at most one: its allocations stay in order).
        self._queues: dict[ThreadKey, deque[_Queued]] = {}
        self._busy: set[ThreadKey] = set()
        self._max_batches = max(1, max_batches)
        if listen_linger_s < 0:
            raise ValueError(f"listen_linger_s must be 0 or more, not {listen_linger_s}")
        self._listen_linger_s = listen_linger_s
        self._drivers: set[asyncio.Task[None]] = set()
        self._batch_started: dict[asyncio.Task[Any], float] = {}  # driver -> its batch's start
        self._batch_seconds: deque[float] = deque(maxlen=_STALL_WINDOW)  # the last batches'
        self._stall_s = _STALL_S
        self._stall_timer: asyncio.TimerHandle | None = None
        #: Set while the listener is connected and LISTENing: only while anyone watches here
        #: (and for `listen_linger_s` after). Tests wait on it.
        self.listening = asyncio.Event()
        #: Set while the listener holds no connection: nobody watches here (for
        #: `listen_linger_s`), or it is reconnecting, or the store is closed. Tests wait on it.
        self.stopped_listening = asyncio.Event()
        self.stopped_listening.set()
        #: The NOTIFY channel of this store's schema (`notify_channel`), known once open.
        self.channel = NOTIFY_CHANNEL

    async def _configure(self, conn: Connection) -> None:
        # Every server-side wait shorter than the client's 10 s default deadline (invariant 9).
        # A transaction left open (a stalled replica holding a thread's lock) is ended too.
        await conn.execute(
            f"SET statement_timeout = {self._statement_timeout_ms};"
            f"SET lock_timeout = {self._lock_timeout_ms};"
            f"SET idle_in_transaction_session_timeout = {self._statement_timeout_ms}"
        )

    async def _check_connection(self, conn: Connection) -> None:
        """The pool's check of a connection taken from it; one found dead (the server restarted)
        means its idle siblings are dead too: check them all at once in the background, so the
        pool refills at once instead of finding them one checkout (and one wait) at a time."""
        try:
            await _check_connection(conn)
        except Exception as error:
            pool = self._pool
            if pool is not None and (self._sweep is None or self._sweep.done()):
                # Once per sweep, not per connection: a database restart kills them all.
                log.info(
                    "PostgreSQL connection lost (found dead when taken from the pool; "
                    "checking the idle ones): %s",
                    _one_line(error),
                )
                self._sweep = asyncio.ensure_future(pool.check())
            raise

    async def open(self) -> None:
        await migrate(self.url, apply=self.migrate)
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self.url,
            kwargs=_connect_kwargs(self.url, self._connect_timeout_s),
            min_size=self._pool_min,
            max_size=self._pool_max,
            timeout=self._acquire_timeout_s,
            configure=self._configure,
            check=self._check_connection,
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
        try:
            async with pool.connection() as conn:
                cursor = await conn.execute("SELECT current_schema()")
                (schema,) = await cursor.fetchone() or (None,)
        except psycopg.Error as error:
            await pool.close()
            raise PostgresUnreachableError(
                f"cannot read the schema at {redact_url(self.url)}: {_one_line(error)}"
            ) from error
        self.channel = notify_channel(schema)
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
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        tasks, self._tasks = self._tasks, []
        if self._sweep is not None and not self._sweep.done():
            tasks.append(self._sweep)  # type: ignore[arg-type]
        self._sweep = None
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
    # Allocations queue up in this store, per thread, and go to the database in batches: one
    # transaction, one commit for every thread queued when the batch starts (each thread's
    # allocations in it decided one after the other), at most `max_batches` in flight.

    async def allocate(self, allocation: Allocation) -> Sequence[Turn]:
        return await self._enqueue(allocation)

    async def allocate_many(
        self, allocations: Sequence[Allocation]
    ) -> list[Sequence[Turn] | Exception]:
        return await allocate_queued(self._enqueue, allocations)

    def _enqueue(self, allocation: Allocation) -> asyncio.Future[Sequence[Turn]]:
        """Queue an allocation for a batch: its future has its turns once committed."""
        if self._closed:
            raise store_unavailable("store is closed")
        self._require_pool()
        key = (allocation.namespace, allocation.thread_id)
        queued = _Queued(allocation, asyncio.get_running_loop().create_future())
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = deque((queued,))
        else:
            queue.append(queued)
        self._wake()
        return queued.future

    def _wake(self) -> None:
        """Something is queued: start a batch now if none is in flight; if some are, start
        another only once they have all run for _STALL_S (a slow database, a lock wait), up
        to max_batches. One batch at a time gathers the most allocations in each, which is
        what costs least when the database answers quickly."""
        if len(self._drivers) >= self._max_batches:
            return
        if self._drivers:
            if len(self._batch_started) < len(self._drivers):
                return  # a driver about to take a batch takes this too
            wait = max(self._batch_started.values()) + self._stall_s - time.monotonic()
            if wait > 0:
                if self._stall_timer is None:
                    self._stall_timer = asyncio.get_running_loop().call_later(wait, self._stalled)
                return
        # Starts at the next turn of the event loop: what queues up until then joins it.
        driver = asyncio.create_task(self._drive(), name="turnid-pg-batch")
        self._drivers.add(driver)
        driver.add_done_callback(self._drivers.discard)

    def _stalled(self) -> None:
        self._stall_timer = None
        if any(key not in self._busy for key in self._queues):
            self._wake()

    async def _drive(self) -> None:
        """Commits batches of the queued allocations until none is left that no other batch
        holds the thread of (that batch's driver takes them when it is done)."""
        driver = asyncio.current_task()
        assert driver is not None
        try:
            while batch := self._take_batch():
                started = self._batch_started[driver] = time.monotonic()
                try:
                    await self._commit_batch(batch)
                finally:
                    del self._batch_started[driver]
                    self._busy.difference_update(batch)
                    self._batch_took(time.monotonic() - started)
        finally:
            # Now, not in a done callback: until then _wake would count on this driver.
            self._batch_started.pop(driver, None)
            self._drivers.discard(driver)

    def _batch_took(self, seconds: float) -> None:
        """A batch ended: the stall bound follows how long batches take now."""
        window = self._batch_seconds
        window.append(seconds)
        self._stall_s = min(_STALL_MAX_S, max(_STALL_S, _STALL_FACTOR * statistics.median(window)))

    def _take_batch(self) -> dict[ThreadKey, list[_Queued]]:
        """Up to _BATCH_THREADS threads' groups (oldest queue first, threads in flight skipped),
        up to about _BATCH_TURNS turns; each group is a thread's allocations in arrival order."""
        batch: dict[ThreadKey, list[_Queued]] = {}
        turns = 0
        for key in [k for k in self._queues if k not in self._busy]:
            queue = self._queues[key]
            group: list[_Queued] = []
            group_turns = 0
            while queue and len(group) < _GROUP_MAX and group_turns < _GROUP_TURNS:
                queued = queue.popleft()
                if queued.future.done():  # the caller gave up
                    continue
                if time.monotonic() - queued.since > self._acquire_timeout_s:
                    # Waited as long as for a pooled connection: let the caller retry.
                    queued.future.set_exception(
                        store_unavailable("postgresql: allocation queued too long")
                    )
                    continue
                group.append(queued)
                group_turns += queued.allocation.count
            if not queue:
                del self._queues[key]
            if group:
                batch[key] = group
                self._busy.add(key)
                turns += group_turns
                if len(batch) >= _BATCH_THREADS or turns >= _BATCH_TURNS:
                    break
        return batch

    async def _commit_batch(self, batch: dict[ThreadKey, list[_Queued]]) -> None:
        keys = sorted(batch)  # the lock order (the statements sort the same way)
        suspects: dict[ThreadKey, set[str]] = {}  # ids a rolled-back attempt found taken
        try:
            outcomes = await self._run(
                lambda conn: self._batch_once(conn, keys, batch, suspects),
                # Repeating is safe only where nothing was committed: _batch_once says so by
                # raising _Lost when the connection died before the commit went out.
                idempotent=False,
            )
        except BaseException as error:
            if len(keys) > 1 and isinstance(error, TurnIdError) and _lock_wait(error):
                # One thread's lock is held elsewhere too long (a stalled replica): that must
                # not fail the others. Each thread again, alone.
                log.info("PostgreSQL batch of %d threads timed out, one by one", len(keys))
                await asyncio.gather(*(self._commit_batch({key: batch[key]}) for key in keys))
                return
            failure = error if isinstance(error, Exception) else store_unavailable("cancelled")
            for group in batch.values():
                for queued in group:
                    if not queued.future.done():
                        queued.future.set_exception(failure)
            if not isinstance(error, Exception):
                raise
            return
        for key, group in batch.items():
            for queued, outcome in zip(group, outcomes[key], strict=True):
                if queued.future.done():
                    continue
                if isinstance(outcome, TurnIdError):
                    queued.future.set_exception(outcome)
                else:
                    queued.future.set_result(outcome)

    async def _batch_once(
        self,
        conn: Connection,
        keys: list[ThreadKey],
        batch: dict[ThreadKey, list[_Queued]],
        suspects: dict[ThreadKey, set[str]],
    ) -> dict[ThreadKey, list[Sequence[Turn] | TurnIdError]]:
        """One transaction for the batch, in two round trips. Explicit BEGIN/COMMIT in one
        pipeline: psycopg's transaction() inside a pipeline syncs at every step."""
        seen_rows: list[list[str]] = []
        candidate_rows: list[list[str]] = []
        for key in keys:
            allocations = [queued.allocation for queued in batch[key]]
            for rid in sorted({a.request_id for a in allocations if a.request_id}):
                seen_rows.append([*key, rid])
            candidates = {a.claimed_turn_id for a in allocations if a.claimed_turn_id is not None}
            for turn_id in sorted(candidates | suspects.get(key, set())):
                candidate_rows.append([*key, turn_id])
        started = time.perf_counter()
        commit_sent = False
        decided: dict[ThreadKey, _Decided] = {}
        try:
            cursor = psycopg.AsyncClientCursor(conn)
            # Round trip 1: lock the threads in key order, then read (new snapshots, that see
            # what the locks' previous holders committed) what decide needs.
            first: list[tuple[str, Sequence[Any]]] = [
                ("BEGIN", ()),
                (_LOCK_THREADS, (_json(keys),)),
            ]
            if seen_rows:
                first.append((_SEEN, _rows_param(seen_rows)))
            if candidate_rows:
                first.append((_TAKEN, _rows_param(candidate_rows)))
            results = await _script(cursor, first)
            states = {(r[0], r[1]): _state(r[2:]) for r in results[0]}
            records: dict[ThreadKey, dict[str, RequestRecord]] = {key: {} for key in keys}
            for r in results[1] if seen_rows else ():
                records[r[0], r[1]][r[2]] = RequestRecord(r[3], r[4], r[5], r[6])
            taken: dict[ThreadKey, set[str]] = {key: set() for key in keys}
            for r in results[-1] if candidate_rows else ():
                taken[r[0], r[1]].add(r[2])
            if len(states) != len(keys):  # the upsert guarantees the rows
                raise _Retry("thread row vanished")
            now_us = time.time_ns() // 1000
            replayed: list[list[Any]] = []
            for key in keys:
                allocations = [queued.allocation for queued in batch[key]]
                group = _decide_group(allocations, states[key], records[key], taken[key], now_us)
                decided[key] = group
                replayed += ([*key, sequence] for sequence in group.replayed)

            # Round trip 2: read what is replayed, write, commit.
            second: list[tuple[str, Sequence[Any]]] = []
            if replayed:
                second.append((_REPLAYED, _rows_param(replayed)))
            if any(group.runs for group in decided.values()):
                second.append((_WRITE, _write_params(decided)))
            second.append(("COMMIT", ()))
            commit_sent = True
            results = await _script(cursor, second)
            by_sequence: dict[tuple[str, str, int], Turn] = {}
            for r in results[0] if replayed else ():
                turn = _turn(r[1:])
                by_sequence[r[0], turn.thread_id, turn.sequence] = turn
        except BaseException as error:
            if not isinstance(error, Exception):
                raise  # cancelled: the pool discards a connection left mid-transaction
            # A failed statement skips the rest of its script (and the COMMIT): end the
            # transaction.
            if not conn.broken and conn.info.transaction_status != pq.TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):
                    await conn.execute("ROLLBACK")
            if isinstance(error, pg_errors.UniqueViolation):
                if error.diag.constraint_name == _TURN_ID_KEY:
                    # A minted id collided with a claimed one: retry the batch with the ids it
                    # minted reported as candidates, so the colliding one is found taken.
                    for key, group in decided.items():
                        ids = suspects.setdefault(key, set())
                        for run in group.runs:
                            ids.update(run.turn_ids)
                raise _Retry(_one_line(error)) from error
            if isinstance(error, psycopg.OperationalError) and conn.broken and not commit_sent:
                raise _Lost(_one_line(error)) from error
            raise
        granted = sum(group.granted for group in decided.values())
        if granted:
            seconds = time.perf_counter() - started
            written = [key for key, group in decided.items() if group.runs]
            turns = sum(len(run) for group in decided.values() for run in group.runs)
            self._committed(written, granted, turns, seconds)
        return {
            key: [
                Replayed(
                    by_sequence[key[0], key[1], s]
                    for s in range(o.first_sequence, o.first_sequence + o.count)
                )
                if isinstance(o, Replay)
                else o
                for o in group.outcomes
            ]
            for key, group in decided.items()
        }

    def _committed(
        self, keys: list[ThreadKey], allocations: int, turns: int, seconds: float
    ) -> None:
        for key in keys:
            self.changes.publish(key)
        self._pending.update(keys)
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
            payloads = _payloads(self._replica, sorted(keys))
            try:
                async with pool.connection() as conn:
                    # A transaction that notifies holds a database-wide lock until its commit
                    # is done; nothing here needs that commit on disk (notifications do not
                    # survive a crash anyway), so it does not wait for the WAL flush.
                    await conn.execute(
                        "SELECT set_config('synchronous_commit', 'off', true), "
                        "pg_notify(%s, payload) FROM json_array_elements_text(%s::json) "
                        "AS payload",
                        (self.channel, _json(payloads)),
                    )
            except psycopg.Error as error:
                log.info("PostgreSQL NOTIFY failed (watchers will re-read): %s", error)

    async def _listen(self) -> None:
        """One LISTEN connection per store while anyone watches here, reconnecting until the
        store closes; closed once nobody has watched for `listen_linger_s`, so that replicas
        nobody watches are not woken by every commit of the others (nor PostgreSQL made to
        deliver to them)."""
        backoff = _LISTEN_BACKOFF_S[0]
        while True:
            await self.changes.watched.wait()
            try:
                conn = await self._listen_connection()
                async with conn:
                    await conn.execute(f"LISTEN {self.channel}")
                    backoff = _LISTEN_BACKOFF_S[0]
                    # Notifications sent before we listened are lost: every watcher re-reads
                    # (the ones that began watching while the connection was being made too).
                    self.changes.publish_all()
                    self.stopped_listening.clear()
                    self.listening.set()
                    await self._hear(conn)
                continue  # nobody watches: the connection is closed, LISTEN with it
            except psycopg.Error as error:
                log.info("PostgreSQL LISTEN connection lost (reconnecting): %s", error)
            finally:  # also when the store closes (cancelled): no connection, no LISTEN
                self.listening.clear()
                self.stopped_listening.set()
            self.changes.publish_all()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _LISTEN_BACKOFF_S[1])

    async def _listen_connection(self) -> Connection:
        return await psycopg.AsyncConnection.connect(
            self.url, **_connect_kwargs(self.url, self._connect_timeout_s)
        )

    async def _hear(self, conn: Connection) -> None:
        """Turn notifications into wake-ups until nobody has watched for `listen_linger_s`.
        Between two `notifies()` nothing reads the connection: what arrives meanwhile is read
        by the next."""
        linger = self._listen_linger_s
        changes = self.changes
        while True:
            if changes.watched.is_set():
                # Looked at again this often while watched: the linger starts when the last
                # watcher leaves, at most this long after.
                timeout = _LISTEN_RECHECK_S
            else:
                timeout = linger - (time.monotonic() - changes.idle_since)
                if timeout <= 0:
                    return
            async for notify in conn.notifies(timeout=timeout):
                self._on_notify(notify.payload)

    def _on_notify(self, payload: str) -> None:
        try:
            fields = json.loads(payload)
        except ValueError:
            log.debug("ignoring NOTIFY payload %r", payload)
            return
        if not isinstance(fields, list) or not fields or fields[0] == self._replica:
            return  # our own commit: its watchers were woken at commit
        if len(fields) % 2 == 1 and len(fields) > 1 and all(isinstance(f, str) for f in fields):
            for index in range(1, len(fields), 2):
                self.changes.publish((fields[index], fields[index + 1]))
        else:
            self.changes.publish_all()
