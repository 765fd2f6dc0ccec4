"""Many replicas, one truth: three `turnid serve` processes on one PostgreSQL database.

16 concurrent grpc.aio clients allocate mixed kinds into the same 4 threads, spreading their
calls over the three replicas; every allocation carries a request_id. Afterwards, per thread:
no duplicate turn ids, `sequence` 1..n without gaps, `auto-compact-N` 0..k-1 in sequence order,
and each logical allocation ended with exactly one turn, the one its client was given. Some
request_ids are replayed against a different replica and must return the original turn.

The second test restarts PostgreSQL in the middle of the load (which goes on until the server is
back): at least one call must fail, every failed call must be UNAVAILABLE / STORE_UNAVAILABLE, is
retried with the same request_id until it succeeds, and the invariants above still hold.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import grpc
import psycopg
import pytest

from turnid.service.domain import Allocation, TurnKind, TurnService, WatchUpdate
from turnid.service.stores.postgres import PostgresStore, migrations
from turnid.v1 import turnid_pb2 as pb
from turnid.v1 import turnid_pb2_grpc as pb_grpc

from ..e2e.serve_process import ServeProcess
from ..grpc_helpers import error_details
from .conftest import POSTGRES_DSN

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

KINDS = (
    pb.TURN_KIND_REALTIME_DELEGATION,
    pb.TURN_KIND_AUTO_COMPACTION,
    pb.TURN_KIND_USER_INPUT,
    pb.TURN_KIND_AUTO_COMPACTION,
)
THREADS = 4
CLIENTS = 16
ALLOCATIONS = int(os.environ.get("TURNID_TEST_PG_ALLOCATIONS", "20000"))
RESTART_ALLOCATIONS = int(os.environ.get("TURNID_TEST_PG_RESTART_ALLOCATIONS", "6000"))
REPLAY_EVERY = 50  # every 50th request_id is replayed against another replica
CALL_TIMEOUT_S = 60.0
# Each channel gets its own connection, as separate client processes would.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Load:
    """The plan (allocation k: which thread, kind and request_id) and what came of it."""

    thread_ids: Sequence[str]
    total: int
    milestone: int = 0  # `reached` is set once this many allocations have succeeded
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    # If given, the load goes on past `total` (which grows) until this is set.
    until: asyncio.Event | None = None
    results: dict[int, pb.Turn] = field(default_factory=dict)
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)  # (code, reason)
    replays: int = 0
    _next: int = 0

    def take(self) -> int | None:
        if self._next >= self.total:
            if self.until is None or self.until.is_set():
                return None
            self.total += 1
        self._next += 1
        return self._next - 1

    def request(self, k: int) -> pb.AllocateTurnIdRequest:
        return pb.AllocateTurnIdRequest(
            thread_id=self.thread_ids[k % len(self.thread_ids)],
            kind=KINDS[(k // len(self.thread_ids)) % len(KINDS)],
            request_id=f"alloc-{k}",
        )

    def record(self, k: int, turn: pb.Turn) -> None:
        self.results[k] = turn
        if self.milestone and len(self.results) >= self.milestone:
            self.reached.set()


async def call_until_ok(
    load: Load,
    stubs: Sequence[pb_grpc.TurnIdServiceStub],
    replica: int,
    request: pb.AllocateTurnIdRequest,
) -> tuple[pb.Turn, int]:
    """Call, retrying UNAVAILABLE with the same request_id on the next replica; any other
    failure ends the test. Returns the turn and the replica that answered."""
    while True:
        try:
            response = await stubs[replica].AllocateTurnId(request, timeout=CALL_TIMEOUT_S)
            return response.turn, replica
        except grpc.aio.AioRpcError as error:
            code, info, _ = error_details(error)
            load.failures[(code.name, info.reason)] += 1
            if code is not grpc.StatusCode.UNAVAILABLE:
                raise
            replica = (replica + 1) % len(stubs)


async def client(load: Load, index: int, targets: Sequence[str]) -> None:
    channels = [grpc.aio.insecure_channel(t, options=CHANNEL_OPTIONS) for t in targets]
    try:
        stubs = [pb_grpc.TurnIdServiceStub(channel) for channel in channels]
        while (k := load.take()) is not None:
            request = load.request(k)
            turn, replica = await call_until_ok(load, stubs, (index + k) % len(stubs), request)
            load.record(k, turn)
            if k % REPLAY_EVERY == 0:
                other = (replica + 1) % len(stubs)
                again, answered = await call_until_ok(load, stubs, other, request)
                assert again == turn, f"request_id {request.request_id} on replica {answered}"
                load.replays += 1
    finally:
        for channel in channels:
            await channel.close()


async def run_load(load: Load, targets: Sequence[str]) -> float:
    started = time.monotonic()
    async with asyncio.TaskGroup() as clients:
        for index in range(CLIENTS):
            clients.create_task(client(load, index, targets))
    return time.monotonic() - started


async def list_all(stub: pb_grpc.TurnIdServiceStub, thread_id: str) -> list[pb.Turn]:
    turns: list[pb.Turn] = []
    token = ""
    while True:
        page = await stub.ListTurns(
            pb.ListTurnsRequest(thread_id=thread_id, page_size=1000, page_token=token),
            timeout=CALL_TIMEOUT_S,
        )
        turns.extend(page.turns)
        token = page.next_page_token
        if not token:
            return turns


async def assert_invariants(load: Load, target: str) -> None:
    assert len(load.results) == load.total
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TurnIdServiceStub(channel)
        stored = 0
        for thread_id in load.thread_ids:
            turns = await list_all(stub, thread_id)
            stored += len(turns)
            assert [t.sequence for t in turns] == list(range(1, len(turns) + 1))
            assert len({t.turn_id for t in turns}) == len(turns), "duplicate turn ids"
            compactions = [t.turn_id for t in turns if t.kind == pb.TURN_KIND_AUTO_COMPACTION]
            assert compactions == [f"auto-compact-{n}" for n in range(len(compactions))]
            # Each logical allocation ended with exactly one turn: the one its client got.
            given = {
                turn.request_id: turn
                for turn in load.results.values()
                if turn.thread_id == thread_id
            }
            assert {t.request_id: t for t in turns} == given
            assert len(turns) == len(given)
        assert stored == load.total


def new_load(total: int, milestone: int = 0) -> Load:
    run = uuid.uuid4().hex[:8]
    return Load([f"pg-{run}-{i}" for i in range(THREADS)], total, milestone)


async def test_three_replicas_sixteen_clients_four_threads(
    replicas: list[ServeProcess], database_url: str
) -> None:
    targets = [server.target for server in replicas]
    load = new_load(ALLOCATIONS)
    elapsed = await run_load(load, targets)
    print(
        f"\n{load.total} allocations + {load.replays} cross-replica replays by {CLIENTS} "
        f"clients on {len(targets)} replicas in {elapsed:.1f} s "
        f"({(load.total + load.replays) / elapsed:.0f} calls/s)"
    )
    assert not load.failures
    assert load.replays == len(range(0, load.total, REPLAY_EVERY))
    await assert_invariants(load, targets[0])
    # The three replicas raced to migrate the empty database: it was migrated exactly once.
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT version, name FROM turnid_schema_migrations ORDER BY version"
        )
        assert await cursor.fetchall() == [(m.version, m.name) for m in migrations()]


# --- PostgreSQL restarted mid-load ---------------------------------------------------------


def _cluster() -> tuple[str, str] | None:
    """(version, name) of the local cluster serving the DSN's port, if pg_ctlcluster can
    control it."""
    if not (POSTGRES_DSN and shutil.which("pg_ctlcluster") and shutil.which("pg_lsclusters")):
        return None
    port = str(urlsplit(POSTGRES_DSN).port or 5432)
    listing = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=False
    )
    for line in listing.stdout.splitlines():
        columns = line.split()
        if len(columns) >= 3 and columns[2] == port:
            return columns[0], columns[1]
    return None


def _pg_isready(timeout_s: int) -> bool:
    """Waits (pg_isready polls by itself) up to timeout_s for the server to accept connections."""
    parts = urlsplit(POSTGRES_DSN or "")
    command = ["pg_isready", "-q", "-t", str(timeout_s), "-h", parts.hostname or "127.0.0.1"]
    command += ["-p", str(parts.port or 5432)]
    return subprocess.run(command, check=False).returncode == 0


def _pg_ctlcluster(cluster: tuple[str, str], action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, action],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _ensure_running(cluster: tuple[str, str]) -> None:
    if not _pg_isready(5):
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "start"],
            check=False,
            timeout=120,
        )
    assert _pg_isready(60), "PostgreSQL did not come back"


def _restartable_cluster() -> tuple[str, str]:
    # The restart also cuts off anything else using that server at the time (another test run
    # on a shared machine): TURNID_TEST_POSTGRES_RESTART=0 skips these tests there.
    if os.environ.get("TURNID_TEST_POSTGRES_RESTART", "1") == "0":
        pytest.skip("TURNID_TEST_POSTGRES_RESTART=0")
    cluster = _cluster()
    if cluster is None:
        pytest.skip("no local pg_ctlcluster cluster serves TURNID_TEST_POSTGRES_DSN's port")
    return cluster


async def test_postgres_restart_mid_load(replicas: list[ServeProcess]) -> None:
    cluster = _restartable_cluster()
    targets = [server.target for server in replicas]
    load = new_load(RESTART_ALLOCATIONS, milestone=RESTART_ALLOCATIONS // 3)
    # The load lasts until PostgreSQL is back, so the whole outage happens under load.
    load.until = back = asyncio.Event()
    done_before_restart = 0

    async def restart() -> None:
        nonlocal done_before_restart
        await load.reached.wait()
        done_before_restart = len(load.results)
        try:
            await asyncio.to_thread(_pg_ctlcluster, cluster, "restart")
            assert await asyncio.to_thread(_pg_isready, 60)
        finally:
            back.set()

    try:
        started = time.monotonic()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(restart())
            tasks.create_task(run_load(load, targets))
        elapsed = time.monotonic() - started
    finally:
        await asyncio.to_thread(_ensure_running, cluster)
    print(
        f"\n{load.total} allocations + {load.replays} replays in {elapsed:.1f} s; PostgreSQL "
        f"restarted after {done_before_restart}; failed calls (then retried): "
        f"{dict(load.failures)}"
    )
    assert set(load.failures) <= {("UNAVAILABLE", "STORE_UNAVAILABLE")}
    for server in replicas:  # every fault was an expected one
        assert not [line for line in server.log if "Traceback" in line or " ERROR " in line]
    if os.environ.get("TURNID_TEST_PG_SHOW_LOGS"):
        print("".join(line for server in replicas for line in server.log))
    # The restart must have hit the replicas under load, or this test has checked nothing:
    # calls that failed (and were retried), or replicas that saw their connections die (the
    # store repeats an attempt whose connection died before its commit, so calls may all pass).
    noticed = [line for server in replicas for line in server.log if "connection lost" in line]
    assert load.failures[("UNAVAILABLE", "STORE_UNAVAILABLE")] > 0 or noticed, (
        "neither a failed call nor a lost connection: the restart did not hit the load"
    )
    await assert_invariants(load, targets[1])
    # Every replica serves again, on the recovered pool.
    for target in targets:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.TurnIdServiceStub(channel)
            turn = (
                await stub.AllocateTurnId(
                    pb.AllocateTurnIdRequest(
                        thread_id=load.thread_ids[0],
                        kind=pb.TURN_KIND_AUTO_COMPACTION,
                        request_id=f"after-{target}",
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
            ).turn
            assert turn.sequence > load.total // THREADS


async def test_every_pooled_connection_is_replaced_after_a_restart(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After PostgreSQL restarts, every dead pooled connection is found and replaced before it
    is used (allocations without a request_id, which the store cannot repeat if a commit may
    have happened, all go through), and the listener reconnects (a watcher on one store sees
    another's allocation by NOTIFY alone)."""
    cluster = _restartable_cluster()
    size = 4
    stores = [PostgresStore(database_url, pool_min=size, pool_max=size) for _ in range(2)]
    for store in stores:
        await store.open()
    watching, writing = stores[0], stores[1]
    watching.changes.fallback_interval = None  # only a notification can wake the watcher
    thread_ids = [f"restart-{uuid.uuid4()}" for _ in range(size)]
    # Watched throughout, so the store listens before the restart and must listen again
    # after it (a store nobody watches holds no LISTEN connection).
    held = await TurnService(watching).watch(f"restart-held-{uuid.uuid4()}", 0)
    try:
        assert await anext(held) == WatchUpdate([], True)
        async with asyncio.timeout(30):
            await watching.listening.wait()
        for store in stores:
            await store.allocate(Allocation(thread_ids[0], TurnKind.USER_INPUT, 1))
        try:
            await asyncio.to_thread(_pg_ctlcluster, cluster, "restart")
            assert await asyncio.to_thread(_pg_isready, 60)
        finally:
            await asyncio.to_thread(_ensure_running, cluster)
        caplog.clear()
        caplog.set_level(logging.INFO, logger="turnid.postgres")
        for _ in range(3):  # more rounds than the pool has connections to lose
            for store in stores:
                # One allocation per pooled connection at once, each in its own thread.
                await asyncio.gather(
                    *(
                        store.allocate(Allocation(thread_id, TurnKind.USER_INPUT, 1))
                        for thread_id in thread_ids
                    )
                )
        # Found dead when taken from the pool, not by failing an attempt.
        assert not [r for r in caplog.records if "attempt" in r.getMessage()]
        watch = await TurnService(watching).watch(thread_ids[1], 6)
        try:
            async with asyncio.timeout(30):
                assert await anext(watch) == WatchUpdate([], True)
                # A turn of its own store first: the watch delivers it and then waits for a
                # wake-up, which only the listener (reconnected since the restart) can give.
                own = await watching.allocate(Allocation(thread_ids[1], TurnKind.USER_INPUT, 1))
                assert await anext(watch) == WatchUpdate(own, True)
                turns = await writing.allocate(Allocation(thread_ids[1], TurnKind.USER_INPUT, 1))
                assert await anext(watch) == WatchUpdate(turns, True)
        finally:
            await watch.aclose()
    finally:
        await held.aclose()
        for store in stores:
            await store.close()
