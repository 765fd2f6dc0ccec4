"""The embedded default store: one SQLite file, safe to share between service processes.

Durability: WAL with synchronous=FULL, so an acknowledged allocation survives kill -9 and
power loss. Throughput: the requests queued behind the writer are committed together in one
`BEGIN IMMEDIATE` transaction (group commit), so the fsync is shared. The write lock is the
serialization point of every thread in the file, across processes: inside it the group's
threads and request records are read in one statement, `domain.allocation.decide()` is applied
to every allocation of the group in turn (carrying each thread's state, request records and
granted ids from one allocation to the next), and the group's rows are written with one
multi-row statement per table. A refused request has queued nothing, so it never undoes or
blocks its neighbours and needs no savepoint. A group of up to `_LOOP_MAX_TURNS` turns is read,
decided and written on the event loop (when the write lock is free at once); bigger groups, and
groups that find the lock held by another process, run in the writer thread (`_WriterThread`)
whole.

Where such a group's COMMIT (the WAL writes and the fsync) runs depends on its size and on the
disk. A group of at least `_LOOP_COMMIT_MIN` allocations, unless all of the last few such
COMMITs waited longer than `_LOOP_COMMIT_MAX_S` for the disk, and a lone allocation that came to an
idle writer (`_ALONE_IDLE_S`), commit on the event loop thread itself: the hand-off to the writer
thread and back costs two thread wake-ups and a GIL hand-over each way, more than the loop would
have done meanwhile. A lone `allocate()` does not even queue: it commits in its caller's
coroutine, before that first yields to the loop (`_commit_alone`), unless the loop was busy
while the writer idled (calls reaching it one by one under load: `_ALONE_BUSY_MAX`). A small
group under load (a few allocations queued behind a busy writer), and a big one on a slow disk
(the loop would stall for every fsync), commit in the writer thread, so that the loop takes in
the calls that will make the next group meanwhile.

Groups are bounded: at most `_MAX_GROUP_TURNS` turns, and the writer stops deciding more of a
group after `_MAX_GROUP_S` of work under the lock (the rest go back to the head of the queue),
so the lock is never held long and other processes' waits stay well inside busy_timeout. The
queue is bounded by turns too (`max_pending`): beyond it allocations are refused
RESOURCE_EXHAUSTED/OVERLOADED at once. Requests whose caller has given up (deadline,
cancellation) are dropped when the group is formed, before anything is written.

Faults: any failure rolls the transaction back (the file's lock is never left held). A full
disk is RESOURCE_EXHAUSTED/STORAGE_FULL, other SQLite operational errors STORE_UNAVAILABLE
(the driver's text goes to the log only); both are retryable with the same request_id and the
store recovers by itself. A constraint failure that decide() did not foresee (none is known)
retries each allocation of the group alone, so only the culprit fails. Anything else is a bug
and propagates as itself (the servicer makes it INTERNAL with a correlation id).

Checkpoints: SQLite's automatic checkpoint (copying the WAL back into the database file, with
two fsyncs, every ~1,000 pages) would run inside whichever COMMIT crosses the threshold, and a
COMMIT may run on the event loop; so the write connection turns it off and the store
checkpoints in its own thread instead, on its own connection: PASSIVE (it never waits for or
blocks the writer or readers), at most every `_CHECKPOINT_INTERVAL_S` while commits go on, and
once more after the last one. SQLite restarts the WAL from its start (so that it stays bounded)
only at a write that finds every frame of it checkpointed; under sustained load commits go on
while a pass runs, so none ever does, and the WAL grew without end (~100 MB/s under
AsyncTurnIdClient from 32 tasks on a 2-core VM). So after a pass that commits overtook, the
write loop checkpoints the rest itself on the write connection, between two groups
(`_catch_up`): only the frames written during the pass, and no commit of this process can come
between it and the next write, which then restarts the WAL. (Another process writing the same
file can still come between; then the next pass's catch-up tries again.)

Watch: after each commit the writer publishes the threads it added turns to on `changes`.
Commits by other processes are seen by one poller per store, which reads `PRAGMA
data_version` on its own connection every `_POLL_S` while anyone watches and, when the file
changed and the change was not (only) ours, wakes every watcher (`publish_all`).

`:memory:` opens one private in-memory database on one connection that serves reads and writes
(there is no one else to share it with, and two connections to one shared-cache database
would fail reads with SQLITE_LOCKED while the writer holds its table locks).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from turnid.service.domain.allocation import Replay, decide
from turnid.service.domain.errors import (
    TurnIdError,
    disk_full,
    overloaded,
    store_unavailable,
)
from turnid.service.domain.model import (
    NEW_THREAD,
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
from turnid.service.domain.watch import ChangeFeed, ThreadKey

# Forward-only migrations; PRAGMA user_version counts how many have been applied. Each script
# runs statement by statement (split on ";") in one transaction under the write lock.
MIGRATIONS: Sequence[str] = (
    # 1: threads, turns and requests keyed by thread_id.
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
    # 2: the namespace leads every key (existing rows go to the default namespace ""), and a
    # thread row carries what decide() needs and GetThread shows. SQLite cannot change a
    # primary key, so the tables are rebuilt; the new thread columns come from the turns.
    """
    CREATE TABLE threads_v2 (
        namespace       TEXT NOT NULL,
        thread_id       TEXT NOT NULL,
        next_sequence   INTEGER NOT NULL,
        next_compaction INTEGER NOT NULL,
        last_minted     TEXT NOT NULL,
        max_claimed     TEXT NOT NULL,
        create_time_us  INTEGER NOT NULL,
        update_time_us  INTEGER NOT NULL,
        PRIMARY KEY (namespace, thread_id)
    ) WITHOUT ROWID;
    CREATE TABLE turns_v2 (
        namespace      TEXT NOT NULL,
        thread_id      TEXT NOT NULL,
        sequence       INTEGER NOT NULL,
        turn_id        TEXT NOT NULL,
        kind           INTEGER NOT NULL,
        request_id     TEXT NOT NULL,
        claimed        INTEGER NOT NULL,
        create_time_us INTEGER NOT NULL,
        PRIMARY KEY (namespace, thread_id, sequence),
        UNIQUE (namespace, thread_id, turn_id)
    ) WITHOUT ROWID;
    CREATE TABLE requests_v2 (
        namespace       TEXT NOT NULL,
        thread_id       TEXT NOT NULL,
        request_id      TEXT NOT NULL,
        kind            INTEGER NOT NULL,
        count           INTEGER NOT NULL,
        claimed_turn_id TEXT,
        first_sequence  INTEGER NOT NULL,
        PRIMARY KEY (namespace, thread_id, request_id)
    ) WITHOUT ROWID;
    INSERT INTO turns_v2 (namespace, thread_id, sequence, turn_id, kind, request_id, claimed,
                          create_time_us)
        SELECT '', thread_id, sequence, turn_id, kind, request_id, claimed, create_time_us
        FROM turns;
    INSERT INTO requests_v2 (namespace, thread_id, request_id, kind, count, claimed_turn_id,
                             first_sequence)
        SELECT '', thread_id, request_id, kind, count, claimed_turn_id, first_sequence
        FROM requests;
    INSERT INTO threads_v2 (namespace, thread_id, next_sequence, next_compaction, last_minted,
                            max_claimed, create_time_us, update_time_us)
        SELECT '', t.thread_id, t.next_sequence, t.next_compaction,
            coalesce((SELECT max(u.turn_id) FROM turns u WHERE u.thread_id = t.thread_id
                      AND u.claimed = 0 AND u.kind IN (1, 3)), ''),
            coalesce((SELECT max(u.turn_id) FROM turns u WHERE u.thread_id = t.thread_id
                      AND u.claimed <> 0), ''),
            coalesce((SELECT min(u.create_time_us) FROM turns u
                      WHERE u.thread_id = t.thread_id), 0),
            coalesce((SELECT max(u.create_time_us) FROM turns u
                      WHERE u.thread_id = t.thread_id), 0)
        FROM threads t;
    DROP TABLE threads;
    DROP TABLE turns;
    DROP TABLE requests;
    ALTER TABLE threads_v2 RENAME TO threads;
    ALTER TABLE turns_v2 RENAME TO turns;
    ALTER TABLE requests_v2 RENAME TO requests
    """,
    # 3: the turn_id index and the requests key lead with the id instead of the thread. A group
    # commit of N allocations on N threads dirtied one leaf per thread in each of the three
    # B-trees (every leaf a WAL frame: two pwrites, checksummed); with UUIDv7 turn ids and
    # request ids (what turnid mints and what its clients send) the new keys of a commit sit
    # side by side at the right edge of their B-tree, a leaf or two for the whole group.
    # Every lookup is by the whole key, so the order of its columns changes no query.
    """
    CREATE TABLE turns_v3 (
        namespace      TEXT NOT NULL,
        thread_id      TEXT NOT NULL,
        sequence       INTEGER NOT NULL,
        turn_id        TEXT NOT NULL,
        kind           INTEGER NOT NULL,
        request_id     TEXT NOT NULL,
        claimed        INTEGER NOT NULL,
        create_time_us INTEGER NOT NULL,
        PRIMARY KEY (namespace, thread_id, sequence),
        UNIQUE (turn_id, namespace, thread_id)
    ) WITHOUT ROWID;
    CREATE TABLE requests_v3 (
        namespace       TEXT NOT NULL,
        thread_id       TEXT NOT NULL,
        request_id      TEXT NOT NULL,
        kind            INTEGER NOT NULL,
        count           INTEGER NOT NULL,
        claimed_turn_id TEXT,
        first_sequence  INTEGER NOT NULL,
        PRIMARY KEY (request_id, namespace, thread_id)
    ) WITHOUT ROWID;
    INSERT INTO turns_v3 (namespace, thread_id, sequence, turn_id, kind, request_id, claimed,
                          create_time_us)
        SELECT namespace, thread_id, sequence, turn_id, kind, request_id, claimed,
            create_time_us
        FROM turns;
    INSERT INTO requests_v3 (namespace, thread_id, request_id, kind, count, claimed_turn_id,
                             first_sequence)
        SELECT namespace, thread_id, request_id, kind, count, claimed_turn_id, first_sequence
        FROM requests;
    DROP TABLE turns;
    DROP TABLE requests;
    ALTER TABLE turns_v3 RENAME TO turns;
    ALTER TABLE requests_v3 RENAME TO requests
    """,
)

_TURN_COLUMNS = "thread_id, turn_id, kind, sequence, create_time_us, request_id, claimed"
_STATE_COLUMNS = (
    "next_sequence, next_compaction, last_minted, max_claimed, create_time_us, update_time_us"
)
# GetThread: the thread's row and its last turn, in one statement (one snapshot).
_THREAD_INFO = (
    "SELECT "
    + ", ".join(
        [f"h.{c}" for c in _STATE_COLUMNS.split(", ")]
        + [f"t.{c}" for c in _TURN_COLUMNS.split(", ")]
    )
    + " FROM threads h JOIN turns t ON t.namespace = h.namespace AND t.thread_id = h.thread_id "
    "AND t.sequence = h.next_sequence - 1 WHERE h.namespace = ? AND h.thread_id = ?"
)
# Group bounds: turns per transaction (a batch of 1000 counts 1000), and how long the writer
# keeps deciding more of a group once it holds the write lock.
_MAX_GROUP_TURNS = 4096
_MAX_GROUP_S = 0.050
# Commit delay: after a group that came from at least _COMMIT_SIBLINGS calls, the writer waits
# up to this long (asyncio's timer resolution is 1 ms) before taking the next group, until as
# many calls, or as many allocations, are queued as joined the last one (it waits only while
# both are short). Each commit costs ~150-200 µs of CPU (BEGIN IMMEDIATE, WAL frames, fsync)
# whatever its size, so on a CPU-bound server bigger groups mean more allocations per second:
# unary calls at concurrency 32, a fixed 2 ms gave ~12 allocations per commit, 3 ms ~22 and 4 ms
# ~22 with lower throughput (bench/profile_unary.py, allocations/commit). A caller at
# concurrency 1 never waits; the first caller after a burst may wait up to 3 ms once. Calls, not
# only allocations: an AllocateMany from a coalescing client (two in flight, 16 allocations each
# at 32 callers) is a group already, and waiting for the client's other call made every group
# hold both, so that server and client took turns instead of overlapping: AsyncTurnIdClient
# from 32 tasks (3 s trials), 5,764-6,844 allocations/s at 0.71-0.76 of a core with the wait,
# 7,473-9,358 at 0.90-0.96 without it (both with the off-CPU COMMIT test below).
_COMMIT_SIBLINGS = 4
_COMMIT_DELAY_S = 0.003
# A lone allocation (the only one queued, arriving after the writer had been idle this long)
# is committed on the event loop thread itself: the hand-off to the writer thread and back
# costs two thread wake-ups (~75 µs at concurrency 1 on the bench machine, about half the
# commit), while the commit's fsync releases the GIL, so the loop only stalls for one commit
# (other calls wait no longer than they would have behind it). Only when the write lock is
# free at once (busy_timeout 0 for BEGIN IMMEDIATE): a lock held by another process sends the
# group to the writer thread, which waits for it there. Under load (anything queued, or an
# arrival soon after the last commit) groups go to the writer thread, which lets the loop take
# in more requests for the next group during the commit. An allocate() that finds the writer
# idle so (and the last group too small for the commit delay) does not even queue: it commits
# in its caller's coroutine (_commit_alone), at c=1 -0.07 to -0.12 ms p50 and ~100 µs less CPU
# per call (bench/profile_unary.py, two A/Bs of 5-6 rounds).
_ALONE_IDLE_S = 0.000_2
_ALONE_MAX_TURNS = 64
# ... and only while the event loop spent at most this share of the writer's idle time on the
# CPU. A caller alone on an idle server finds the loop waiting for the network part of that
# time (at c=1 on a 2-core VM: 0.50-0.59 of it, first to ninth decile); under load, with calls
# reaching the loop one by one, the loop is busy all along (0.72-1.0). Without this, that VM
# (fsync ~0.1 ms) fell into committing every call of c=32 alone, each commit blocking the loop
# that accepts the next call: one allocation per commit, ~900 µs of loop CPU per call, 0.3 x
# the no-op's calls/s, in 7 of 30 trials (with this: none of 15 alternating with them;
# bench/profile_unary.py, three A/Bs: c=32 0.76 -> 0.82, 0.91 -> 0.81, 0.78 -> 0.88 x).
_ALONE_BUSY_MAX = 0.7
# A group of at least this many allocations commits on the event loop thread too (within
# _LOOP_MAX_TURNS). Unary AllocateTurnId at c=32 on a 2-core VM, interleaved A/B
# (bench/profile_unary.py, 5 rounds): every group in the writer thread 0.59-0.72 x the no-op's
# calls/s at 0.55-0.65 x its CPU; from 4, 8, 12 or 16 allocations on the loop 0.74-0.84 x at
# 0.72-0.81 x (the four within noise of each other), with more allocations per commit: while
# the loop is in such a COMMIT (the GIL released for its writes and fsync) gRPC's own threads
# keep receiving, and the commit delay gathers the next group. Every group on the loop
# collapses groups to one allocation (0.37 x): nothing is gathered while the loop commits a
# small one, so the next is as small.
_LOOP_COMMIT_MIN = 8
# ... while the least of the last _LOOP_COMMIT_WINDOW such COMMITs on the loop waited at most
# this long off the CPU (wall time less the loop thread's CPU time); when all of them waited
# longer the disk is slow, and big groups commit in the writer thread, but one in
# _LOOP_COMMIT_PROBE still commits on the loop, to notice when the disk is quick again. With
# every fsync delayed by 2 ms (strace inject), committing big groups on the loop took unary
# c=32 from ~1,600 to ~950 calls/s. The COMMIT's own CPU (its WAL frames: ~400 µs for 16
# allocations on 16 threads, ~2 pwrites and a checksum per page) is not the disk: judged on
# wall time, groups of 32 from the coalescing client (COMMIT ~1 ms with an fsync of 0.2 ms)
# flapped to the writer thread and stayed there for hundreds of groups, at about half the
# throughput. The least, and 2 ms: the time off the CPU is the disk (a COMMIT of 16 on 16
# threads flushes ~40 pages) plus the waits for the GIL and for a CPU once the fsync is done, and
# those only add. On a loaded 2-core VM (AsyncTurnIdClient from 32 tasks, fsync p50 0.13-0.28
# ms) groups of 16 waited 0.5-5.6 ms off the CPU, median ~1.0 ms, the least of 16 in a row
# 0.6-0.8 ms, and runs of 16 over 1 ms came often: judged on the median over 1 ms, 80% of the
# groups committed in the writer thread; on the least over 1 ms, 20-40%; on the least over 2
# ms, none, and 2.04-2.16 against 1.72-2.02 x the no-op's calls/s (bench/profile_unary.py
# --mode client-async, three A/Bs). With the fsyncs delayed by 2 ms (strace inject) the least
# was 3.3 ms and all but the probes went to the writer thread.
_LOOP_COMMIT_MAX_S = 0.002
_LOOP_COMMIT_WINDOW = 16
_LOOP_COMMIT_PROBE = 64
# A group of up to this many turns is decided and written on the event loop thread, inside
# the transaction it begins there (when the write lock is free at once); its COMMIT goes to
# the writer thread unless the group is big enough (_LOOP_COMMIT_MIN) or lone. In the writer
# thread every statement step releases the GIL and then waits for the busy loop to let it go
# (a futex wait and a thread switch each, ~15 per group), while the statements themselves take
# a few µs per allocation: on the loop they need no GIL hand-off. Bigger groups (batches) go
# to the writer thread whole, so the loop never stalls for long.
_LOOP_MAX_TURNS = 256
# At most this often a checkpoint runs while commits go on (see the module's docstring). At the
# store's group rates here (~10,000 allocations/s, ~2 WAL frames each) that is ~2,000 frames,
# twice SQLite's automatic threshold; a slow one only makes the next one start later.
_CHECKPOINT_INTERVAL_S = 0.1
# How often the change poller reads PRAGMA data_version while anyone watches.
_POLL_S = 0.075
# Lower than the client's default deadline (10 s), so a lock wait comes back in time for the
# client to retry it (invariant 9).
DEFAULT_BUSY_TIMEOUT_S = 5.0
#: What the WAL file is cut back to when it restarts (PRAGMA journal_size_limit).
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
# The writer's queue bound, in turns: ~1-2 s of the writer's work at its measured rates
# (~40k single allocations/s, ~150k+ batch turns/s in one process), well inside the client's
# deadline, and room for 64 batches of 1000 in flight.
DEFAULT_MAX_PENDING_TURNS = 65_536
MEMORY = ":memory:"
_T = TypeVar("_T")

log = logging.getLogger("turnid.stores.sqlite")
#: Less free space than this on the database's file system when an open fails: say it is full.
_FULL_DISK_BYTES = 64 * 1024

CommitHook = Callable[[int, int, float], None]


def storage_error(error: sqlite3.Error) -> TurnIdError | None:
    """The client-facing error for a SQLite failure, or None when it is a bug to propagate.

    SQLITE_FULL (a full disk, or max_page_count) is RESOURCE_EXHAUSTED/STORAGE_FULL; other
    operational and database errors (busy, I/O, corruption, a read-only file) are
    STORE_UNAVAILABLE, with the driver's text in the log only. Misuse of the driver
    (ProgrammingError, InterfaceError) and constraint failures are bugs: None.
    """
    name = getattr(error, "sqlite_errorname", None) or ""
    if name == "SQLITE_FULL":
        return disk_full()
    if isinstance(error, sqlite3.OperationalError) or type(error) is sqlite3.DatabaseError:
        return store_unavailable(f"sqlite: {name or type(error).__name__}: {error}")
    return None


def _turn(row: tuple[str, str, int, int, int, str, int]) -> Turn:
    return make_turn(row[0], row[1], TurnKind(row[2]), row[3], row[4], row[5], bool(row[6]))


def _state(row: tuple[int, int, str, str, int, int]) -> ThreadState:
    return ThreadState(row[0], row[1], row[2], row[3], row[4], row[5])


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is open (a failed COMMIT may have ended it already, and
    ROLLBACK then would hide the real error); a failing ROLLBACK is logged, not raised."""
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        log.exception("ROLLBACK failed")


