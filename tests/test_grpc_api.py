"""The service over a real gRPC channel, in-process, on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

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


async def allocate(stub: pb_grpc.TurnIdServiceStub, thread_id: str, kind: int, rid: str = ""):  # type: ignore[no-untyped-def]
    response = await stub.AllocateTurnId(
        pb.AllocateTurnIdRequest(thread_id=thread_id, kind=kind, request_id=rid)
    )
    return response.turn


async def list_all(stub: pb_grpc.TurnIdServiceStub, thread_id: str) -> list[pb.Turn]:
    turns: list[pb.Turn] = []
    token = ""
    while True:
        page = await stub.ListTurns(
            pb.ListTurnsRequest(thread_id=thread_id, page_size=7, page_token=token)
        )
        turns.extend(page.turns)
        token = page.next_page_token
        if not token:
            return turns


async def test_allocate_each_kind(stub: pb_grpc.TurnIdServiceStub, thread_id: str) -> None:
    realtime = await allocate(stub, thread_id, REALTIME, "r1")
    compaction = await allocate(stub, thread_id, COMPACTION)
    user = await allocate(stub, thread_id, USER)
    parsed = uuid.UUID(realtime.turn_id)
    assert (parsed.version, str(parsed)) == (7, realtime.turn_id)
    assert uuid.UUID(user.turn_id).version == 7
    assert compaction.turn_id == "auto-compact-0"
    assert [t.sequence for t in (realtime, compaction, user)] == [1, 2, 3]
    assert realtime.request_id == "r1" and realtime.kind == REALTIME and not realtime.claimed
    assert realtime.create_time.seconds > 0


async def test_retry_with_request_id_returns_the_same_turn(
    stub: pb_grpc.TurnIdServiceStub, thread_id: str
) -> None:
    first = await allocate(stub, thread_id, COMPACTION, "step-9")
    again = await allocate(stub, thread_id, COMPACTION, "step-9")
    assert again == first
    assert len(await list_all(stub, thread_id)) == 1


async def test_batch_claim_get_and_paged_list(
    stub: pb_grpc.TurnIdServiceStub, thread_id: str
) -> None:
    batch = await stub.BatchAllocateTurnIds(
        pb.BatchAllocateTurnIdsRequest(thread_id=thread_id, kind=COMPACTION, count=20)
    )
    assert [t.turn_id for t in batch.turns] == [f"auto-compact-{n}" for n in range(20)]
    claimed = (
        await stub.ClaimTurnId(
            pb.ClaimTurnIdRequest(thread_id=thread_id, turn_id="rollout-3", kind=USER)
        )
    ).turn
    assert (claimed.sequence, claimed.claimed, claimed.kind) == (21, True, USER)
    got = await stub.GetTurn(pb.GetTurnRequest(thread_id=thread_id, turn_id="auto-compact-7"))
    assert got.turn == batch.turns[7]
    everything = await list_all(stub, thread_id)
    assert [t.sequence for t in everything] == list(range(1, 22))
    assert everything[-1] == claimed
    big = await stub.ListTurns(pb.ListTurnsRequest(thread_id=thread_id, page_size=5000))
    assert len(big.turns) == 21 and big.next_page_token == ""


async def test_list_of_an_unknown_thread_is_empty(stub: pb_grpc.TurnIdServiceStub) -> None:
    page = await stub.ListTurns(pb.ListTurnsRequest(thread_id="never-used"))
    assert (list(page.turns), page.next_page_token) == ([], "")


async def test_health_and_reflection(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "turnid.v1.TurnIdService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for response in reflection.ServerReflectionInfo(iter([request])):
        names = {s.name for s in response.list_services_response.service}
        assert {"turnid.v1.TurnIdService", "grpc.health.v1.Health"} <= names
        break


# --- bad input: precise code and reason, nothing written, server keeps serving ---------------

OK_THREAD = "bad-input-thread"

BAD_REQUESTS = [
    (
        "empty thread",
        "AllocateTurnId",
        pb.AllocateTurnIdRequest(thread_id="", kind=REALTIME),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_THREAD_ID",
        "thread_id",
    ),
    (
        "oversize thread",
        "AllocateTurnId",
        pb.AllocateTurnIdRequest(thread_id="é" * 129, kind=REALTIME),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_THREAD_ID",
        "thread_id",
    ),
    (
        "control char thread",
        "AllocateTurnId",
        pb.AllocateTurnIdRequest(thread_id="a\x00b", kind=COMPACTION),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_THREAD_ID",
        "thread_id",
    ),
    (
        "newline thread",
        "BatchAllocateTurnIds",
        pb.BatchAllocateTurnIdsRequest(thread_id="a\nb", kind=COMPACTION, count=2),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_THREAD_ID",
        "thread_id",
    ),
    (
        "whitespace thread",
        "GetTurn",
        pb.GetTurnRequest(thread_id="a b", turn_id="x"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_THREAD_ID",
        "thread_id",
    ),
    (
        "unspecified kind",
        "AllocateTurnId",
        pb.AllocateTurnIdRequest(thread_id=OK_THREAD),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_KIND",
        "kind",
    ),
    (
        "unknown kind",
        "AllocateTurnId",
        pb.AllocateTurnIdRequest(thread_id=OK_THREAD, kind=42),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_KIND",
        "kind",
    ),
    (
        "unknown kind in batch",
        "BatchAllocateTurnIds",
        pb.BatchAllocateTurnIdsRequest(thread_id=OK_THREAD, kind=-1, count=1),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_KIND",
        "kind",
    ),
    (
        "count 0",
        "BatchAllocateTurnIds",
        pb.BatchAllocateTurnIdsRequest(thread_id=OK_THREAD, kind=REALTIME, count=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_COUNT",
        "count",
    ),
    (
        "count 1001",
        "BatchAllocateTurnIds",
        pb.BatchAllocateTurnIdsRequest(thread_id=OK_THREAD, kind=COMPACTION, count=1001),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_COUNT",
        "count",
    ),
    (
        "negative count",
        "BatchAllocateTurnIds",
        pb.BatchAllocateTurnIdsRequest(thread_id=OK_THREAD, kind=COMPACTION, count=-5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_COUNT",
        "count",
    ),
    (
        "oversize request id",
        "AllocateTurnId",
        pb.AllocateTurnIdRequest(thread_id=OK_THREAD, kind=COMPACTION, request_id="r" * 129),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST_ID",
        "request_id",
    ),
    (
        "non-ascii request id",
        "AllocateTurnId",
        pb.AllocateTurnIdRequest(thread_id=OK_THREAD, kind=COMPACTION, request_id="rü"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST_ID",
        "request_id",
    ),
    (
        "control char request id",
        "BatchAllocateTurnIds",
        pb.BatchAllocateTurnIdsRequest(
            thread_id=OK_THREAD, kind=COMPACTION, count=3, request_id="r\x07"
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST_ID",
        "request_id",
    ),
    (
        "claim auto-compact id",
        "ClaimTurnId",
        pb.ClaimTurnIdRequest(thread_id=OK_THREAD, turn_id="auto-compact-0", kind=REALTIME),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RESERVED_TURN_ID",
        "turn_id",
    ),
    (
        "claim compaction kind",
        "ClaimTurnId",
        pb.ClaimTurnIdRequest(thread_id=OK_THREAD, turn_id="rollout-1", kind=COMPACTION),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_KIND",
        "kind",
    ),
    (
        "claim empty id",
        "ClaimTurnId",
        pb.ClaimTurnIdRequest(thread_id=OK_THREAD, turn_id="", kind=USER),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TURN_ID",
        "turn_id",
    ),
    (
        "claim taken id",
        "ClaimTurnId",
        pb.ClaimTurnIdRequest(thread_id=OK_THREAD, turn_id="rollout-taken", kind=USER),
        grpc.StatusCode.ALREADY_EXISTS,
        "TURN_ID_TAKEN",
        None,
    ),
    (
        "request id reused",
        "AllocateTurnId",
        pb.AllocateTurnIdRequest(thread_id=OK_THREAD, kind=REALTIME, request_id="rid-used"),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
        None,
    ),
    (
        "unknown turn",
        "GetTurn",
        pb.GetTurnRequest(thread_id=OK_THREAD, turn_id="nope"),
        grpc.StatusCode.NOT_FOUND,
        "TURN_NOT_FOUND",
        None,
    ),
    (
        "garbage page token",
        "ListTurns",
        pb.ListTurnsRequest(thread_id=OK_THREAD, page_token="not-a-token"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
        "page_token",
    ),
    (
        "negative page size",
        "ListTurns",
        pb.ListTurnsRequest(thread_id=OK_THREAD, page_size=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_SIZE",
        "page_size",
    ),
]


@pytest.mark.parametrize(
    ("method", "request_", "code", "reason", "field"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_input_is_refused_precisely_and_writes_nothing(
    stub: pb_grpc.TurnIdServiceStub,
    method: str,
    request_: object,
    code: grpc.StatusCode,
    reason: str,
    field: str | None,
) -> None:
    # The thread holds a claimed id and a used request_id, so conflicts have something to hit.
    await stub.ClaimTurnId(
        pb.ClaimTurnIdRequest(thread_id=OK_THREAD, turn_id="rollout-taken", kind=USER)
    )
    await allocate(stub, OK_THREAD, COMPACTION, "rid-used")
    before = await list_all(stub, OK_THREAD)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, method)(request_)
    got_code, info, fields = error_details(caught.value)
    assert (got_code, info.reason) == (code, reason)
    assert info.metadata, "ErrorInfo metadata names the offending values"
    if field:
        assert fields == [field]

    assert await list_all(stub, OK_THREAD) == before
    # The server keeps serving, and the counter was not advanced by the refused request.
    assert (await allocate(stub, OK_THREAD, COMPACTION)).turn_id == "auto-compact-1"


async def test_page_token_of_another_thread_is_refused(
    stub: pb_grpc.TurnIdServiceStub, thread_id: str
) -> None:
    await stub.BatchAllocateTurnIds(
        pb.BatchAllocateTurnIdsRequest(thread_id=thread_id, kind=USER, count=3)
    )
    page = await stub.ListTurns(pb.ListTurnsRequest(thread_id=thread_id, page_size=1))
    assert page.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListTurns(
            pb.ListTurnsRequest(thread_id=thread_id + "-x", page_token=page.next_page_token)
        )
    assert error_details(caught.value)[1].reason == "INVALID_PAGE_TOKEN"


# --- graceful shutdown ------------------------------------------------------------------------


class GatedStore(MemoryStore):
    """A memory store whose allocations wait at a gate, so a call can be held in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def allocate(self, allocation: Allocation) -> list[Turn]:
        self.entered.set()
        await self.gate.wait()
        return await super().allocate(allocation)


