"""Graceful shutdown of `turnid serve`: drain, refuse, finish, exit; signals at awkward moments.

The property that matters: no call that reached the server before SIGTERM ends CANCELLED or
UNKNOWN (gRPC cancels calls it has received but not handed to the application when the server
stops, grpc/grpc#41785; the servicer's gate refuses new calls UNAVAILABLE first, which a client
retries), the process exits 0, and every acknowledged turn is there after a restart.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from turnid.client import AsyncTurnIdClient, TurnIdError, TurnKind

from .serve_process import ServeProcess

pytestmark = pytest.mark.e2e

SERVICE = "turnid.v1.TurnIdService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# What a retrying client may surface when the server it talks to has gone away for good.
GONE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


async def health_statuses(target: str) -> AsyncIterator[int]:
    """The TurnIdService's health as the server streams it (grpc.health.v1 Watch)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE)
        )
        try:
            async for response in stream:
                yield response.status
        except grpc.aio.AioRpcError:
            return  # the server stopped


async def exit_code(server: ServeProcess, within: float = 60) -> int:
    return await asyncio.to_thread(server.process.wait, within)


class Load:
    """`workers` tasks, each allocating turn after turn through a real AsyncTurnIdClient (with
    its retries) until a call fails; what every call ended as is recorded."""

    def __init__(self, target: str, threads: list[str], label: str, workers: int = 48) -> None:
        self.client = AsyncTurnIdClient(target, timeout=3.0)
        self.threads = threads
        self.label = label
        self.acknowledged: dict[str, tuple[str, str]] = {}  # request_id -> (thread, turn_id)
        self.failures: Counter[grpc.StatusCode] = Counter()
        self.errors: list[TurnIdError] = []
        self._progress = asyncio.Condition()
        self.tasks = [asyncio.create_task(self._worker(n)) for n in range(workers)]

    async def _worker(self, n: int) -> None:
        thread_id = self.threads[n % len(self.threads)]
        step = 0
        while True:
            request_id = f"{self.label}-w{n}-s{step}"
            kind = TurnKind.AUTO_COMPACTION if (n + step) % 2 else TurnKind.REALTIME_DELEGATION
            try:
                turn = await self.client.allocate(thread_id, kind, request_id=request_id)
            except TurnIdError as error:
                self.failures[error.code] += 1
                self.errors.append(error)
                return
            self.acknowledged[request_id] = (thread_id, turn.turn_id)
            step += 1
            async with self._progress:
                self._progress.notify_all()

    async def wait_acknowledged(self, count: int, within: float = 60) -> None:
        async with asyncio.timeout(within), self._progress:
            await self._progress.wait_for(lambda: len(self.acknowledged) >= count)

    async def finish(self, within: float = 60) -> None:
        async with asyncio.timeout(within):
            await asyncio.gather(*self.tasks)
        await self.client.close()


async def sigterm_under_load(server: ServeProcess, threads: list[str], label: str) -> Load:
    """48 calls in flight, then SIGTERM; returns the load once every worker has stopped."""
    health = health_statuses(server.target)
    assert await anext(health) == SERVING
    load = Load(server.target, threads, label)
    await load.wait_acknowledged(2 * len(load.tasks))  # every worker is going
    server.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        async for status in health:
            if status == NOT_SERVING:
                break
        else:
            pytest.fail("the health stream ended without NOT_SERVING")
    await health.aclose()
    assert await exit_code(server) == 0, "".join(server.log)
    await load.finish()
    return load


