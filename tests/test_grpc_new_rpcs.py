"""GetThread, WatchTurns, conditional allocation, the error mapping and the shutdown gate over
a real gRPC channel, in-process, on 127.0.0.1:0 (memory and SQLite stores)."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from turnid.service.config import ServerConfig
from turnid.service.domain import Allocation, Turn
from turnid.service.server import TurnIdServer
from turnid.service.stores.memory import MemoryStore
from turnid.v1 import turnid_pb2 as pb
from turnid.v1 import turnid_pb2_grpc as pb_grpc

from .grpc_helpers import error_details

REALTIME = pb.TURN_KIND_REALTIME_DELEGATION
COMPACTION = pb.TURN_KIND_AUTO_COMPACTION
USER = pb.TURN_KIND_USER_INPUT


@pytest.fixture(params=["memory", "sqlite"])
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TurnIdServer]:
    database = "memory:" if request.param == "memory" else f"sqlite://{tmp_path / 't.db'}"
    running = TurnIdServer(ServerConfig(listen="127.0.0.1:0", database=database))
    await running.start()
    yield running
    await running.stop(grace=0)


@pytest.fixture
async def channel(server: TurnIdServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.target) as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.TurnIdServiceStub:
    return pb_grpc.TurnIdServiceStub(channel)


async def allocate(stub: pb_grpc.TurnIdServiceStub, thread_id: str, kind: int, **fields) -> pb.Turn:  # type: ignore[no-untyped-def]
    response = await stub.AllocateTurnId(
        pb.AllocateTurnIdRequest(thread_id=thread_id, kind=kind, **fields)
    )
    return response.turn


async def refused(call) -> tuple[grpc.StatusCode, str, dict[str, str]]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    code, info, _ = error_details(caught.value)
    return code, info.reason, dict(info.metadata)


# --- GetThread ----------------------------------------------------------------------------------


async def test_get_thread(stub: pb_grpc.TurnIdServiceStub, thread_id: str) -> None:
    code, reason, _ = await refused(stub.GetThread(pb.GetThreadRequest(thread_id=thread_id)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "THREAD_NOT_FOUND")
    await allocate(stub, thread_id, COMPACTION)
    last = await allocate(stub, thread_id, USER)
    thread = (await stub.GetThread(pb.GetThreadRequest(thread_id=thread_id))).thread
    assert thread.thread_id == thread_id
    assert (thread.last_sequence, thread.next_compaction_index) == (2, 1)
    assert thread.last_turn == last
    assert thread.update_time == last.create_time
    assert thread.create_time.ToMicroseconds() <= thread.update_time.ToMicroseconds()
    code, reason, _ = await refused(stub.GetThread(pb.GetThreadRequest(thread_id="a b")))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_THREAD_ID")


# --- conditional allocation ---------------------------------------------------------------------


async def test_conditional_allocation(stub: pb_grpc.TurnIdServiceStub, thread_id: str) -> None:
    first = await allocate(stub, thread_id, USER, request_id="a", expected_last_sequence=0)
    code, reason, metadata = await refused(
        stub.AllocateTurnId(
            pb.AllocateTurnIdRequest(
                thread_id=thread_id, kind=USER, request_id="b", expected_last_sequence=0
            )
        )
    )
    assert (code, reason, metadata["last_sequence"]) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "THREAD_ADVANCED",
        "1",
    )
    # The retry of the winner is replayed although the thread has moved on since.
    await allocate(stub, thread_id, USER)
    assert await allocate(stub, thread_id, USER, request_id="a", expected_last_sequence=0) == first
    batch = await stub.BatchAllocateTurnIds(
        pb.BatchAllocateTurnIdsRequest(
            thread_id=thread_id, kind=COMPACTION, count=2, expected_last_sequence=2
        )
    )
    assert [t.sequence for t in batch.turns] == [3, 4]
    code, reason, _ = await refused(
        stub.ClaimTurnId(
            pb.ClaimTurnIdRequest(
                thread_id=thread_id, turn_id="legacy", kind=USER, expected_last_sequence=-1
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SEQUENCE")
    # Unset means unconditional; 0 is a real condition ("the thread has no turns").
    other = thread_id + "-2"
    assert (await allocate(stub, other, USER, expected_last_sequence=0)).sequence == 1


async def test_conditional_racers_over_grpc_have_one_winner(
    stub: pb_grpc.TurnIdServiceStub, thread_id: str
) -> None:
    for round_ in range(5):
        outcomes = await asyncio.gather(
            *(
                allocate(stub, thread_id, REALTIME, expected_last_sequence=round_)
                for _ in range(16)
            ),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if not isinstance(o, BaseException)]
        assert len(winners) == 1
        for loser in outcomes:
            if isinstance(loser, grpc.aio.AioRpcError):
                assert error_details(loser)[1].reason == "THREAD_ADVANCED"


# --- WatchTurns ---------------------------------------------------------------------------------


async def test_watch_first_message_at_once_then_live(
    stub: pb_grpc.TurnIdServiceStub, thread_id: str
) -> None:
    stream = stub.WatchTurns(pb.WatchTurnsRequest(thread_id=thread_id))
    messages = aiter(stream)
    first = await asyncio.wait_for(anext(messages), 10)
    assert (list(first.turns), first.caught_up) == ([], True)
    made = [await allocate(stub, thread_id, COMPACTION) for _ in range(3)]
    seen: list[pb.Turn] = []
    while len(seen) < 3:
        message = await asyncio.wait_for(anext(messages), 10)
        assert message.caught_up
        seen.extend(message.turns)
    assert seen == made
    stream.cancel()


async def test_watch_replays_from_a_middle_sequence(
    stub: pb_grpc.TurnIdServiceStub, thread_id: str
) -> None:
    await stub.BatchAllocateTurnIds(
        pb.BatchAllocateTurnIdsRequest(thread_id=thread_id, kind=COMPACTION, count=1000)
    )
    await stub.BatchAllocateTurnIds(
        pb.BatchAllocateTurnIdsRequest(thread_id=thread_id, kind=USER, count=500)
    )
    stream = stub.WatchTurns(pb.WatchTurnsRequest(thread_id=thread_id, after_sequence=250))
    seen: list[int] = []
    caught_up_at = None
    async for message in stream:
        seen.extend(t.sequence for t in message.turns)
        if message.caught_up and caught_up_at is None:
            caught_up_at = len(seen)
            break
        assert not message.caught_up
    assert seen == list(range(251, 1501))
    assert caught_up_at == 1250
    stream.cancel()


async def test_watchers_before_during_and_after_a_burst_see_every_turn_once(
    server: TurnIdServer, thread_id: str
) -> None:
    clients = [grpc.aio.insecure_channel(server.target) for _ in range(4)]
    stubs = [pb_grpc.TurnIdServiceStub(c) for c in clients]
    total = 200

    async def watch(after: int, expect: int) -> list[int]:
        seen: list[int] = []
        stream = stubs[0].WatchTurns(
            pb.WatchTurnsRequest(thread_id=thread_id, after_sequence=after)
        )
        async for message in stream:
            seen.extend(t.sequence for t in message.turns)
            if len(seen) >= expect:
                stream.cancel()
                break
        return seen

    started = asyncio.Event()

    async def burst(stub: pb_grpc.TurnIdServiceStub, n: int) -> None:
        for i in range(n):
            await allocate(stub, thread_id, (REALTIME, COMPACTION, USER)[i % 3])
            started.set()

    before = asyncio.create_task(watch(0, total))
    writers = [asyncio.create_task(burst(s, total // 4)) for s in stubs]
    # A watcher that starts mid-burst, from wherever the thread stands then.
    await asyncio.wait_for(started.wait(), 10)
    during = asyncio.create_task(watch(0, total))
    resumed = asyncio.create_task(watch(37, total - 37))
    await asyncio.gather(*writers)
    after = asyncio.create_task(watch(0, total))
    results = await asyncio.wait_for(asyncio.gather(before, during, resumed, after), 30)
    for seen in results[:2] + results[3:]:
        assert seen == list(range(1, total + 1))
    assert results[2] == list(range(38, total + 1))
    for c in clients:
        await c.close()


async def test_watch_bad_input(stub: pb_grpc.TurnIdServiceStub) -> None:
    async def first(request: pb.WatchTurnsRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.WatchTurns(request):
                pass
        code, info, _ = error_details(caught.value)
        return code, info.reason

    assert await first(pb.WatchTurnsRequest(thread_id="t", after_sequence=-1)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SEQUENCE",
    )
    assert await first(pb.WatchTurnsRequest(thread_id="")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_THREAD_ID",
    )


async def test_shutdown_ends_watch_streams_unavailable_and_refuses_new_calls(
    server: TurnIdServer, stub: pb_grpc.TurnIdServiceStub, thread_id: str
) -> None:
    stream = stub.WatchTurns(pb.WatchTurnsRequest(thread_id=thread_id))
    messages = aiter(stream)
    assert (await anext(messages)).caught_up
    server.servicer.gate.begin_shutdown()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(anext(messages), 10)
    code, info, _ = error_details(caught.value)
    assert (code, info.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
    code, reason, _ = await refused(stub.GetThread(pb.GetThreadRequest(thread_id=thread_id)))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
    assert await server.servicer.gate.wait_idle(10)


# --- the error mapping (invariant 7) ------------------------------------------------------------


class BrokenStore(MemoryStore):
    async def allocate(self, allocation: Allocation) -> list[Turn]:
        raise RuntimeError("SELECT * FROM turns -- host=db.internal user=bob password=hunter2")


async def test_an_unexpected_error_is_internal_with_a_correlation_id_and_no_internals(
    thread_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = TurnIdServer(
        ServerConfig(listen="127.0.0.1:0", database="memory:"), store=BrokenStore()
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TurnIdServiceStub(channel)
            with (
                caplog.at_level(logging.ERROR, logger="turnid.servicer"),
                pytest.raises(grpc.aio.AioRpcError) as caught,
            ):
                await allocate(stub, thread_id, USER)
            code, info, _ = error_details(caught.value)
            assert (code, info.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL_ERROR")
            correlation_id = info.metadata["correlation_id"]
            details = caught.value.details() or ""
            for secret in ("SELECT", "db.internal", "bob", "hunter2", "RuntimeError"):
                assert secret not in details and secret not in str(dict(info.metadata))
            assert correlation_id in details
            assert any(correlation_id in r.getMessage() for r in caplog.records)
            # The server goes on serving.
            assert (await stub.ListTurns(pb.ListTurnsRequest(thread_id=thread_id))).turns == []
    finally:
        await server.stop(grace=0)


@pytest.mark.parametrize("body", ["+3", " 3", "0003", "3_0", "٣", "3 ", "03", "-3", "0"])
async def test_page_tokens_accept_exactly_what_was_issued(
    stub: pb_grpc.TurnIdServiceStub, thread_id: str, body: str
) -> None:
    from turnid.service.domain import paging

    await stub.BatchAllocateTurnIds(
        pb.BatchAllocateTurnIdsRequest(thread_id=thread_id, kind=USER, count=5)
    )
    issued = await stub.ListTurns(pb.ListTurnsRequest(thread_id=thread_id, page_size=3))
    assert issued.next_page_token == paging.encode("", thread_id, 3)
    tag = base64.urlsafe_b64decode(issued.next_page_token + "==").decode().split(".")[1]
    forged = base64.urlsafe_b64encode(f"1.{tag}.{body}".encode()).decode().rstrip("=")
    code, reason, _ = await refused(
        stub.ListTurns(pb.ListTurnsRequest(thread_id=thread_id, page_token=forged))
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    # The same token with padding, or in another thread, is not the issued one either.
    for token in (issued.next_page_token + "=", issued.next_page_token + "\n"):
        code, reason, _ = await refused(
            stub.ListTurns(pb.ListTurnsRequest(thread_id=thread_id, page_token=token))
        )
        assert reason == "INVALID_PAGE_TOKEN"
