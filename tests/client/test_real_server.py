"""The turn-2 client features against the real in-process server (`TurnIdServer`): the lost
answer, conditional writes, get_thread, watch across a restart."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from tests.client.fakes import WAIT
from turnid.client import (
    AsyncTurnIdClient,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RetryEvent,
    RetryPolicy,
    Thread,
    TurnIdClient,
    TurnKind,
)
from turnid.service.config import ServerConfig
from turnid.service.server import TurnIdServer
from turnid.testing import TurnIdTestServer

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.1)


class LoseFirstAnswer(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The first call of `method` runs to the end (it commits), then its answer never leaves."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.armed = True
        self.lost = asyncio.Event()

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.endswith("/" + self.method):
            return handler
        inner = handler.unary_unary

        async def lose(request: Any, context: Any) -> Any:
            response = await inner(request, context)
            if self.armed:
                self.armed = False
                self.lost.set()
                await asyncio.Event().wait()  # until the client's deadline cancels the call
            return response

        return grpc.unary_unary_rpc_method_handler(
            lose,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def test_lost_answer_then_retry_with_the_errors_request_id(
    tmp_path: Path, thread_id: str
) -> None:
    interceptor = LoseFirstAnswer("AllocateTurnId")
    config = ServerConfig(listen="127.0.0.1:0", database=f"sqlite://{tmp_path / 'turnid.db'}")
    server = TurnIdServer(config, interceptors=[interceptor])
    await server.start()
    try:
        async with AsyncTurnIdClient(server.target, timeout=1.0, retry=FAST) as client:
            with pytest.raises(DeadlineExceeded) as caught:
                await client.auto_compaction(thread_id)
            assert interceptor.lost.is_set(), "the first attempt ran to its commit"
            request_id = caught.value.request_id
            assert request_id
            turn = await client.auto_compaction(thread_id, request_id=request_id)
            assert (turn.turn_id, turn.sequence, turn.request_id) == (
                "auto-compact-0",
                1,
                request_id,
            )
            assert [t async for t in client.list_turns(thread_id)] == [turn]
            assert (await client.auto_compaction(thread_id)).turn_id == "auto-compact-1"
    finally:
        await server.stop(grace=0)


def test_conditional_writes_and_get_thread(turnid_client: TurnIdClient, thread_id: str) -> None:
    client = turnid_client
    with pytest.raises(NotFound) as missing:
        client.get_thread(thread_id)
    assert missing.value.reason == "THREAD_NOT_FOUND"
    assert missing.value.request_id == ""

    first = client.user_input(thread_id, expected_last_sequence=0)
    compaction = client.auto_compaction(thread_id, expected_last_sequence=1)
    thread = client.get_thread(thread_id)
    assert isinstance(thread, Thread)
    assert (thread.thread_id, thread.last_sequence, thread.next_compaction_index) == (
        thread_id,
        2,
        1,
    )
    assert thread.last_turn == compaction
    assert thread.create_time == first.create_time
    assert thread.update_time == compaction.create_time
    assert thread.create_time.tzinfo is not None

    for write in (
        lambda: client.user_input(thread_id, expected_last_sequence=1),
        lambda: client.allocate_batch(thread_id, TurnKind.USER_INPUT, 2, expected_last_sequence=0),
        lambda: client.claim(thread_id, "rollout-1", TurnKind.USER_INPUT, expected_last_sequence=3),
    ):
        with pytest.raises(FailedPrecondition) as caught:
            write()
        assert caught.value.reason == "THREAD_ADVANCED"
        assert caught.value.last_sequence == 2
        assert caught.value.request_id
    assert client.get_thread(thread_id).last_sequence == 2, "a refused write writes nothing"

    # A retry of a conditional write that succeeded replays it, though the thread moved on.
    step = client.user_input(thread_id, expected_last_sequence=2, request_id="step-3")
    client.user_input(thread_id)
    assert client.user_input(thread_id, expected_last_sequence=2, request_id="step-3") == step


async def test_async_get_thread_and_condition(
    turnid_async_client: AsyncTurnIdClient, thread_id: str
) -> None:
    client = turnid_async_client
    await client.allocate_batch(thread_id, TurnKind.AUTO_COMPACTION, 3)
    thread = await client.get_thread(thread_id)
    assert (thread.last_sequence, thread.next_compaction_index) == (3, 3)
    with pytest.raises(FailedPrecondition) as caught:
        await client.realtime_delegation(thread_id, expected_last_sequence=2)
    assert caught.value.last_sequence == 3


def test_sync_watch_across_a_restart(turnid_server: TurnIdTestServer, thread_id: str) -> None:
    reconnecting = threading.Event()
    retries: list[RetryEvent] = []

    def on_retry(event: RetryEvent) -> None:
        retries.append(event)
        reconnecting.set()

    with TurnIdClient(turnid_server.target, retry=FAST, on_retry=on_retry) as client:
        client.allocate_batch(thread_id, TurnKind.USER_INPUT, 2)
        with client.watch(thread_id) as watch:
            assert watch.wait_caught_up(WAIT)
            assert [next(watch).sequence for _ in range(2)] == [1, 2]
            client.auto_compaction(thread_id)
            assert next(watch).turn_id == "auto-compact-0"
            turnid_server.stop()
            assert reconnecting.wait(WAIT)
            turnid_server.start()  # same port, same (memory) store
            client.auto_compaction(thread_id)
            client.user_input(thread_id)
            resumed = [next(watch) for _ in range(2)]
    assert [t.sequence for t in resumed] == [4, 5]
    assert resumed[0].turn_id == "auto-compact-1"
    assert all(event.method == "WatchTurns" for event in retries)


async def test_async_watch_replay_live_and_invalid_sequence(
    turnid_async_client: AsyncTurnIdClient, thread_id: str
) -> None:
    client = turnid_async_client
    await client.allocate_batch(thread_id, TurnKind.USER_INPUT, 3)
    async with client.watch(thread_id, after_sequence=1) as watch:
        assert await watch.wait_caught_up(WAIT)
        got = [await asyncio.wait_for(anext(watch), WAIT) for _ in range(2)]
        await client.user_input(thread_id)
        got.append(await asyncio.wait_for(anext(watch), WAIT))
    assert [t.sequence for t in got] == [2, 3, 4]
    async with client.watch("empty-" + thread_id) as empty:
        assert await empty.wait_caught_up(WAIT)
    bad = client.watch(thread_id, after_sequence=-1)
    with pytest.raises(InvalidArgument) as caught:
        await bad.wait_caught_up(WAIT)
    assert caught.value.reason == "INVALID_SEQUENCE"
    await bad.aclose()


def test_health_method(turnid_client: TurnIdClient) -> None:
    assert turnid_client.check_health() == "SERVING"
    assert turnid_client.check_health("turnid.v1.TurnIdService") == "SERVING"
    with pytest.raises(NotFound):
        turnid_client.check_health("no.such.Service")


def test_sync_wait_caught_up_with_a_history_longer_than_the_read_ahead(
    turnid_client: TurnIdClient, thread_id: str
) -> None:
    from turnid.client.sync import WATCH_BUFFER

    # More than the read-ahead holds, in two replay messages (1,000 turns, then 524 and
    # caught_up): the second cannot fit until the caller reads, which it does only after
    # wait_caught_up().
    total = WATCH_BUFFER + 500
    turnid_client.allocate_batch(thread_id, TurnKind.USER_INPUT, 1000)
    turnid_client.allocate_batch(thread_id, TurnKind.USER_INPUT, total - 1000)
    with turnid_client.watch(thread_id) as watch:
        assert watch.wait_caught_up(WAIT), "caught_up must not wait for room in the buffer"
        seen = [next(iter(watch)).sequence for _ in range(total)]
    assert seen == list(range(1, total + 1))


async def test_async_wait_caught_up_with_a_history_longer_than_the_read_ahead(
    turnid_async_client: AsyncTurnIdClient, thread_id: str
) -> None:
    client = turnid_async_client
    await client.allocate_batch(thread_id, TurnKind.USER_INPUT, 1000)
    await client.allocate_batch(thread_id, TurnKind.USER_INPUT, 600)
    async with client.watch(thread_id) as watch:
        assert await watch.wait_caught_up(WAIT), "caught_up must not wait for room in the buffer"
        seen = [(await asyncio.wait_for(anext(watch), WAIT)).sequence for _ in range(1600)]
    assert seen == list(range(1, 1601))