async def test_shutdown_goes_not_serving_and_lets_in_flight_calls_finish(thread_id: str) -> None:
    store = GatedStore()
    server = TurnIdServer(ServerConfig(listen="127.0.0.1:0", database="memory:"), store=store)
    await server.start()
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.TurnIdServiceStub(channel)
        in_flight = asyncio.create_task(allocate(stub, thread_id, COMPACTION))
        await asyncio.wait_for(store.entered.wait(), 10)

        # A health watcher sees SERVING now and NOT_SERVING as soon as shutdown begins.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        statuses = aiter(watch)
        assert (await anext(statuses)).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(server.stop(grace=30))
        update = await asyncio.wait_for(anext(statuses), 10)
        assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # a watcher stream would otherwise hold the server for the whole grace
        assert not in_flight.done()
        store.gate.set()
        turn = await asyncio.wait_for(in_flight, 10)
        assert turn.turn_id == "auto-compact-0"
        await asyncio.wait_for(stopping, 30)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a\x03a\xffb\x10\x01",  # thread_id with invalid UTF-8
        b"\x0a\x03\xed\xa0\x80\x10\x01",  # thread_id holding an encoded surrogate
        b"\xff\xff\xff",  # not protobuf at all
    ],
    ids=["invalid-utf8", "surrogate", "garbage"],
)
async def test_undecodable_requests_are_invalid_argument(
    channel: grpc.aio.Channel, stub: pb_grpc.TurnIdServiceStub, raw: bytes
) -> None:
    allocate_raw = channel.unary_unary("/turnid.v1.TurnIdService/AllocateTurnId")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await allocate_raw(raw)
    code, info, _ = error_details(caught.value)
    assert (code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert (await allocate(stub, "after-garbage", COMPACTION)).turn_id == "auto-compact-0"


async def test_forged_page_token_beyond_int64_is_refused(
    stub: pb_grpc.TurnIdServiceStub, thread_id: str
) -> None:
    from turnid.service.domain import paging

    await allocate(stub, thread_id, USER)
    forged = paging.encode("", thread_id, 2**63)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListTurns(pb.ListTurnsRequest(thread_id=thread_id, page_token=forged))
    assert error_details(caught.value)[1].reason == "INVALID_PAGE_TOKEN"