async def test_sigterm_with_48_calls_in_flight_cancels_none(tmp_path: Path, thread_id: str) -> None:
    database = f"sqlite://{tmp_path / 'turnid.db'}"
    threads = [f"{thread_id}-{n}" for n in range(8)]
    acknowledged: dict[str, tuple[str, str]] = {}
    for round_ in range(3):
        with ServeProcess(database, "--drain", "0.3", "--grace", "5") as server:
            load = await sigterm_under_load(server, threads, f"round{round_}")
        assert load.failures.keys() <= GONE, (load.failures, load.errors[:5])
        assert len(load.acknowledged) >= 2 * len(load.tasks)
        assert "Traceback" not in "".join(server.log), "".join(server.log)
        assert any("INFO turnid.server: refusing new calls" in line for line in server.log)
        acknowledged.update(load.acknowledged)

    with ServeProcess(database) as server:
        async with AsyncTurnIdClient(server.target) as client:
            stored: dict[str, tuple[str, str]] = {}
            for thread in threads:
                turns = [turn async for turn in client.list_turns(thread, page_size=1000)]
                assert [t.sequence for t in turns] == list(range(1, len(turns) + 1))
                compactions = [t.turn_id for t in turns if t.kind == TurnKind.AUTO_COMPACTION]
                assert compactions == [f"auto-compact-{n}" for n in range(len(compactions))]
                stored.update({t.request_id: (thread, t.turn_id) for t in turns})
        assert server.terminate() == 0
    missing = {rid for rid in acknowledged if stored.get(rid) != acknowledged[rid]}
    assert not missing, f"{len(missing)} acknowledged turns are not in the store"


async def test_drain_keeps_serving_while_health_says_not_serving(tmp_path: Path) -> None:
    with ServeProcess(f"sqlite://{tmp_path / 't.db'}", "--drain", "30") as server:
        health = health_statuses(server.target)
        assert await anext(health) == SERVING
        server.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await anext(health) == NOT_SERVING
        # Within the drain, calls are still served: balancers are still taking us out.
        async with AsyncTurnIdClient(server.target, timeout=10) as client:
            turn = await client.auto_compaction("drained-thread")
        assert turn.turn_id == "auto-compact-0"
        assert not any("INFO turnid.server: refusing new calls" in line for line in server.log), (
            server.log
        )
        await health.aclose()
        # A second signal ends the drain at once.
        server.process.send_signal(signal.SIGTERM)
        assert await exit_code(server, 10) == 128 + signal.SIGTERM


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_second_signal_exits_at_once_non_zero(tmp_path: Path, signum: signal.Signals) -> None:
    with ServeProcess(f"sqlite://{tmp_path / 't.db'}", "--drain", "60") as server:
        server.process.send_signal(signum)
        await asyncio.to_thread(server.wait_for_log, "health NOT_SERVING")
        server.process.send_signal(signum)
        code = await exit_code(server, 10)
    assert code == 128 + signum
    assert any("second signal" in line for line in server.log)
    assert "Traceback" not in "".join(server.log)


@pytest.fixture
def silent_postgres() -> AsyncIterator[str]:
    """A PostgreSQL URL whose server accepts the TCP connection and then never answers: the
    store's start-up hangs there until its connect timeout."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    yield f"postgresql://turnid@127.0.0.1:{port}/turnid?connect_timeout=60"
    stop.set()
    thread.join(5)
    listener.close()
    for connection in accepted:
        connection.close()


async def test_sigterm_during_start_up_exits_zero_without_a_traceback(
    silent_postgres: str,
) -> None:
    pytest.importorskip("psycopg")
    server = ServeProcess(silent_postgres, wait=False)
    try:
        await asyncio.to_thread(server.wait_for_log, "turnid starting")
        server.process.send_signal(signal.SIGTERM)
        code = await exit_code(server, 20)
    finally:
        if server.process.poll() is None:
            server.kill()
    log = "".join(server.log)
    assert code == 0, log
    assert "stopped before serving" in log
    assert "Traceback" not in log
    assert "turnid serving on" not in log


def test_sigterm_at_any_moment_of_start_up_is_clean(tmp_path: Path) -> None:
    """SIGTERM as soon as the process exists, before or after its handlers are in place: it
    ends (0, or killed by the signal's default action before turnid's code runs), quickly,
    with no traceback."""
    from .serve_process import serve_command

    process = subprocess.Popen(
        serve_command("--listen", "127.0.0.1:0", "--database", f"sqlite://{tmp_path / 't.db'}"),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert "Traceback" not in stderr
