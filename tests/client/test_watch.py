"""`watch()`: every turn once, in order, across broken streams; caught_up; close().

Against the fake service (tests/client/fakes.py); the same scenarios run against `turnid
serve` in test_watch_e2e.py.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

import grpc
import pytest

from tests.client.fakes import WAIT, Failure, FakeServer, LoopThread
from turnid.client import (
    NO_RETRY,
    AsyncTurnIdClient,
    InvalidArgument,
    RetryEvent,
    RetryPolicy,
    Turn,
    TurnIdClient,
    TurnKind,
    Unavailable,
)
from turnid.client._core import RetryPolicy as CoreRetryPolicy
from turnid.client._watch import StreamGap, WatchCursor
from turnid.v1 import turnid_pb2

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.1)
THREAD = "thread-w"
USER = int(TurnKind.USER_INPUT)


async def take(watch: Any, count: int) -> list[Turn]:
    turns: list[Turn] = []
    async for turn in watch:
        turns.append(turn)
        if len(turns) == count:
            break
    return turns


# -- asyncio -----------------------------------------------------------------------------------


async def test_async_watch_replays_then_follows(fake_server: FakeServer) -> None:
    fake = fake_server.fake
    await fake.append(THREAD, USER, 3)
    caught_up_calls: list[int] = []
    async with AsyncTurnIdClient(fake_server.target, retry=FAST) as client:
        watch = client.watch(THREAD, on_caught_up=lambda: caught_up_calls.append(1))
        async with watch:
            assert await watch.wait_caught_up(WAIT)
            assert watch.caught_up
            assert caught_up_calls == [1]
            replayed = await asyncio.wait_for(take(watch, 3), WAIT)
            await client.allocate_batch(THREAD, TurnKind.AUTO_COMPACTION, 2)
            live = await asyncio.wait_for(take(watch, 2), WAIT)
        assert watch.closed
        assert [t.sequence for t in replayed + live] == [1, 2, 3, 4, 5]
        assert [t.turn_id for t in live] == ["auto-compact-0", "auto-compact-1"]
        assert [t async for t in watch] == []  # a closed watch yields nothing
    assert caught_up_calls == [1]


async def test_async_watch_after_sequence_and_empty_thread(fake_server: FakeServer) -> None:
    await fake_server.fake.append(THREAD, USER, 4)
    async with AsyncTurnIdClient(fake_server.target, retry=FAST) as client:
        async with client.watch(THREAD, after_sequence=2) as watch:
            assert [t.sequence for t in await asyncio.wait_for(take(watch, 2), WAIT)] == [3, 4]
            assert watch.last_sequence == 4
        async with client.watch("empty-thread") as empty:
            assert await empty.wait_caught_up(WAIT)  # caught up with nothing at all
            assert empty.last_sequence == 0


async def test_async_watch_resumes_across_a_restart_without_loss_or_repeat(
    fake_server: FakeServer,
) -> None:
    fake = fake_server.fake
    await fake.append(THREAD, USER, 2)
    reconnecting = asyncio.Event()
    retries: list[RetryEvent] = []

    def on_retry(event: RetryEvent) -> None:
        retries.append(event)
        reconnecting.set()

    caught_up_calls: list[int] = []
    client = AsyncTurnIdClient(fake_server.target, retry=FAST, on_retry=on_retry)
    async with client, client.watch(THREAD, on_caught_up=lambda: caught_up_calls.append(1)) as w:
        first = await asyncio.wait_for(take(w, 2), WAIT)
        await fake_server.stop(grace=0)  # the stream breaks
        await asyncio.wait_for(reconnecting.wait(), WAIT)
        await fake.append(THREAD, USER, 3)  # written while the watcher is away
        await fake_server.start()  # same port, same state
        resumed = await asyncio.wait_for(take(w, 3), WAIT)
        await client.user_input(THREAD)
        (live,) = await asyncio.wait_for(take(w, 1), WAIT)
    assert [t.sequence for t in first + resumed + [live]] == [1, 2, 3, 4, 5, 6]
    assert retries and all(e.method == "WatchTurns" for e in retries)
    assert all(isinstance(e.error, Unavailable) for e in retries)
    # Every reconnect asked for what came after the last turn received.
    after = [request.after_sequence for request in fake.attempts_of("WatchTurns")]
    assert after[0] == 0 and after[-1] == 2
    assert caught_up_calls == [1], "caught_up is signalled once, not again on resume"


async def test_async_watch_rides_out_server_side_failures(fake_server: FakeServer) -> None:
    fake = fake_server.fake
    fake.fail_next(
        "WatchTurns",
        Failure(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
        Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"),
        Failure(grpc.StatusCode.CANCELLED),
    )
    await fake.append(THREAD, USER, 1)
    client = AsyncTurnIdClient(fake_server.target, retry=FAST)
    async with client, client.watch(THREAD) as watch:
        assert await watch.wait_caught_up(WAIT)
        assert [t.sequence for t in await asyncio.wait_for(take(watch, 1), WAIT)] == [1]
    assert len(fake.attempts_of("WatchTurns")) == 4


async def test_async_negative_after_sequence_is_invalid_and_not_retried(
    fake_server: FakeServer,
) -> None:
    retries: list[RetryEvent] = []
    async with AsyncTurnIdClient(fake_server.target, retry=FAST, on_retry=retries.append) as c:
        watch = c.watch(THREAD, after_sequence=-1)
        with pytest.raises(InvalidArgument) as caught:
            await watch.wait_caught_up(WAIT)
        assert caught.value.reason == "INVALID_SEQUENCE"
        with pytest.raises(InvalidArgument):
            await anext(watch)
        with pytest.raises(StopAsyncIteration):
            await anext(watch)
        await watch.aclose()
    assert retries == []
    assert len(fake_server.fake.attempts_of("WatchTurns")) == 1


async def test_async_watch_gives_up_after_max_attempts(fake_server: FakeServer) -> None:
    target = fake_server.target
    await fake_server.stop()
    async with AsyncTurnIdClient(target, retry=NO_RETRY) as client:
        watch = client.watch(THREAD)
        with pytest.raises(Unavailable):
            await watch.wait_caught_up(WAIT)


async def test_async_close_ends_a_waiting_iteration(fake_server: FakeServer) -> None:
    async with AsyncTurnIdClient(fake_server.target, retry=FAST) as client:
        watch = client.watch(THREAD)
        assert await watch.wait_caught_up(WAIT)
        consumer = asyncio.create_task(take(watch, 1))
        await asyncio.wait_for(fake_server.fake.watch_started.wait(), WAIT)
        watch.close()
        assert await asyncio.wait_for(consumer, WAIT) == []
        await watch.aclose()
        assert watch.closed and watch.caught_up


async def test_closing_the_client_ends_its_watches(fake_server: FakeServer) -> None:
    client = AsyncTurnIdClient(fake_server.target, retry=FAST)
    watch = client.watch(THREAD)
    assert await watch.wait_caught_up(WAIT)
    await client.close()
    assert watch.closed
    assert [t async for t in watch] == []


# -- blocking --------------------------------------------------------------------------------


def test_sync_watch_replays_follows_and_signals_caught_up(
    threaded_fake: FakeServer, loop_thread: LoopThread
) -> None:
    fake = threaded_fake.fake
    loop_thread.run(fake.append(THREAD, USER, 2))
    signalled = threading.Event()
    with (
        TurnIdClient(threaded_fake.target, retry=FAST) as client,
        client.watch(THREAD, on_caught_up=signalled.set) as watch,
    ):
        assert watch.wait_caught_up(WAIT)  # before any iteration: a reader thread runs it
        assert signalled.is_set() and watch.caught_up
        client.realtime_delegation(THREAD)
        seen = [next(watch).sequence for _ in range(3)]
    assert seen == [1, 2, 3]
    assert watch.closed
    assert list(watch) == []


def test_sync_watch_resumes_across_a_restart(
    threaded_fake: FakeServer, loop_thread: LoopThread
) -> None:
    fake = threaded_fake.fake
    loop_thread.run(fake.append(THREAD, USER, 1))
    reconnecting = threading.Event()
    with (
        TurnIdClient(threaded_fake.target, retry=FAST, on_retry=lambda _: reconnecting.set()) as c,
        c.watch(THREAD) as watch,
    ):
        assert next(watch).sequence == 1
        loop_thread.run(threaded_fake.stop(grace=0))
        assert reconnecting.wait(WAIT)
        loop_thread.run(fake.append(THREAD, USER, 2))
        loop_thread.run(threaded_fake.start())
        assert [next(watch).sequence for _ in range(2)] == [2, 3]
        c.auto_compaction(THREAD)
        turn = next(watch)
    assert (turn.sequence, turn.turn_id) == (4, "auto-compact-0")


def test_sync_watch_closed_from_another_thread(threaded_fake: FakeServer) -> None:
    seen: queue.Queue[int] = queue.Queue()
    with TurnIdClient(threaded_fake.target, retry=FAST) as client:
        client.user_input(THREAD)
        watch = client.watch(THREAD)

        def consume() -> None:
            for turn in watch:  # blocks waiting for a second turn that never comes
                seen.put(turn.sequence)

        consumer = threading.Thread(target=consume)
        consumer.start()
        assert seen.get(timeout=WAIT) == 1
        watch.close()
        consumer.join(WAIT)
        assert not consumer.is_alive(), "close() from another thread ends the iteration"
        watch.close()  # twice is fine


def test_sync_closing_the_client_ends_its_watches(threaded_fake: FakeServer) -> None:
    client = TurnIdClient(threaded_fake.target, retry=FAST)
    watch = client.watch(THREAD)
    assert watch.wait_caught_up(WAIT)
    client.close()
    assert watch.closed
    assert list(watch) == []


def test_sync_negative_after_sequence(threaded_fake: FakeServer) -> None:
    with TurnIdClient(threaded_fake.target, retry=FAST) as client:
        watch = client.watch(THREAD, after_sequence=-5)
        with pytest.raises(InvalidArgument) as caught:
            next(watch)
        assert caught.value.reason == "INVALID_SEQUENCE"
        with pytest.raises(InvalidArgument):
            watch.wait_caught_up(WAIT)
        assert list(watch) == []
        watch.close()


def test_sync_wait_caught_up_times_out_while_the_server_is_down(
    threaded_fake: FakeServer, loop_thread: LoopThread
) -> None:
    loop_thread.run(threaded_fake.stop())
    with TurnIdClient(threaded_fake.target, retry=FAST) as client, client.watch(THREAD) as w:
        assert not w.wait_caught_up(0.2)
        assert not w.caught_up


# -- the cursor: no repeat, no skip, whatever a stream sends -----------------------------------


def _message(*sequences: int, caught_up: bool = True) -> Any:
    turns = [
        turnid_pb2.Turn(thread_id=THREAD, turn_id=f"t-{n}", kind=USER, sequence=n)
        for n in sequences
    ]
    return turnid_pb2.WatchTurnsResponse(turns=turns, caught_up=caught_up)


def test_cursor_drops_repeats_and_refuses_gaps() -> None:
    cursor = WatchCursor(THREAD, 2, CoreRetryPolicy())
    turns, newly = cursor.accept(_message(caught_up=False))
    assert (turns, newly, cursor.caught_up) == ([], False, False)
    turns, newly = cursor.accept(_message(1, 2, 3, 4))
    assert [t.sequence for t in turns] == [3, 4] and newly
    turns, newly = cursor.accept(_message(4, 5))
    assert [t.sequence for t in turns] == [5] and not newly
    with pytest.raises(StreamGap) as gap:
        cursor.accept(_message(6, 8))
    assert [t.sequence for t in gap.value.delivered] == [6]
    assert cursor.last_sequence == 6
    assert cursor.request().after_sequence == 6