def _connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves. The statement cache holds the
    # multi-row statements of every group size (4 kinds x _ROWS_PER_STATEMENT) and the rest.
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout_s,
        isolation_level=None,
        check_same_thread=False,
        cached_statements=4 * _ROWS_PER_STATEMENT + 64,
    )
    try:
        if path != MEMORY:
            _set_wal(conn, time.monotonic() + busy_timeout_s)
        conn.execute("PRAGMA synchronous=FULL")
        # Transient files (statement journals, sorts) in memory: they never hold data that
        # must survive (that is the WAL's job), and a file per group costs syscalls.
        conn.execute("PRAGMA temp_store=MEMORY")
        # SQLite reuses the WAL file from its start after each checkpoint that caught up, and
        # never shrinks it by itself: after a burst (or a reader that held checkpoints back)
        # the file would keep its biggest size. With a limit, the first commit after such a
        # restart truncates it to the limit; steady load here stays well under it (12.6 MB
        # under the coalescing client at ~8,000 allocations/s on 2 cores).
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
    except BaseException:
        conn.close()
        raise
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
                raise
            time.sleep(0.005)


#: How long a process waits for the write lock to migrate, far beyond busy_timeout: another
#: process may be migrating the same file (`--workers N`, or replicas started together), and a
#: migration that rebuilds tables takes a while on a big file (schema 3: ~14 s for 600,000
#: turns on a 2-core VM).
_MIGRATION_WAIT_S = 600.0


