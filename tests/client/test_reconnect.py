"""The reconnect scenario: a client call is in its retry loop while the server it talks to is
stopped and a new one is started on the same port and the same SQLite store. The call succeeds
and the thread holds exactly one turn for it.

The hard case is the lost response: the first server commits the turn and is stopped before the
response leaves. The retry carries the same request_id, so the new server returns the original
turn instead of minting a second one. Every wait is on an event (the commit, the retry loop being
entered), never on time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from turnid.client import AsyncTurnIdClient, RetryEvent, RetryPolicy, TurnIdClient, TurnKind
from turnid.service.config import ServerConfig
from turnid.service.domain import Allocation, Turn
from turnid.service.server import TurnIdServer
from turnid.service.stores.sqlite import SqliteStore
from turnid.testing import TurnIdTestServer

_T = TypeVar("_T")
WAIT = 30.0  # seconds: only a bound on waiting for events, never a pause
FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.1)


class CommitThenHang:
    """A store whose first allocation commits and then never answers (the response is lost)."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.committed = asyncio.Event()
        self.turns: list[Turn] = []

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def allocate(self, allocation: Allocation) -> list[Turn]:
        self.turns = await self.inner.allocate(allocation)
        self.committed.set()
        await asyncio.Event().wait()  # until the server cancels the call
        raise AssertionError("unreachable")

    async def get(self, thread_id: str, turn_id: str) -> Turn | None:
        return await self.inner.get(thread_id, turn_id)

    async def list(self, thread_id: str, after_sequence: int, limit: int) -> list[Turn]:
        return await self.inner.list(thread_id, after_sequence, limit)


class LoopThread:
    """An event loop in a background thread, for servers that a blocking client calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(WAIT)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    running = LoopThread()
    yield running
    running.close()


def first_server(path: Path) -> tuple[TurnIdServer, CommitThenHang]:
    store = CommitThenHang(SqliteStore(str(path)))
    server = TurnIdServer(ServerConfig(listen="127.0.0.1:0", database="memory:"), store=store)
    return server, store


def second_server(path: Path, port: int) -> TurnIdServer:
    return TurnIdServer(ServerConfig(listen=f"127.0.0.1:{port}", database=f"sqlite://{path}"))


def test_sync_call_rides_out_a_restart_with_one_turn(
    loop_thread: LoopThread, tmp_path: Path, thread_id: str
) -> None:
    path = tmp_path / "turnid.db"
    first, store = first_server(path)
    loop_thread.run(first.start())
    retries: list[RetryEvent] = []
    retrying = threading.Event()

    def on_retry(event: RetryEvent) -> None:
        retries.append(event)
        retrying.set()

    second: TurnIdServer | None = None
    with (
        TurnIdClient(first.target, timeout=WAIT, retry=FAST, on_retry=on_retry) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        call = pool.submit(client.auto_compaction, thread_id)
        loop_thread.run(asyncio.wait_for(store.committed.wait(), WAIT))  # durable on server 1
        loop_thread.run(first.stop(grace=0))  # ...and its response never leaves
        assert retrying.wait(WAIT), "the call never entered its retry loop"
        assert not call.done()
        second = second_server(path, first.port)
        loop_thread.run(second.start())
        turn = call.result(WAIT)

        (committed,) = store.turns
        assert turn.turn_id == committed.turn_id == "auto-compact-0"
        assert turn.request_id == committed.request_id
        assert {event.request_id for event in retries} == {turn.request_id}
        assert list(client.list_turns(thread_id)) == [turn]
        # The counter lives with the thread: the next compaction is N=1 on the new server.
        assert client.auto_compaction(thread_id).turn_id == "auto-compact-1"
    if second is not None:
        loop_thread.run(second.stop(grace=0))


async def test_async_call_rides_out_a_restart_with_one_turn(tmp_path: Path, thread_id: str) -> None:
    path = tmp_path / "turnid.db"
    first, store = first_server(path)
    await first.start()
    retries: list[RetryEvent] = []
    retrying = asyncio.Event()

    def on_retry(event: RetryEvent) -> None:
        retries.append(event)
        retrying.set()

    async with AsyncTurnIdClient(first.target, timeout=WAIT, retry=FAST, on_retry=on_retry) as c:
        call = asyncio.create_task(c.allocate(thread_id, TurnKind.REALTIME_DELEGATION))
        await asyncio.wait_for(store.committed.wait(), WAIT)
        await first.stop(grace=0)
        await asyncio.wait_for(retrying.wait(), WAIT)
        assert not call.done()
        second = second_server(path, first.port)
        await second.start()
        try:
            turn = await asyncio.wait_for(call, WAIT)
            (committed,) = store.turns
            assert turn.turn_id == committed.turn_id
            assert {event.request_id for event in retries} == {turn.request_id}
            assert [t async for t in c.list_turns(thread_id)] == [turn]
        finally:
            await second.stop(grace=0)


@pytest.mark.turnid(store="sqlite")
def test_plugin_server_down_then_back_on_the_same_port(
    turnid_server: TurnIdTestServer, thread_id: str
) -> None:
    """With the plugin's server: down before the call, back while the call retries."""
    target = turnid_server.target
    retrying = threading.Event()
    with (
        TurnIdClient(target, timeout=WAIT, retry=FAST, on_retry=lambda _: retrying.set()) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        before = client.user_input(thread_id)
        turnid_server.stop()
        call = pool.submit(client.auto_compaction, thread_id)
        assert retrying.wait(WAIT)
        turnid_server.start()
        assert turnid_server.target == target
        turn = call.result(WAIT)
        assert list(client.list_turns(thread_id)) == [before, turn]
        assert turn.sequence == 2
