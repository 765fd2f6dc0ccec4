"""Retry-safe at every edge (invariant 9), against the fake service: what is retried, what is
not, and that every error of a write carries the request_id every attempt used."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from tests.client.fakes import WAIT, Failure, FakeServer, LoopThread
from turnid.client import (
    AsyncTurnIdClient,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    RetryEvent,
    RetryPolicy,
    TurnIdClient,
    TurnIdError,
    TurnKind,
    Unauthenticated,
    Unavailable,
)

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)
THREAD = "thread-1"

OVERLOADED = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")
SERVER_CANCELLED = Failure(grpc.StatusCode.CANCELLED, message="server cancelled the call")
DRAINING = Failure(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")


def client_for(server: FakeServer, **kwargs: Any) -> AsyncTurnIdClient:
    return AsyncTurnIdClient(server.target, retry=FAST, **{"timeout": WAIT, **kwargs})


# -- the deadline scenario: the first attempt commits, its answer is lost ----------------------


async def test_lost_answer_deadline_then_retry_with_the_errors_request_id(
    fake_server: FakeServer,
) -> None:
    fake = fake_server.fake
    lost = fake.lose_next_answer("AllocateTurnId")
    async with client_for(fake_server, timeout=0.5) as client:
        with pytest.raises(DeadlineExceeded) as caught:
            await client.auto_compaction(THREAD)
        assert lost.is_set(), "the first attempt committed on the server"
        error = caught.value
        assert error.request_id
        (committed,) = fake.turns[THREAD]
        assert committed.request_id == error.request_id

        again = await client.auto_compaction(THREAD, request_id=error.request_id)
        assert again.turn_id == committed.turn_id == "auto-compact-0"
        assert [t.sequence async for t in client.list_turns(THREAD)] == [1]
    assert {r.request_id for r in fake.attempts_of("AllocateTurnId")} == {error.request_id}


def test_sync_lost_answer_deadline_then_retry(
    threaded_fake: FakeServer, loop_thread: LoopThread
) -> None:
    lost = loop_thread.call(threaded_fake.fake.lose_next_answer, "BatchAllocateTurnIds")
    with TurnIdClient(threaded_fake.target, timeout=0.5, retry=FAST) as client:
        with pytest.raises(DeadlineExceeded) as caught:
            client.allocate_batch(THREAD, TurnKind.USER_INPUT, 3)
        assert lost.is_set()
        turns = client.allocate_batch(
            THREAD, TurnKind.USER_INPUT, 3, request_id=caught.value.request_id
        )
        assert [t.sequence for t in turns] == [1, 2, 3]
        assert [t.sequence for t in client.list_turns(THREAD)] == [1, 2, 3]


# -- what is retried --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "error_type"),
    [(OVERLOADED, TurnIdError), (SERVER_CANCELLED, Cancelled), (DRAINING, Unavailable)],
    ids=["resource-exhausted", "server-cancelled", "shutting-down"],
)
async def test_transient_failures_of_writes_are_retried_with_one_request_id(
    fake_server: FakeServer, failure: Failure, error_type: type[TurnIdError]
) -> None:
    fake = fake_server.fake
    fake.fail_next("AllocateTurnId", failure, failure)
    fake.fail_next("ClaimTurnId", failure)
    retries: list[RetryEvent] = []
    async with client_for(fake_server, on_retry=retries.append) as client:
        turn = await client.user_input(THREAD)
        claimed = await client.claim(THREAD, "rollout-1", TurnKind.USER_INPUT)
    attempts = fake.attempts_of("AllocateTurnId")
    assert len(attempts) == 3
    assert {a.request_id for a in attempts} == {turn.request_id}
    assert len(fake.attempts_of("ClaimTurnId")) == 2
    assert [(e.method, e.attempt) for e in retries] == [
        ("AllocateTurnId", 1),
        ("AllocateTurnId", 2),
        ("ClaimTurnId", 1),
    ]
    assert all(isinstance(e.error, error_type) for e in retries)
    assert all(e.error.code is failure.code for e in retries)
    assert [e.request_id for e in retries] == [turn.request_id] * 2 + [claimed.request_id]
    assert [t.sequence for t in fake.turns[THREAD]] == [1, 2]


async def test_overload_past_the_deadline_raises_with_the_request_id(
    fake_server: FakeServer,
) -> None:
    fake_server.fake.fail_next("AllocateTurnId", *[OVERLOADED] * 1000)
    retries: list[RetryEvent] = []
    async with client_for(fake_server, on_retry=retries.append) as client:
        with pytest.raises(TurnIdError) as caught:
            await client.realtime_delegation(THREAD, timeout=0.3)
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.reason == "OVERLOADED"
    assert retries
    assert caught.value.request_id == retries[0].request_id != ""
    assert fake_server.fake.turns[THREAD] == []


async def test_reads_are_retried_and_their_errors_have_no_request_id(
    fake_server: FakeServer,
) -> None:
    fake_server.fake.fail_next("GetTurn", OVERLOADED, DRAINING)
    async with client_for(fake_server) as client:
        with pytest.raises(NotFound) as caught:
            await client.get(THREAD, "nope")
    assert caught.value.request_id == ""
    assert len(fake_server.fake.attempts_of("GetTurn")) == 3


# -- what is not retried ----------------------------------------------------------------------


async def test_failed_precondition_is_not_retried_and_carries_last_sequence(
    fake_server: FakeServer,
) -> None:
    fake = fake_server.fake
    retries: list[RetryEvent] = []
    async with client_for(fake_server, on_retry=retries.append) as client:
        first = await client.user_input(THREAD, expected_last_sequence=0)
        await client.auto_compaction(THREAD, expected_last_sequence=1)
        calls = [
            lambda: client.allocate(THREAD, TurnKind.USER_INPUT, expected_last_sequence=0),
            lambda: client.realtime_delegation(THREAD, expected_last_sequence=1),
            lambda: client.auto_compaction(THREAD, expected_last_sequence=0),
            lambda: client.user_input(THREAD, expected_last_sequence=3),
            lambda: client.allocate_batch(THREAD, TurnKind.USER_INPUT, 2, expected_last_sequence=1),
            lambda: client.claim(THREAD, "r-1", TurnKind.USER_INPUT, expected_last_sequence=0),
        ]
        for call in calls:
            with pytest.raises(FailedPrecondition) as caught:
                await call()
            error = caught.value
            assert error.code is grpc.StatusCode.FAILED_PRECONDITION
            assert error.reason == "THREAD_ADVANCED"
            assert error.last_sequence == 2
            assert error.request_id
        last = await client.user_input(THREAD, expected_last_sequence=2)
        plain = await client.user_input(THREAD)
    assert retries == []
    assert len(fake.attempts_of("AllocateTurnId")) == 2 + 4 + 2
    assert (first.sequence, last.sequence, plain.sequence) == (1, 3, 4)
    # The condition travels only when given; 0 ("no turns yet") is a condition of its own.
    assert not fake.attempts_of("AllocateTurnId")[-1].HasField("expected_last_sequence")
    assert fake.attempts_of("AllocateTurnId")[0].HasField("expected_last_sequence")


@pytest.mark.parametrize(
    ("failure", "error_type"),
    [
        (Failure(grpc.StatusCode.INTERNAL, "INTERNAL_ERROR", {"correlation_id": "c-42"}), Internal),
        (Failure(grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS"), Unauthenticated),
        (Failure(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_THREAD_ID"), InvalidArgument),
    ],
)
async def test_final_errors_are_not_retried(
    fake_server: FakeServer, failure: Failure, error_type: type[TurnIdError]
) -> None:
    fake_server.fake.fail_next("BatchAllocateTurnIds", failure)
    retries: list[RetryEvent] = []
    async with client_for(fake_server, on_retry=retries.append) as client:
        with pytest.raises(error_type) as caught:
            await client.allocate_batch(THREAD, TurnKind.AUTO_COMPACTION, 2, request_id="step-7")
    assert caught.value.reason == failure.reason
    assert caught.value.request_id == "step-7"
    assert retries == []
    assert len(fake_server.fake.attempts_of("BatchAllocateTurnIds")) == 1
    if isinstance(caught.value, Internal):
        assert caught.value.correlation_id == "c-42"


async def test_a_task_cancelled_locally_is_not_retried(fake_server: FakeServer) -> None:
    fake = fake_server.fake
    arrived = fake.hang_next("AllocateTurnId")
    retries: list[RetryEvent] = []
    async with client_for(fake_server, on_retry=retries.append) as client:
        call = asyncio.create_task(client.user_input(THREAD))
        await asyncio.wait_for(arrived.wait(), WAIT)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(fake.hang_cancelled["AllocateTurnId"].wait(), WAIT)
    assert retries == []
    assert len(fake.attempts_of("AllocateTurnId")) == 1  # the task is over: no attempt can follow


def test_sync_client_closed_mid_call_is_not_retried(
    threaded_fake: FakeServer, loop_thread: LoopThread
) -> None:
    fake = threaded_fake.fake
    arrived = loop_thread.call(fake.hang_next, "ClaimTurnId")
    retries: list[RetryEvent] = []
    client = TurnIdClient(threaded_fake.target, timeout=WAIT, retry=FAST, on_retry=retries.append)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.claim, THREAD, "legacy-1", TurnKind.USER_INPUT)
        loop_thread.run(asyncio.wait_for(arrived.wait(), WAIT))
        client.close()
        with pytest.raises(Cancelled) as caught:
            call.result(WAIT)
    assert caught.value.request_id == fake.attempts_of("ClaimTurnId")[0].request_id
    assert retries == []
    assert len(fake.attempts_of("ClaimTurnId")) == 1


def test_sync_client_closed_while_waiting_to_retry(
    threaded_fake: FakeServer, loop_thread: LoopThread
) -> None:
    loop_thread.call(threaded_fake.fake.fail_next, "AllocateTurnId", DRAINING)
    retrying = threading.Event()
    slow = RetryPolicy(initial_backoff=WAIT, max_backoff=WAIT, jitter=0)
    client = TurnIdClient(
        threaded_fake.target, timeout=WAIT * 3, retry=slow, on_retry=lambda _: retrying.set()
    )
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.user_input, THREAD, request_id="step-1")
        assert retrying.wait(WAIT)
        client.close()  # ends the backoff at once
        with pytest.raises(Cancelled) as caught:
            call.result(WAIT)
    assert caught.value.request_id == "step-1"


# -- errors raised with no RPC, or by the retry loop itself ----------------------------------


async def test_deadline_spent_before_any_attempt(fake_server: FakeServer) -> None:
    async with client_for(fake_server) as client:
        with pytest.raises(DeadlineExceeded) as caught:
            await client.user_input(THREAD, timeout=0)
        assert caught.value.request_id
        with pytest.raises(DeadlineExceeded) as read:
            await client.get_thread(THREAD, timeout=0)
        assert read.value.request_id == ""
    assert fake_server.fake.attempts == []


def test_sync_deadline_spent_before_any_attempt(threaded_fake: FakeServer) -> None:
    with TurnIdClient(threaded_fake.target) as client:
        for call in (
            lambda: client.allocate(THREAD, TurnKind.USER_INPUT, request_id="s-1", timeout=0),
            lambda: client.realtime_delegation(THREAD, request_id="s-1", timeout=-1),
            lambda: client.claim(THREAD, "x", TurnKind.USER_INPUT, request_id="s-1", timeout=0),
        ):
            with pytest.raises(DeadlineExceeded) as caught:
                call()
            assert caught.value.request_id == "s-1"


async def test_unreachable_server_error_carries_the_request_id(fake_server: FakeServer) -> None:
    target = fake_server.target
    await fake_server.stop()
    retries: list[RetryEvent] = []
    async with AsyncTurnIdClient(target, retry=FAST, on_retry=retries.append) as client:
        with pytest.raises(Unavailable) as caught:
            await client.auto_compaction(THREAD, timeout=0.3)
    assert retries
    assert caught.value.request_id == retries[0].request_id != ""