def _begin_for_migration(conn: sqlite3.Connection, deadline: float) -> None:
    """BEGIN IMMEDIATE, retried (each try waits busy_timeout) until `deadline`."""
    waited = False
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as error:
            busy = getattr(error, "sqlite_errorname", "").startswith("SQLITE_BUSY")
            if not busy or time.monotonic() >= deadline:
                raise
            if not waited:
                waited = True
                log.info(
                    "sqlite schema migration: waiting for the write lock (another process "
                    "holds it, maybe migrating the same file)"
                )


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations under the write lock; returns the schema version.

    A file that is up to date is only read: no write lock, no write, no change to its
    data_version or mtime.
    """
    target = len(MIGRATIONS)
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version == target:
        return target
    _begin_for_migration(conn, time.monotonic() + _MIGRATION_WAIT_S)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()  # now under the lock
        if version > target:
            raise RuntimeError(
                f"database schema version {version} is newer than this turnid "
                f"(knows {target}); upgrade turnid"
            )
        if version < target:
            for script in MIGRATIONS[version:]:
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={target}")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    if version < target:
        log.info("sqlite schema migrated from version %d to %d", version, target)
    return target


@dataclass(slots=True)
class _GroupThread:
    """One thread as a group sees it under the write lock: read once, then carried."""

    state: ThreadState
    first_new: int  # the sequence of the group's first new turn in the thread
    grants: list[TurnRun] = field(default_factory=list)  # turns granted in this group
    ids: set[str] = field(default_factory=set)  # their turn ids
    requests: dict[str, RequestRecord] = field(default_factory=dict)  # recorded in this group


# Rows per multi-row statement: at most 8 x 64 = 512 parameters (SQLite's smallest limit is
# 999), and 64 texts per statement kind for the statement cache (`_connect`). The writes are
# OR ROLLBACK: a statement that can fail after some of its rows went in would otherwise need a
# statement journal (a temporary file, and a copy of every page it touches) to undo only
# itself; a failure rolls the group back anyway (`_commit_group`).
_ROWS_PER_STATEMENT = 64
_TURN_INSERT = f"INSERT OR ROLLBACK INTO turns (namespace, {_TURN_COLUMNS}) VALUES "
# An allocation of many turns (a batch) differs from turn to turn only in turn_id and sequence
# (consecutive): one statement writes it, the rest bound once and the ids as one JSON array,
# instead of 8 bound values a row: 1,000 turns in 3.5 ms instead of 4.6 (a plain sqlite3 loop).
# Below ~16-32 turns a statement of its own costs as much as it saves.
_GRANT_INSERT = (
    f"INSERT OR ROLLBACK INTO turns (namespace, {_TURN_COLUMNS}) "
    "SELECT ?, ?, value, ?, ? + key, ?, ?, ? FROM json_each(?)"
)
_GRANT_MIN_TURNS = 32
_THREAD_UPSERT = (
    f"INSERT OR ROLLBACK INTO threads (namespace, thread_id, {_STATE_COLUMNS}) VALUES ",
    " ON CONFLICT (namespace, thread_id) DO UPDATE SET "
    "next_sequence = excluded.next_sequence, "
    "next_compaction = excluded.next_compaction, "
    "last_minted = excluded.last_minted, "
    "max_claimed = excluded.max_claimed, "
    "create_time_us = excluded.create_time_us, "
    "update_time_us = excluded.update_time_us",
)
_REQUEST_INSERT = (
    "INSERT OR ROLLBACK INTO requests (namespace, thread_id, request_id, kind, count, "
    "claimed_turn_id, first_sequence) VALUES "
)
# A group's first look at its threads and request_ids: one statement, one row (a JSON array,
# one element per key: [index, the thread's row or NULLs, the request's record or NULLs]),
# where a row per key would release and retake the GIL once per key (every sqlite3_step
# does), each time a thread switch when the event loop wants the GIL meanwhile.
_PREFETCH = (
    "WITH k(i, ns, tid, rid) AS (VALUES {keys}) SELECT json_group_array(json_array(k.i, "
    + ", ".join(f"h.{c}" for c in _STATE_COLUMNS.split(", "))
    + ", r.kind, r.count, r.claimed_turn_id, r.first_sequence)) FROM k "
    "LEFT JOIN threads h ON h.namespace = k.ns AND h.thread_id = k.tid "
    "LEFT JOIN requests r ON r.namespace = k.ns AND r.thread_id = k.tid AND r.request_id = k.rid"
)
_SQL_CACHE: dict[tuple[str, int], str] = {}


def _multi_row(kind: str, rows: int) -> str:
    """The text of a multi-row statement (the same str object each time: its hash is kept)."""
    text = _SQL_CACHE.get((kind, rows))
    if text is None:
        if kind == "prefetch":
            text = _PREFETCH.format(keys=", ".join(["(?, ?, ?, ?)"] * rows))
        elif kind == "turns":
            text = _TURN_INSERT + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
        elif kind == "threads":
            head, tail = _THREAD_UPSERT
            text = head + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * rows) + tail
        else:
            text = _REQUEST_INSERT + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * rows)
        text = _SQL_CACHE.setdefault((kind, rows), text)
    return text


def _run_rows(cursor: sqlite3.Cursor, kind: str, rows: Sequence[tuple[object, ...]]) -> None:
    """Write `rows` with one multi-row statement per _ROWS_PER_STATEMENT rows (executemany
    would step, and release the GIL, once per row)."""
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        cursor.execute(_multi_row(kind, len(chunk)), [v for row in chunk for v in row])


class _Batch:
    """One group's transaction while it is being decided: what it knows and what it writes.

    The transaction holds the file's write lock from BEGIN IMMEDIATE to COMMIT, so what it has
    read cannot change underneath it. First every thread of the group and every request_id it
    carries are read in one statement (`prefetch`); nothing is written until the group is
    decided; then one multi-row statement per table writes it all (`write`), each thread's row
    once.
    """

    __slots__ = ("cursor", "seen", "threads")

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.cursor = cursor
        self.threads: dict[ThreadKey, _GroupThread] = {}
        # What each (namespace, thread_id, request_id) of the group was used for before the
        # group (None: new).
        self.seen: dict[tuple[str, str, str], RequestRecord | None] = {}

    def prefetch(self, group: Sequence[Allocation]) -> None:
        """Read the group's threads and request records (one statement per 64 keys)."""
        keys: dict[tuple[str, str, str], None] = {}
        for allocation in group:
            keys[(allocation.namespace, allocation.thread_id, allocation.request_id)] = None
        order = list(keys)
        threads, seen = self.threads, self.seen
        for start in range(0, len(order), _ROWS_PER_STATEMENT):
            chunk = order[start : start + _ROWS_PER_STATEMENT]
            params: list[object] = []
            for index, (namespace, thread_id, request_id) in enumerate(chunk, start):
                params += (index, namespace, thread_id, request_id or None)
            (text,) = self.cursor.execute(_multi_row("prefetch", len(chunk)), params).fetchone()
            for row in json.loads(text):
                key = order[row[0]]
                thread_key = (key[0], key[1])
                if thread_key not in threads:
                    state = NEW_THREAD if row[1] is None else _state(row[1:7])
                    threads[thread_key] = _GroupThread(state, state.next_sequence)
                if key[2]:
                    seen[key] = None if row[7] is None else RequestRecord(*row[7:11])

    def changed(self) -> list[ThreadKey]:
        return [key for key, thread in self.threads.items() if thread.grants]

    @property
    def turn_count(self) -> int:
        return sum(len(grant) for thread in self.threads.values() for grant in thread.grants)

    def write(self) -> None:
        cursor = self.cursor
        changed = [(key, thread) for key, thread in self.threads.items() if thread.grants]
        if not changed:
            return
        rows: list[tuple[object, ...]] = []
        for (ns, _), thread in changed:
            for run in thread.grants:
                shared = (run.thread_id, run.kind, run.first_sequence, run.create_time_us)
                if len(run) >= _GRANT_MIN_TURNS and not run.claimed:
                    # A run this long was minted here (UUIDv7 text, auto-compact-N; a claim is
                    # one turn, whatever its text): nothing in its ids needs escaping, and
                    # joining them takes a tenth of json.dumps or less (6-7 against 83-110 µs
                    # for 1,000).
                    ids = '["' + '","'.join(run.turn_ids) + '"]'
                    cursor.execute(_GRANT_INSERT, (ns, *shared, run.request_id, run.claimed, ids))
                    continue
                thread_id, kind, first, create_time_us = shared
                rows += [
                    (
                        ns,
                        thread_id,
                        turn_id,
                        kind,
                        first + i,
                        create_time_us,
                        run.request_id,
                        run.claimed,
                    )
                    for i, turn_id in enumerate(run.turn_ids)
                ]
        _run_rows(cursor, "turns", rows)
        _run_rows(
            cursor,
            "threads",
            [
                (
                    ns,
                    tid,
                    s.next_sequence,
                    s.next_compaction,
                    s.last_minted,
                    s.max_claimed,
                    s.create_time_us,
                    s.update_time_us,
                )
                for (ns, tid), thread in changed
                for s in (thread.state,)
            ],
        )
        request_rows = [
            (ns, tid, rid, r.kind, r.count, r.claimed_turn_id, r.first_sequence)
            for (ns, tid), thread in changed
            for rid, r in thread.requests.items()
        ]
        if request_rows:
            _run_rows(cursor, "requests", request_rows)


