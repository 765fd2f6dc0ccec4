"""/metrics after a known mix of calls: every counter equals the calls made."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import socket
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import pytest

from turnid.service.config import ServerConfig
from turnid.service.metrics import Metrics, WorkersMetrics
from turnid.service.server import TurnIdServer
from turnid.service.servicer import CallRecord
from turnid.v1 import turnid_pb2 as pb
from turnid.v1 import turnid_pb2_grpc as pb_grpc

from ..e2e.serve_process import ServeProcess
from .helpers import scrape, value

REALTIME = pb.TURN_KIND_REALTIME_DELEGATION
COMPACTION = pb.TURN_KIND_AUTO_COMPACTION
USER = pb.TURN_KIND_USER_INPUT
# The servicer reports the request's kind and count (CallRecord.kind / .count) or not yet.
_FIELDS = {field.name for field in dataclasses.fields(CallRecord)}
RECORD_HAS_KIND = "kind" in _FIELDS and "count" in _FIELDS
RECORD_HAS_REPLAYED = "replayed" in _FIELDS
HANDLED = "grpc_server_handled_total"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[TurnIdServer, Metrics]]:
    server = TurnIdServer(
        ServerConfig(listen="127.0.0.1:0", database=f"sqlite://{tmp_path / 'turnid.db'}")
    )
    await server.start()
    metrics = Metrics()
    metrics.bind(server.servicer, server.store)
    metrics.start("127.0.0.1:0")
    try:
        yield server, metrics
    finally:
        metrics.close()
        await server.stop()


async def call_mix(target: str, thread_id: str) -> dict[tuple[str, str], int]:
    """A known mix of calls; returns {(method, Go code name): calls}."""
    made: dict[tuple[str, str], int] = {}

    async def call(method: str, request: object) -> None:
        try:
            await getattr(stub, method)(request, timeout=30)
            code = "OK"
        except grpc.aio.AioRpcError as error:
            code = {
                grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
                grpc.StatusCode.NOT_FOUND: "NotFound",
                grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
            }[error.code()]
        made[(method, code)] = made.get((method, code), 0) + 1

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TurnIdServiceStub(channel)
        for _ in range(3):
            realtime = pb.AllocateTurnIdRequest(thread_id=thread_id, kind=REALTIME)
            await call("AllocateTurnId", realtime)
        for _ in range(2):
            await call(
                "AllocateTurnId", pb.AllocateTurnIdRequest(thread_id=thread_id, kind=COMPACTION)
            )
        await call(
            "BatchAllocateTurnIds",
            pb.BatchAllocateTurnIdsRequest(thread_id=thread_id, kind=USER, count=5),
        )
        keyed = pb.BatchAllocateTurnIdsRequest(
            thread_id=thread_id, kind=USER, count=4, request_id="b"
        )
        await call("BatchAllocateTurnIds", keyed)
        await call("BatchAllocateTurnIds", keyed)  # a retry: the same 4 turns again
        await call(
            "BatchAllocateTurnIds",
            pb.BatchAllocateTurnIdsRequest(thread_id=thread_id, kind=USER, count=0),
        )
        await call("AllocateTurnId", pb.AllocateTurnIdRequest(thread_id="", kind=REALTIME))
        await call("AllocateTurnId", pb.AllocateTurnIdRequest(thread_id=thread_id, kind=0))
        claim = pb.ClaimTurnIdRequest(thread_id=thread_id, turn_id="rollout-1", kind=USER)
        await call("ClaimTurnId", claim)
        await call("ClaimTurnId", claim)  # ALREADY_EXISTS
        await call("GetTurn", pb.GetTurnRequest(thread_id=thread_id, turn_id="rollout-1"))
        await call("GetTurn", pb.GetTurnRequest(thread_id=thread_id, turn_id="nope"))
        await call("GetThread", pb.GetThreadRequest(thread_id=f"{thread_id}-unknown"))
        await call("ListTurns", pb.ListTurnsRequest(thread_id=thread_id))
    return made


async def test_counters_equal_the_calls_made(
    served: tuple[TurnIdServer, Metrics], thread_id: str
) -> None:
    server, metrics = served
    assert metrics.port is not None
    made = await call_mix(server.target, thread_id)
    samples = await scrape(metrics.port)

    handled = {
        (s.labels["grpc_method"], s.labels["grpc_code"]): s.value
        for s in samples
        if s.name == HANDLED and s.value
    }
    assert handled == made
    for (method, code), calls in made.items():
        labels = {"grpc_service": "turnid.v1.TurnIdService", "grpc_type": "unary"}
        assert value(samples, HANDLED, grpc_method=method, grpc_code=code, **labels) == calls
    for method in {method for method, _ in made}:
        assert value(samples, "grpc_server_handling_seconds_count", grpc_method=method) == sum(
            n for (m, _), n in made.items() if m == method
        )
    # Every method x code starts at 0, so rate() and absent-series alerts work from the start.
    assert any(
        s.name == HANDLED and s.labels["grpc_method"] == "WatchTurns" and s.value == 0
        for s in samples
    )

    allocations = "turnid_allocations_total"
    # Turns, not calls: refusals count what they asked for (an invalid count asks for none).
    refused = value(samples, allocations, outcome="refused")
    # two INVALID_ARGUMENT allocations, one ALREADY_EXISTS claim; the count=0 batch asks for
    # nothing (until the servicer reports counts, a batch counts 1)
    assert refused == (2 + 1 if RECORD_HAS_KIND else 2 + 1 + 1)
    assert value(samples, allocations, outcome="claimed") == 1
    if RECORD_HAS_KIND:
        assert value(samples, allocations, kind="realtime_delegation", outcome="allocated") == 3
        assert value(samples, allocations, kind="auto_compaction", outcome="allocated") == 2
        if RECORD_HAS_REPLAYED:
            assert value(samples, allocations, kind="user_input", outcome="allocated") == 5 + 4
            assert value(samples, allocations, kind="user_input", outcome="replayed") == 4
        else:  # a replay counts as allocated until the servicer tells them apart
            assert value(samples, allocations, kind="user_input", outcome="allocated") == 5 + 8
        assert value(samples, allocations, kind="user_input", outcome="claimed") == 1
        assert value(samples, allocations, kind="unspecified", outcome="refused") == 1
    else:  # until the servicer reports kind and count: one turn a call, kind unknown
        assert value(samples, allocations, kind="unknown", outcome="allocated") == 5 + 2 + 1

    # The store's commits (when the store reports them) and the live gauges.
    if hasattr(server.store, "on_commit"):
        commits = value(samples, "turnid_commit_seconds_count")
        assert commits >= 1
        assert value(samples, "turnid_group_commit_size_count") == commits
        assert value(samples, "turnid_group_commit_size_sum") >= commits  # >= 1 a commit
    assert value(samples, "turnid_writer_queue_depth") == 0
    assert value(samples, "turnid_watch_streams") == 0
    assert value(samples, "turnid_store_errors_total") == 0
    assert value(samples, "turnid_auth_refusals_total") == 0


async def test_the_wal_gauge_is_the_size_of_the_wal_file(
    served: tuple[TurnIdServer, Metrics], tmp_path: Path, thread_id: str
) -> None:
    server, metrics = served
    assert metrics.port is not None
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.TurnIdServiceStub(channel)
        await stub.AllocateTurnId(pb.AllocateTurnIdRequest(thread_id=thread_id, kind=USER))
    samples = await scrape(metrics.port)
    size = (tmp_path / "turnid.db-wal").stat().st_size  # nothing writes now: it stays
    assert size > 0
    assert value(samples, "turnid_sqlite_wal_bytes") == size


async def test_the_wal_gauge_is_zero_on_a_store_without_a_wal() -> None:
    from turnid.service.stores.memory import MemoryStore

    metrics = Metrics()
    metrics.bind_store(MemoryStore())
    assert metrics.live_values()["turnid_sqlite_wal_bytes"] == 0


async def test_watch_streams_gauge_reads_live_state(
    served: tuple[TurnIdServer, Metrics], thread_id: str
) -> None:
    server, metrics = served
    assert metrics.port is not None
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.TurnIdServiceStub(channel)
        streams = [stub.WatchTurns(pb.WatchTurnsRequest(thread_id=thread_id)) for _ in range(2)]
        for stream in streams:
            first = await stream.read()  # the stream is established
            assert first.caught_up
        samples = await scrape(metrics.port)
        assert value(samples, "turnid_watch_streams") == 2
        assert value(samples, "turnid_calls_in_flight") == 2
        for stream in streams:
            stream.cancel()


class _FakeAuthenticator:
    def __init__(self) -> None:
        from collections import Counter

        self.refusals: Counter[str] = Counter()


async def test_auth_refusals_and_store_errors(served: tuple[TurnIdServer, Metrics]) -> None:
    _, metrics = served
    assert metrics.port is not None
    auth = _FakeAuthenticator()
    metrics.bind_authenticator(auth)
    auth.refusals["MISSING_CREDENTIALS"] += 3
    auth.refusals["INVALID_CREDENTIALS"] += 1
    for reason in ("STORE_UNAVAILABLE", "OVERLOADED", "OVERLOADED"):
        metrics.observe(
            CallRecord("AllocateTurnId", "UNAVAILABLE", reason, "", "", 0.001, "", None)
        )
    samples = await scrape(metrics.port)
    refusals = "turnid_auth_refusals_total"
    assert value(samples, refusals, reason="MISSING_CREDENTIALS") == 3
    assert value(samples, refusals, reason="INVALID_CREDENTIALS") == 1
    errors = "turnid_store_errors_total"
    assert value(samples, errors, reason="STORE_UNAVAILABLE") == 1
    assert value(samples, errors, reason="OVERLOADED") == 2
    assert value(samples, errors, reason="STORAGE_FULL") == 0
    assert value(samples, "turnid_allocations_total", outcome="failed") == 3


def test_a_busy_metrics_port_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics = Metrics()
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            metrics.start(f"127.0.0.1:{port}")
    with pytest.raises(OSError, match="cannot serve metrics on 'nonsense'"):
        Metrics().start("nonsense")


# --- --workers: one endpoint for every worker (prometheus-client's multiprocess mode) -------


def _worker(calls: int, pipe: Connection) -> None:
    """A spawned worker: records `calls` OK GetTurn calls and one open watch stream."""

    class Gate:
        watchers = 1
        inflight = 1

    class Servicer:
        gate = Gate()
        observers: list[object] = []  # noqa: RUF012

    class Store:  # the workers share one database file, so one WAL
        def wal_bytes(self) -> int:
            return 4096 * calls

    metrics = Metrics()
    assert metrics.multiprocess
    metrics.bind_servicer(Servicer())
    metrics.bind_store(Store())
    for _ in range(calls):
        metrics.observe(CallRecord("GetTurn", "OK", "", "", "", 0.002, "", None))
    metrics.on_commit(3, 3, 0.0004)
    metrics.start("ignored:0")  # a worker serves nothing: the parent does
    metrics.sync_live()
    pipe.send("recorded")
    pipe.recv()  # stay alive (live gauges) until the test has scraped
    metrics.close()


async def test_workers_report_one_coherent_set() -> None:
    workers = WorkersMetrics.start("127.0.0.1:0")
    context = multiprocessing.get_context("spawn")
    processes, pipes = [], []
    try:
        for calls in (3, 4):
            mine, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(calls, theirs))
            process.start()
            processes.append(process)
            pipes.append(mine)
        for pipe in pipes:
            assert await asyncio.to_thread(pipe.recv) == "recorded"
        samples = await scrape(workers.port)
        assert value(samples, HANDLED, grpc_method="GetTurn", grpc_code="OK") == 7
        assert value(samples, "grpc_server_handling_seconds_count", grpc_method="GetTurn") == 7
        assert value(samples, "turnid_group_commit_size_sum") == 6
        assert value(samples, "turnid_watch_streams") == 2
        assert value(samples, "turnid_sqlite_wal_bytes") == 4096 * 4  # the file's, not a sum
        for pipe in pipes:
            pipe.send("exit")
        for process in processes:
            await asyncio.to_thread(process.join, 30)
            assert process.exitcode == 0
            workers.worker_exited(process.pid or 0)
        samples = await scrape(workers.port)
        assert value(samples, "turnid_watch_streams") == 0  # dead workers' gauges go
        assert value(samples, HANDLED, grpc_method="GetTurn", grpc_code="OK") == 7  # counters stay
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        workers.close()


# --- `turnid serve --metrics-listen` (once cli.py has the flag) -----------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [1, 2])
async def test_turnid_serve_metrics_listen(tmp_path: Path, thread_id: str, workers: int) -> None:
    database = f"sqlite://{tmp_path / 'turnid.db'}"
    with ServeProcess(
        database, "--metrics-listen", "127.0.0.1:0", "--workers", str(workers)
    ) as process:
        line = process.wait_for_log(r"metrics (of all workers )?on http://\S+/metrics")
        port = int(line.split("/metrics")[0].rsplit(":", 1)[1])
        made = await call_mix(process.target, thread_id)
        # Workers write their counters to the shared files as they count: no wait needed.
        samples = await scrape(port)
        handled = {
            (s.labels["grpc_method"], s.labels["grpc_code"]): s.value
            for s in samples
            if s.name == HANDLED and s.value
        }
        assert handled == made
        assert process.terminate() == 0