_Result = Sequence[Turn] | BaseException


@dataclass(slots=True)
class _Outcome:
    """What the writer did with (a prefix of) a group."""

    results: list[_Result] = field(default_factory=list)  # for group[: len(results)]
    changed: set[ThreadKey] = field(default_factory=set)  # threads that got turns
    commits: list[tuple[int, int, float]] = field(default_factory=list)  # (allocs, turns, s)


@dataclass(slots=True)
class _Open:
    """A group's transaction, decided and written but not committed yet."""

    decided: Sequence[Allocation]  # the prefix of the group it covers
    cursor: sqlite3.Cursor
    batch: _Batch
    outcome: _Outcome  # results so far; the commit adds the rest
    started: float  # time.monotonic() before BEGIN


class _Call:
    """One store call's allocations (one from allocate, many from allocate_many) and the one
    future its caller awaits, settled once each allocation has its result. One future per call,
    not one per allocation gathered: each settled future costs the loop a callback, and the
    gather its own bookkeeping (allocate_many of 16 on 128 threads, in-process: 48-50 µs of
    loop CPU per allocation with a future each, 45.5-46 with one per call)."""

    __slots__ = ("future", "results", "waiting")

    def __init__(self, size: int) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.results: list[_Result | None] = [None] * size
        self.waiting = size

    @property
    def abandoned(self) -> bool:
        """The caller gave up (deadline, cancellation): the future is cancelled."""
        return self.future.done() and self.waiting > 0

    def settle(self, index: int, result: _Result) -> None:
        if self.abandoned:
            return
        self.results[index] = result
        self.waiting -= 1
        if self.waiting == 0:
            self.future.set_result(None)


def _turns_or_raise(result: _Result | None) -> Sequence[Turn]:
    if isinstance(result, BaseException):
        raise result
    assert result is not None  # every allocation of a settled call has its result
    return result


# A queued allocation, its call, its index in the call, and whether it is the first (or only)
# allocation of its call in the queue: the commit delay counts calls, not allocations (see
# _COMMIT_SIBLINGS).
_Pending = tuple[Allocation, _Call, int, bool]
_Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any] | Future[Any]"]


class _WriterThread(Executor):
    """The writer's own thread, fed by a SimpleQueue. `call` answers on the event loop with
    one call_soon_threadsafe (run_in_executor chains a concurrent Future, with its lock and
    condition, to an asyncio one: ~10 µs more CPU per hand-off, measured); `submit` is the
    Executor protocol, for the store's occasional uses (open, close, in-memory reads)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._shut = False

    def _start(self) -> None:
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._thread is None:
                # A daemon: a store that is never closed must not keep the process alive.
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, args, future = job
            if isinstance(future, Future):
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as error:
                        future.set_exception(error)
                continue
            failure: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as raised:
                result, failure = None, raised
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                future.get_loop().call_soon_threadsafe(_settle, future, result, failure)

    def call(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run fn(*args) in the thread; the result (or exception) comes back on the loop."""
        if self._thread is None or self._shut:
            self._start()
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._jobs.put((fn, args, future))
        return future

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        if self._thread is None or self._shut:
            self._start()
        future: Future[_T] = Future()
        self._jobs.put((functools.partial(fn, **kwargs) if kwargs else fn, args, future))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._shut:
                return
            self._shut = True
        thread = self._thread
        if thread is not None:
            self._jobs.put(None)
            if wait:
                thread.join()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class SqliteStore:
    def __init__(
        self,
        path: str,
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        max_pending: int = DEFAULT_MAX_PENDING_TURNS,
    ) -> None:
        self.path = path
        self._memory = path == MEMORY
        self._busy_timeout_s = busy_timeout_s
        # Turns queued for the writer beyond this are refused RESOURCE_EXHAUSTED/OVERLOADED at
        # once: a bounded queue keeps latency bounded and tells clients to back off.
        self._max_pending = max_pending
        self._writer = _WriterThread("turnid-sqlite-writer")
        # An in-memory database has one connection, so its reads go through the writer thread.
        self._reader: Executor = (
            self._writer
            if self._memory
            else ThreadPoolExecutor(1, thread_name_prefix="turnid-sqlite-reader")
        )
        self._poller: ThreadPoolExecutor | None = None
        self._checkpointer: ThreadPoolExecutor | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None
        # A checkpoint is scheduled or running (at most one), and when the last one started.
        self._checkpoint_pending = False
        self._checkpoint_started = 0.0
        self._checkpoint_commits = 0  # self.commits when the last one started
        # Commits overtook the last pass: the write loop catches up before its next group.
        self._wal_behind = False
        self.catch_ups = 0  # catch-up checkpoints done (_catch_up)
        #: Called on the event loop after each checkpoint with the result of PRAGMA
        #: wal_checkpoint(PASSIVE): (busy, frames in the WAL, frames checkpointed).
        self.on_checkpoint: Callable[[tuple[int, int, int]], None] | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._poll_conn: sqlite3.Connection | None = None
        self._pending: deque[_Pending] = deque()
        self._pending_turns = 0
        self._pending_calls = 0  # how many calls the queued allocations came from
        # When the queue last went from empty to one allocation, and when the writer last
        # finished a group (time.monotonic()): a lone caller is one that came to an idle writer.
        self._first_arrival = 0.0
        self._writer_idle_since = 0.0
        #: The loop thread's CPU time then (time.thread_time()): see _ALONE_BUSY_MAX.
        self._writer_idle_cpu = 0.0
        # The write loop is taking groups (the write connection is in use): no lone
        # allocation may commit in its caller meanwhile (see allocate).
        self._writing = False
        # How long the last big groups' COMMITs on the loop waited off the CPU, and how many
        # big groups committed in the writer thread since the last probe (_LOOP_COMMIT_MAX_S).
        self._loop_commit_s: deque[float] = deque(maxlen=_LOOP_COMMIT_WINDOW)
        self._big_groups_off_loop = 0
        self._wakeup = asyncio.Event()
        # While the writer waits for a group to fill (commit delay): resolved when allocations
        # from _gather_calls calls, or _gather_allocations allocations, are queued.
        self._gathering: asyncio.Future[None] | None = None
        self._gather_calls = 0
        self._gather_allocations = 0
        self._closing = False
        self._write_loop_task: asyncio.Task[None] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        # Writer thread only: how many COMMITs it has started (the poller tells our commits
        # from other processes' with it) and the write connection's last data_version.
        self._commit_epoch = 0
        self._writer_data_version = 0
        self.changes = ChangeFeed()
        # Group-commit figures (event loop thread), for logs and metrics.
        self.allocations = 0  # allocations decided in committed transactions
        self.turns = 0  # turns written by committed transactions
        self.commits = 0  # transactions committed
        self.dropped = 0  # queued allocations dropped because their caller had given up
        self.last_group_allocations = 0
        self.last_group_turns = 0
        self.last_group_calls = 0  # how many calls the last group's allocations came from
        self.last_commit_seconds = 0.0
        #: Called on the event loop after each commit with (allocations, turns, seconds from
        #: BEGIN IMMEDIATE to the end of COMMIT). Keep it cheap; exceptions are logged.
        self.on_commit: CommitHook | None = None

    @property
    def pending_turns(self) -> int:
        """Turns queued for the writer (the queue depth `max_pending` bounds)."""
        return self._pending_turns

    @property
    def queue_depth(self) -> int:
        """Allocations queued for the writer (the writer_queue_depth metric)."""
        return len(self._pending)

    def wal_bytes(self) -> int:
        """The size of the database's WAL file now (the sqlite_wal_bytes metric). Its writes
        start again from the beginning once a checkpoint has caught up, and the file is cut
        back to WAL_SIZE_LIMIT_BYTES then, so a size above that limit means the WAL has not
        restarted for a while: checkpoints cannot finish (a reader holding an old snapshot,
        another process writing without pause). Any thread may call it (a stat)."""
        if self._memory:
            return 0
        try:
            return os.stat(self.path + "-wal").st_size
        except OSError:  # not created yet, or gone at close
            return 0

    def _full_disk_hint(self) -> str:
        """Why an open failed when the disk is full: SQLite then often reports only a disk I/O
        error (the -shm file cannot grow), which hides the cause."""
        if self._memory:
            return ""
        try:
            free = shutil.disk_usage(Path(self.path).parent).free
        except OSError:
            return ""
        return (
            f" (the disk holding it is full: {free} bytes free)" if free < _FULL_DISK_BYTES else ""
        )

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if not self._memory:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._write_conn = await loop.run_in_executor(self._writer, self._open_writer)
            if self._memory:
                self._read_conn = self._write_conn
            else:
                self._read_conn = await loop.run_in_executor(
                    self._reader, _connect, self.path, self._busy_timeout_s
                )
        except (sqlite3.Error, OSError) as error:
            await self._close_connections()
            raise RuntimeError(
                f"cannot open SQLite database {self.path}: {error}{self._full_disk_hint()}"
            ) from error
        except BaseException:
            await self._close_connections()
            raise
        self._write_loop_task = asyncio.create_task(self._write_loop(), name="sqlite-writer")
        if not self._memory:
            self._poll_task = asyncio.create_task(self._poll_loop(), name="sqlite-changes")

    def _open_writer(self) -> sqlite3.Connection:
        conn = _connect(self.path, self._busy_timeout_s)
        try:
            migrate(conn)
            # Only the writer thread's BEGIN waits for the lock (_begin_waiting): a group on
            # the loop must not, and setting the timeout per group cost two statements each.
            conn.execute("PRAGMA busy_timeout=0")
            if not self._memory:
                conn.execute("PRAGMA wal_autocheckpoint=0")  # the store's own: _checkpoint
            (self._writer_data_version,) = conn.execute("PRAGMA data_version").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wakeup.set()
        if self._write_loop_task is not None:
            await self._write_loop_task
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        await self._close_connections()
        self.changes.close()
        log.info(
            "sqlite store closed: %d allocations in %d commits", self.allocations, self.commits
        )

    async def _close_connections(self) -> None:
        loop = asyncio.get_running_loop()
        if self._checkpointer is not None:
            # Let a checkpoint in flight finish; closing the last connection checkpoints anyway.
            await loop.run_in_executor(None, self._checkpointer.shutdown)
            if self._checkpoint_conn is not None:
                self._checkpoint_conn.close()
            self._checkpoint_conn = None
        if self._poller is not None:
            # Let a reading in flight finish (it may open the poller's connection) first.
            await loop.run_in_executor(None, self._poller.shutdown)
            if self._poll_conn is not None:
                self._poll_conn.close()
        for conn, executor in ((self._read_conn, self._reader), (self._write_conn, self._writer)):
            if conn is not None:
                await loop.run_in_executor(executor, conn.close)
        self._poll_conn = self._read_conn = self._write_conn = None
        self._writer.shutdown()
        self._reader.shutdown()

    # --- writes: group commit -------------------------------------------------------------

    async def allocate(self, allocation: Allocation) -> Sequence[Turn]:
        call = self._commit_alone(allocation) if self._idle_for(allocation) else None
        if call is None:
            call = _Call(1)
            self._enqueue(allocation, call, 0)
            await call.future
        return _turns_or_raise(call.results[0])

    def _commit_alone(self, allocation: Allocation) -> _Call | None:
        """Commit a lone allocation right here, in its caller's coroutine, without the queue's
        two hops through the event loop (waking the writer, then the caller back; measured at
        _ALONE_IDLE_S). Callers arriving meanwhile queue for the writer. None when another
        connection holds the write lock: the writer thread waits for it instead."""
        opened = self._open_group([allocation], on_loop=True)
        outcome = self._finish_group(opened, on_loop=True) if isinstance(opened, _Open) else None
        if outcome is None:
            return None
        self._went_idle()
        call = _Call(1)
        self._finish([(allocation, call, 0, True)], outcome)  # counted, published, checkpointed
        return call

    def _idle_for(self, allocation: Allocation) -> bool:
        """Whether `allocation` is a lone one, for a writer with nothing to do: nothing queued
        or being written, idle for _ALONE_IDLE_S, and groups too small for the commit delay
        (so that under load allocations keep joining groups)."""
        return (
            not self._writing
            and not self._pending
            and self.last_group_calls < _COMMIT_SIBLINGS
            and not self._memory
            and not self._closing
            and self._write_loop_task is not None
            and allocation.count <= _ALONE_MAX_TURNS
            and self._loop_was_idle()
        )

    def _went_idle(self) -> None:
        """On the loop, after a commit: when (and at what loop CPU time) the writer went idle."""
        self._writer_idle_since = time.monotonic()
        self._writer_idle_cpu = time.thread_time()

    def _loop_was_idle(self) -> bool:
        """Whether the writer has been idle for _ALONE_IDLE_S, and the event loop mostly idle
        meanwhile (see _ALONE_BUSY_MAX)."""
        idle = time.monotonic() - self._writer_idle_since
        if idle < _ALONE_IDLE_S:
            return False
        return time.thread_time() - self._writer_idle_cpu <= idle * _ALONE_BUSY_MAX

    async def allocate_many(
        self, allocations: Sequence[Allocation]
    ) -> list[Sequence[Turn] | Exception]:
        if not allocations:
            return []
        call = _Call(len(allocations))
        opens_call = True
        for index, allocation in enumerate(allocations):
            try:
                self._enqueue(allocation, call, index, opens_call)
            except TurnIdError as refused:  # closing, not open, or the queue is full
                call.settle(index, refused)
                continue
            opens_call = False
        await call.future
        # Each allocation's turns or its Exception (a BaseException is raised).
        return [r if isinstance(r, Exception) else _turns_or_raise(r) for r in call.results]

    def _enqueue(
        self, allocation: Allocation, call: _Call, index: int, opens_call: bool = True
    ) -> None:
        """Queue an allocation for the writer, which settles it in `call` (at `index`) once
        committed. `opens_call`: the first allocation of its call in the queue."""
        if self._closing or self._write_loop_task is None:
            raise store_unavailable("store is closing" if self._closing else "store is not open")
        if self._pending and self._pending_turns + allocation.count > self._max_pending:
            raise overloaded(self._pending_turns)
        if not self._pending:
            self._first_arrival = time.monotonic()
        self._pending.append((allocation, call, index, opens_call))
        self._pending_turns += allocation.count
        self._pending_calls += opens_call
        gathering = self._gathering
        if gathering is not None and (
            self._pending_calls >= self._gather_calls
            or len(self._pending) >= self._gather_allocations
        ):
            self._gathering = None
            if not gathering.done():  # the delay may have run out already
                gathering.set_result(None)
        self._wakeup.set()

    def _take_group(self) -> list[_Pending]:
        """The next group: queued allocations whose callers still wait, up to the turn bound
        (always at least one)."""
        pending = self._pending
        group: list[_Pending] = []
        turns = 0
        while pending:
            entry = pending[0]
            allocation, call, index, opens_call = entry
            abandoned = call.abandoned
            if not abandoned and group and turns + allocation.count > _MAX_GROUP_TURNS:
                if not opens_call:  # the rest of a call that began in this group
                    pending[0] = (allocation, call, index, True)
                    self._pending_calls += 1
                break
            pending.popleft()
            self._pending_turns -= allocation.count
            self._pending_calls -= opens_call
            if abandoned:  # the caller gave up (deadline, cancelled): write nothing
                self.dropped += 1
                continue
            group.append(entry)
            turns += allocation.count
        return group

    async def _write_loop(self) -> None:
        while True:
            self._writing = False
            await self._wakeup.wait()
            self._wakeup.clear()
            self._writing = True
            while True:
                if self._wal_behind:
                    await self._catch_up()
                if not self._pending:
                    break
                if (
                    self.last_group_calls >= _COMMIT_SIBLINGS
                    and self._pending_calls < self.last_group_calls
                    and len(self._pending) < self.last_group_allocations
                ):
                    # Calls are arriving faster than commits finish, and fewer are queued
                    # than joined the last group (in calls and in allocations): let more join
                    # this one, so that one fsync serves them all (cf. PostgreSQL's
                    # commit_delay), until as many are queued as joined the last group, or for
                    # _COMMIT_DELAY_S at most.
                    await self._gather(self.last_group_calls, self.last_group_allocations)
                group = self._take_group()
                if not group:
                    continue
                allocations = [entry[0] for entry in group]
                try:
                    outcome = None
                    if not self._memory and sum(a.count for a in allocations) <= _LOOP_MAX_TURNS:
                        # The group's statements on the loop (see _LOOP_MAX_TURNS), its
                        # COMMIT too if it is big or lone (see _LOOP_COMMIT_MIN).
                        opened = self._open_group(allocations, on_loop=True)
                        if isinstance(opened, _Open):
                            if self._commits_on_loop(allocations):
                                outcome = self._finish_group(opened, on_loop=True)
                            else:
                                outcome = await self._writer.call(self._finish_group, opened)
                    if outcome is None:
                        outcome = await self._writer.call(self._commit_group, allocations)
                        assert outcome is not None  # the writer thread waits for the lock
                except Exception as error:  # a bug must fail these calls, not stall the store
                    log.exception("sqlite writer failed")
                    outcome = _Outcome([error] * len(group))
                self._went_idle()
                self._finish(group, outcome)
            if self._closing:
                return

    def _commits_on_loop(self, group: Sequence[Allocation]) -> bool:
        """Whether a group opened on the loop commits there too (see _LOOP_COMMIT_MIN)."""
        if len(group) >= _LOOP_COMMIT_MIN:
            took = self._loop_commit_s
            quick = len(took) < _LOOP_COMMIT_WINDOW  # nothing known yet
            if quick or min(took) <= _LOOP_COMMIT_MAX_S:
                return True
            self._big_groups_off_loop += 1
            return self._big_groups_off_loop % _LOOP_COMMIT_PROBE == 0
        return (
            len(group) == 1
            and group[0].count <= _ALONE_MAX_TURNS
            and self._first_arrival - self._writer_idle_since >= _ALONE_IDLE_S
        )

    async def _gather(self, calls: int, allocations: int) -> None:
        loop = asyncio.get_running_loop()
        gathering = self._gathering = loop.create_future()
        self._gather_calls, self._gather_allocations = calls, allocations
        timer = loop.call_later(_COMMIT_DELAY_S, _settle, gathering, None, None)
        try:
            await gathering
        finally:
            timer.cancel()
            self._gathering = None

    def _finish(self, group: list[_Pending], outcome: _Outcome) -> None:
        """On the event loop: settle the decided allocations, requeue the rest at the head,
        publish the changed threads, count and report the commits."""
        decided = len(outcome.results)
        for (_, call, index, _), result in zip(group, outcome.results, strict=False):
            call.settle(index, result)  # not when the caller gave up meanwhile; the write stands
        rest = group[decided:]
        if rest:  # the group ran out of time under the lock: they go first next time
            allocation, call, index, _ = rest[0]
            rest[0] = (allocation, call, index, True)  # maybe the rest of a call: now its own
            pending = self._pending
            if pending and pending[0][1] is rest[-1][1] and pending[0][3]:
                # The turn bound had cut the same call off after this group: its two pieces
                # meet again, one call.
                allocation, call, index, _ = pending[0]
                pending[0] = (allocation, call, index, False)
                self._pending_calls -= 1
            pending.extendleft(reversed(rest))
            self._pending_turns += sum(entry[0].count for entry in rest)
            self._pending_calls += sum(entry[3] for entry in rest)
        self.last_group_calls = sum(entry[3] for entry in group[:decided])
        for key in outcome.changed:
            self.changes.publish(key)
        for allocations, turns, seconds in outcome.commits:
            self.commits += 1
            self.allocations += allocations
            self.turns += turns
            self.last_group_allocations = allocations
            self.last_group_turns = turns
            self.last_commit_seconds = seconds
            hook = self.on_commit
            if hook is not None:
                try:
                    hook(allocations, turns, seconds)
                except Exception:
                    log.exception("on_commit hook failed")
        if not outcome.commits:
            self.last_group_allocations = decided
        elif not self._memory:
            self._schedule_checkpoint()

    # --- checkpoints: off the commit path ---------------------------------------------------

    def _schedule_checkpoint(self) -> None:
        """On the loop, after a commit: a checkpoint once _CHECKPOINT_INTERVAL_S has passed
        since the last one started (unless one is scheduled or running already)."""
        if self._checkpoint_pending or self._closing:
            return
        self._checkpoint_pending = True
        delay = self._checkpoint_started + _CHECKPOINT_INTERVAL_S - time.monotonic()
        asyncio.get_running_loop().call_later(max(0.0, delay), self._start_checkpoint)

    def _start_checkpoint(self) -> None:
        if self._closing:
            self._checkpoint_pending = False
            return
        if self._checkpointer is None:
            self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="turnid-sqlite-ckpt")
        self._checkpoint_started = time.monotonic()
        self._checkpoint_commits = self.commits
        try:
            running = asyncio.get_running_loop().run_in_executor(
                self._checkpointer, self._checkpoint
            )
        except RuntimeError:  # shut down by close() meanwhile
            self._checkpoint_pending = False
            return
        running.add_done_callback(self._checkpoint_done)

    def _checkpoint(self) -> tuple[int, int, int]:
        """In the checkpoint thread: a PASSIVE checkpoint on its own connection."""
        if self._checkpoint_conn is None:
            self._checkpoint_conn = _connect(self.path, self._busy_timeout_s)
        busy, frames, done = self._checkpoint_conn.execute(
            "PRAGMA wal_checkpoint(PASSIVE)"
        ).fetchone()
        return int(busy), int(frames), int(done)

    def _checkpoint_done(self, running: asyncio.Future[tuple[int, int, int]]) -> None:
        self._checkpoint_pending = False
        if running.cancelled():
            return
        error = running.exception()
        if error is not None:
            # The WAL only grows until the next one works; commits go on meanwhile.
            log.warning("sqlite checkpoint failed: %s", error)
        else:
            hook = self.on_checkpoint
            if hook is not None:
                try:
                    hook(running.result())
                except Exception:
                    log.exception("on_checkpoint hook failed")
        if self.commits != self._checkpoint_commits:  # commits came meanwhile
            # Their frames are past what the pass took, so the WAL cannot restart until the
            # write loop takes them (it wakes for it even when nothing is queued: lone
            # allocations commit without it).
            self._wal_behind = True
            self._wakeup.set()
            self._schedule_checkpoint()

    async def _catch_up(self) -> None:
        """In the write loop, between groups: checkpoint what the last pass left behind, on the
        write connection (see the module's docstring)."""
        self._wal_behind = False
        try:
            await self._writer.call(self._checkpoint_writer)
        except sqlite3.Error as error:
            log.warning("sqlite catch-up checkpoint failed: %s", error)  # the next pass retries
            return
        self.catch_ups += 1

    def _checkpoint_writer(self) -> None:
        """In the writer thread, with no transaction open: a PASSIVE checkpoint."""
        conn = self._write_conn
        if conn is not None:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def _commit_group(self, group: Sequence[Allocation], on_loop: bool = False) -> _Outcome | None:
        """In the writer thread: decide and commit (a prefix of) `group` in one transaction.

        Returns a result (turns or an exception) for each allocation decided, in order; the
        ones after them did not fit in the group's time and were not looked at. `on_loop`:
        called on the event loop, which must not wait for the write lock: None (nothing done)
        when another connection holds it, or when anything failed (the writer thread then
        does it all again, and handles the failure).
        """
        opened = self._open_group(group, on_loop)
        if not isinstance(opened, _Open):
            return opened
        return self._finish_group(opened)

    def _open_group(self, group: Sequence[Allocation], on_loop: bool) -> _Open | _Outcome | None:
        """Begin the transaction, decide (a prefix of) `group` and write its rows: all of the
        group's work but the COMMIT (see `_commit_group`)."""
        conn = self._write_conn
        assert conn is not None
        outcome = _Outcome()
        results = outcome.results
        # One cursor for the whole group: Connection.execute would make one per statement.
        cursor = conn.cursor()
        started = time.monotonic()
        taken = len(group)  # how many this transaction covers: all, unless time runs out
        try:
            if on_loop:
                if not self._begin_at_once(cursor):
                    return None
            else:
                self._begin_waiting(cursor)
            deadline = time.monotonic() + _MAX_GROUP_S
            batch = _Batch(cursor)
            batch.prefetch(group)
            now_us = time.time_ns() // 1000
            for index, allocation in enumerate(group):
                try:
                    results.append(self._apply(batch, allocation, now_us))
                except TurnIdError as error:
                    # _apply refuses before it has queued anything, so its neighbours go on.
                    results.append(error)
                if time.monotonic() >= deadline:
                    taken = index + 1
                    break
            batch.write()
        except BaseException as error:
            if on_loop:
                _rollback(conn)
                if not isinstance(error, Exception):
                    raise
                return None
            return self._failed(error, group[:taken])
        return _Open(group[:taken], cursor, batch, outcome, started)

    def _finish_group(self, opened: _Open, on_loop: bool = False) -> _Outcome | None:
        """COMMIT a group's transaction that `_open_group` left open (in the writer thread,
        or on the loop: see _LOOP_COMMIT_MIN). None only `on_loop`, when the failure needs
        work that must not block the loop (`_failed`): the writer thread redoes the group."""
        try:
            self._commit_epoch += 1  # before COMMIT: the poller must not take it for theirs
            committing = time.monotonic()
            committing_cpu = time.thread_time() if on_loop else 0.0
            opened.cursor.execute("COMMIT")
        except BaseException as error:
            return self._failed(error, opened.decided, on_loop)
        done = time.monotonic()
        if on_loop and len(opened.decided) >= _LOOP_COMMIT_MIN:
            # What the loop waited for: the COMMIT's time off the CPU, mostly the disk (also
            # any wait for the GIL or for a CPU); its own work, writing the group's WAL frames,
            # grows with the group and is no sign of a slow disk.
            off_cpu = (done - committing) - (time.thread_time() - committing_cpu)
            self._loop_commit_s.append(off_cpu)
        outcome, batch = opened.outcome, opened.batch
        seconds = done - opened.started
        outcome.changed.update(batch.changed())
        outcome.commits.append((len(outcome.results), batch.turn_count, seconds))
        return outcome

    def _failed(
        self, error: BaseException, decided: Sequence[Allocation], on_loop: bool = False
    ) -> _Outcome | None:
        """After a failure inside a group's transaction: roll back, and the group's results
        (None `on_loop` when they need the allocations committed one by one, which waits for
        the write lock: the writer thread must do that)."""
        conn = self._write_conn
        assert conn is not None
        # Never leave the transaction (and the file's write lock) open behind a failure.
        _rollback(conn)
        if not isinstance(error, Exception):
            raise error
        if isinstance(error, sqlite3.IntegrityError) and len(decided) > 1:
            if on_loop:
                return None
            # A write broke a constraint that decide() did not foresee (none is known).
            # The group's writes went out together, so the culprit is unknown: commit
            # each allocation alone, and only the culprit fails.
            log.warning("group commit: %s; retrying its %d allocations alone", error, len(decided))
            retried = _Outcome()
            for one in decided:
                single = self._commit_group([one])
                assert single is not None
                retried.results += single.results
                retried.changed |= single.changed
                retried.commits += single.commits
            return retried
        mapped = storage_error(error) if isinstance(error, sqlite3.Error) else None
        if mapped is None:
            log.exception(
                "group commit failed; rolled back %d allocations", len(decided), exc_info=error
            )
        return _Outcome([mapped or error] * len(decided))

    def _begin_at_once(self, cursor: sqlite3.Cursor) -> bool:
        """BEGIN IMMEDIATE without waiting (the write connection's busy_timeout is 0): False
        when another connection holds the lock."""
        try:
            cursor.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorname", "").startswith("SQLITE_BUSY"):
                return False
            raise
        return True

    def _begin_waiting(self, cursor: sqlite3.Cursor) -> None:
        """In the writer thread: BEGIN IMMEDIATE, waiting up to busy_timeout for the lock."""
        cursor.execute(f"PRAGMA busy_timeout={round(self._busy_timeout_s * 1000)}")
        try:
            cursor.execute("BEGIN IMMEDIATE")
        finally:
            cursor.execute("PRAGMA busy_timeout=0")

    def _apply(self, batch: _Batch, allocation: Allocation, now_us: int) -> Sequence[Turn]:
        """Decide one allocation of the group: its turns, or a refusal (TurnIdError).

        Reads only; what to write is kept on `batch`, which writes the group before COMMIT.
        """
        cursor = batch.cursor
        namespace, thread_id = allocation.namespace, allocation.thread_id
        request_id = allocation.request_id
        thread = batch.threads[(namespace, thread_id)]
        seen = None
        if request_id:
            seen = thread.requests.get(request_id)  # recorded earlier in this group
            if seen is None:
                seen = batch.seen[(namespace, thread_id, request_id)]

        def is_taken(turn_id: str) -> bool:
            return (
                turn_id in thread.ids
                or cursor.execute(
                    "SELECT 1 FROM turns WHERE namespace = ? AND thread_id = ? AND turn_id = ?",
                    (namespace, thread_id, turn_id),
                ).fetchone()
                is not None
            )

        decision = decide(allocation, thread.state, seen, is_taken, now_us)
        if isinstance(decision, Replay):
            start = decision.first_sequence - thread.first_new
            if start >= 0:  # recorded earlier in this group (rare: a retry within one group)
                granted = [turn for grant in thread.grants for turn in grant]
                return Replayed(granted[start : start + decision.count])
            return Replayed(
                _read_range(
                    cursor, namespace, thread_id, decision.first_sequence - 1, decision.count
                )
            )
        thread.state = decision.state
        thread.grants.append(decision.turns)
        thread.ids.update(decision.turns.turn_ids)
        if decision.record is not None:
            thread.requests[request_id] = decision.record
        return decision.turns

    # --- watch: other processes' commits ---------------------------------------------------

    async def _poll_loop(self) -> None:
        """One per store: while anyone watches, wake every watcher when another connection
        (another process, or another store on the file) has committed."""
        loop = asyncio.get_running_loop()
        polling = False
        last_version = last_epoch = 0
        while True:
            await asyncio.sleep(_POLL_S)
            if self.changes.watchers == 0:
                polling = False
                continue
            try:
                version = await loop.run_in_executor(self._poll_executor(), self._data_version)
                # Read after data_version: a COMMIT of ours that it saw had bumped the epoch.
                epoch = self._commit_epoch
                if not polling:
                    # A commit between a watcher's subscription and this first reading would
                    # go unseen: wake them once, they re-read.
                    polling = True
                    self.changes.publish_all()
                elif version != last_version and (
                    # Only ours could have changed it if COMMITs started since the last
                    # reading; then the write connection says exactly if anyone else did.
                    epoch == last_epoch or await self._writer.call(self._foreign_commits)
                ):
                    self.changes.publish_all()
                last_version, last_epoch = version, epoch
            except (sqlite3.Error, RuntimeError) as error:
                # RuntimeError: an executor shut down by close(). Watchers re-read anyway.
                log.warning("sqlite change poller: %s", error)
                polling = False

    def _poll_executor(self) -> ThreadPoolExecutor:
        if self._poller is None:
            self._poller = ThreadPoolExecutor(1, thread_name_prefix="turnid-sqlite-changes")
        return self._poller

    def _data_version(self) -> int:
        """In the poller thread: PRAGMA data_version on the poller's own connection."""
        if self._poll_conn is None:
            self._poll_conn = _connect(self.path, self._busy_timeout_s)
        (version,) = self._poll_conn.execute("PRAGMA data_version").fetchone()
        return int(version)

    def _foreign_commits(self) -> bool:
        """In the writer thread: whether another connection committed since the last call
        (data_version on a connection changes only with other connections' commits)."""
        conn = self._write_conn
        if conn is None:
            return True
        (version,) = conn.execute("PRAGMA data_version").fetchone()
        changed: bool = version != self._writer_data_version
        self._writer_data_version = version
        return changed

    # --- reads: WAL readers never wait for the writer -------------------------------------

    async def _read(self, query: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._read_conn
        if conn is None or self._closing:
            raise store_unavailable("store is closed")

        def run() -> _T:
            try:
                return query(conn)
            except sqlite3.Error as error:
                mapped = storage_error(error)
                if mapped is None:
                    raise
                raise mapped from error

        return await asyncio.get_running_loop().run_in_executor(self._reader, run)

    async def get(self, namespace: str, thread_id: str, turn_id: str) -> Turn | None:
        def query(conn: sqlite3.Connection) -> Turn | None:
            row = conn.execute(
                f"SELECT {_TURN_COLUMNS} FROM turns "
                "WHERE namespace = ? AND thread_id = ? AND turn_id = ?",
                (namespace, thread_id, turn_id),
            ).fetchone()
            return _turn(row) if row else None

        return await self._read(query)

    async def list(
        self, namespace: str, thread_id: str, after_sequence: int, limit: int
    ) -> list[Turn]:
        return await self._read(
            lambda conn: _read_range(conn, namespace, thread_id, after_sequence, limit)
        )

    async def get_thread(self, namespace: str, thread_id: str) -> ThreadInfo | None:
        def query(conn: sqlite3.Connection) -> ThreadInfo | None:
            # One statement, so one snapshot: the thread's row and its last turn agree.
            row = conn.execute(_THREAD_INFO, (namespace, thread_id)).fetchone()
            if row is None:
                return None
            return ThreadInfo(thread_id, _state(row[:6]), _turn(row[6:]))

        return await self._read(query)


def _read_range(
    conn: sqlite3.Connection | sqlite3.Cursor,
    namespace: str,
    thread_id: str,
    after_sequence: int,
    limit: int,
) -> list[Turn]:
    rows = conn.execute(
        f"SELECT {_TURN_COLUMNS} FROM turns WHERE namespace = ? AND thread_id = ? "
        "AND sequence > ? ORDER BY sequence LIMIT ?",
        (namespace, thread_id, after_sequence, limit),
    ).fetchall()
    return [_turn(row) for row in rows]
