"""AllocateMany (issue 13) against the in-process server, memory: and a SQLite file.

One call, many independent allocation requests: each item answered in order with its turns or
its own status (the google.rpc.Status its unary RPC would have failed with), the limits refused
TOO_MANY_ITEMS, the items of one call in one SQLite commit, the observers told once per item as
of its unary RPC, every item in the namespace of the call's credentials, the shutdown gate and
MALFORMED_REQUEST from the shared wrapper, and a fuzz of hostile items.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turnid.service.config import ServerConfig
from turnid.service.server import TurnIdServer
from turnid.service.servicer import MAX_MANY_ITEMS, MAX_MANY_TURNS, CallRecord
from turnid.v1 import turnid_pb2 as pb
from turnid.v1 import turnid_pb2_grpc

from .grpc_helpers import error_details, status_details

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0
REALTIME, COMPACTION, USER = 1, 2, 3


@pytest.fixture(params=["memory", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory:" if request.param == "memory" else f"sqlite://{tmp_path / 'many.db'}"


class Recorder:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self.peers: dict[str, str] = {}  # request_id -> peer, read while the call is alive

    def __call__(self, record: CallRecord) -> None:
        self.records.append(record)
        self.peers[record.request_id] = record.peer


@pytest.fixture
async def served(database: str) -> AsyncIterator[tuple[TurnIdServer, Any, Recorder]]:
    recorder = Recorder()
    server = TurnIdServer(
        ServerConfig(listen="127.0.0.1:0", database=database), observers=[recorder]
    )
    await server.start()
    channel = grpc.aio.insecure_channel(server.target)
    try:
        yield server, turnid_pb2_grpc.TurnIdServiceStub(channel), recorder
    finally:
        await channel.close()
        await server.stop(grace=0)


def allocate(thread_id: str, kind: int = REALTIME, **fields: Any) -> pb.AllocateManyItem:
    return pb.AllocateManyItem(
        allocate=pb.AllocateTurnIdRequest(thread_id=thread_id, kind=kind, **fields)  # type: ignore[arg-type]
    )


def batch(thread_id: str, count: int, kind: int = REALTIME, **fields: Any) -> pb.AllocateManyItem:
    return pb.AllocateManyItem(
        batch_allocate=pb.BatchAllocateTurnIdsRequest(
            thread_id=thread_id,
            kind=kind,  # type: ignore[arg-type]
            count=count,
            **fields,
        )
    )


def claim(thread_id: str, turn_id: str, **fields: Any) -> pb.AllocateManyItem:
    return pb.AllocateManyItem(
        claim=pb.ClaimTurnIdRequest(thread_id=thread_id, turn_id=turn_id, kind=USER, **fields)
    )


def reason_of(status: Any) -> tuple[int, str, dict[str, str], list[str]]:
    """(code, ErrorInfo reason, its metadata, BadRequest fields) of an item's Status, parsed
    as the google.rpc.Status it is wire-identical to."""
    parsed = status_pb2.Status.FromString(status.SerializeToString())
    info, fields = status_details(parsed)
    return parsed.code, info.reason, dict(info.metadata), fields


async def test_items_are_answered_in_order_each_with_its_turns_or_its_status(
    served: tuple[TurnIdServer, Any, Recorder], thread_id: str
) -> None:
    _, stub, _ = served
    other = f"{thread_id}-b"
    await stub.AllocateTurnId(
        pb.AllocateTurnIdRequest(thread_id=other, kind=REALTIME), timeout=TIMEOUT
    )
    await stub.ClaimTurnId(
        pb.ClaimTurnIdRequest(thread_id=other, turn_id="rollout-1", kind=USER), timeout=TIMEOUT
    )
    items = [
        allocate(thread_id, COMPACTION, request_id="r-compact"),
        allocate("bad thread"),  # whitespace: INVALID_THREAD_ID
        batch(thread_id, 3, USER, request_id="r-batch"),
        claim(other, "rollout-1"),  # TURN_ID_TAKEN
        allocate(other, expected_last_sequence=0),  # the thread has turns: THREAD_ADVANCED
        pb.AllocateManyItem(),  # no request: INVALID_ITEM
        batch(thread_id, 1001),  # INVALID_COUNT
        claim(thread_id, "rollout-7", request_id="r-claim"),
        allocate(thread_id, 99),  # INVALID_KIND
    ]
    response = await stub.AllocateMany(pb.AllocateManyRequest(items=items), timeout=TIMEOUT)
    results = list(response.results)
    assert len(results) == len(items)

    ok = [results[i] for i in (0, 2, 7)]
    for result in ok:
        assert not result.HasField("status")
    assert results[0].turns[0].turn_id == "auto-compact-0"
    assert results[0].turns[0].request_id == "r-compact"
    assert [t.kind for t in results[2].turns] == [USER] * 3
    assert results[7].turns[0].turn_id == "rollout-7" and results[7].turns[0].claimed
    sequences = sorted(t.sequence for result in ok for t in result.turns)
    assert sequences == [1, 2, 3, 4, 5], "one thread, gap-free, whatever the items' order"
    batch_sequences = [t.sequence for t in results[2].turns]
    assert batch_sequences == list(range(batch_sequences[0], batch_sequences[0] + 3))

    expected = {
        1: (code_pb2.INVALID_ARGUMENT, "INVALID_THREAD_ID"),
        3: (code_pb2.ALREADY_EXISTS, "TURN_ID_TAKEN"),
        4: (code_pb2.FAILED_PRECONDITION, "THREAD_ADVANCED"),
        5: (code_pb2.INVALID_ARGUMENT, "INVALID_ITEM"),
        6: (code_pb2.INVALID_ARGUMENT, "INVALID_COUNT"),
        8: (code_pb2.INVALID_ARGUMENT, "INVALID_KIND"),
    }
    for index, (code, reason) in expected.items():
        assert not results[index].turns
        got_code, got_reason, _, fields = reason_of(results[index].status)
        assert (got_code, got_reason) == (code, reason), index
        if code == code_pb2.INVALID_ARGUMENT:
            assert fields, f"item {index}: a BadRequest names the field"
    assert reason_of(results[4].status)[2]["last_sequence"] == "2"

    # The unary RPCs see the same thread: the items were real allocations.
    thread = await stub.GetThread(pb.GetThreadRequest(thread_id=thread_id), timeout=TIMEOUT)
    assert thread.thread.last_sequence == 5
    assert thread.thread.next_compaction_index == 1


async def test_a_known_request_id_is_replayed_in_an_item(
    served: tuple[TurnIdServer, Any, Recorder], thread_id: str
) -> None:
    _, stub, _ = served
    first = await stub.AllocateTurnId(
        pb.AllocateTurnIdRequest(thread_id=thread_id, kind=REALTIME, request_id="step-1"),
        timeout=TIMEOUT,
    )
    items = [
        allocate(thread_id, request_id="step-1", expected_last_sequence=0),  # replay first
        allocate(thread_id, COMPACTION, request_id="step-1"),  # same key, other request
    ]
    response = await stub.AllocateMany(pb.AllocateManyRequest(items=items), timeout=TIMEOUT)
    assert list(response.results[0].turns) == [first.turn]
    assert reason_of(response.results[1].status)[:2] == (
        code_pb2.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )


async def test_an_empty_call_has_no_results(served: tuple[TurnIdServer, Any, Recorder]) -> None:
    _, stub, _ = served
    response = await stub.AllocateMany(pb.AllocateManyRequest(), timeout=TIMEOUT)
    assert list(response.results) == []


@pytest.mark.parametrize(
    ("items", "turns"),
    [
        ([allocate("t")] * (MAX_MANY_ITEMS + 1), MAX_MANY_ITEMS + 1),
        ([batch("t", 1000)] * 10 + [allocate("t")], MAX_MANY_TURNS + 1),
    ],
    ids=["items", "turns"],
)
async def test_beyond_the_limits_the_call_is_refused(
    served: tuple[TurnIdServer, Any, Recorder], items: list[Any], turns: int
) -> None:
    _, stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AllocateMany(pb.AllocateManyRequest(items=items), timeout=TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    _, info, fields = error_details(caught.value)
    assert info.reason == "TOO_MANY_ITEMS"
    assert info.metadata["items"] == str(len(items))
    assert info.metadata["turns"] == str(turns)
    assert info.metadata["max_items"] == str(MAX_MANY_ITEMS)
    assert info.metadata["max_turns"] == str(MAX_MANY_TURNS)
    assert fields


async def test_at_the_limits_the_call_is_served(
    served: tuple[TurnIdServer, Any, Recorder], thread_id: str
) -> None:
    _, stub, _ = served
    items = [batch(f"{thread_id}-{i}", 1000) for i in range(10)]
    response = await stub.AllocateMany(pb.AllocateManyRequest(items=items), timeout=60)
    assert [len(r.turns) for r in response.results] == [1000] * 10


async def test_the_observers_hear_of_each_item_as_of_its_unary_call(
    served: tuple[TurnIdServer, Any, Recorder], thread_id: str
) -> None:
    _, stub, recorder = served
    items = [
        allocate(thread_id, COMPACTION, request_id="a"),
        batch(thread_id, 4, USER, request_id="b"),
        claim(thread_id, "rollout-1", request_id="c"),
        allocate("bad thread", request_id="d"),
    ]
    recorder.records.clear()
    await stub.AllocateMany(pb.AllocateManyRequest(items=items), timeout=TIMEOUT)
    by_request = {r.request_id: r for r in recorder.records if r.method != "AllocateMany"}
    assert {
        key: (r.method, r.code, r.reason, r.kind, r.count) for key, r in by_request.items()
    } == {
        "a": ("AllocateTurnId", "OK", "", COMPACTION, 1),
        "b": ("BatchAllocateTurnIds", "OK", "", USER, 4),
        "c": ("ClaimTurnId", "OK", "", USER, 1),
        "d": ("AllocateTurnId", "INVALID_ARGUMENT", "INVALID_THREAD_ID", REALTIME, 1),
    }
    assert all(r.namespace == "" for r in by_request.values())
    # Each item's peer is the AllocateMany call's: the address this test connects from.
    assert all(recorder.peers[key].startswith("ipv4:127.0.0.1:") for key in by_request)
    calls = [r for r in recorder.records if r.method == "AllocateMany"]
    assert len(calls) == 1 and calls[0].code == "OK"


async def test_an_unexpected_failure_is_that_items_internal_error(
    served: tuple[TurnIdServer, Any, Recorder],
    thread_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, stub, _ = served
    original = server.store.allocate_many

    async def broken(allocations: Any) -> list[Any]:
        # A store whose allocate() of one allocation failed with what no one foresaw.
        results = await original([a for a in allocations if not a.thread_id.endswith("-broken")])
        answers = iter(results)
        return [
            RuntimeError("sqlite3.OperationalError: secret internals")
            if a.thread_id.endswith("-broken")
            else next(answers)
            for a in allocations
        ]

    monkeypatch.setattr(server.store, "allocate_many", broken)
    items = [allocate(f"{thread_id}-broken"), allocate(thread_id)]
    response = await stub.AllocateMany(pb.AllocateManyRequest(items=items), timeout=TIMEOUT)
    code, reason, metadata, _ = reason_of(response.results[0].status)
    assert (code, reason) == (code_pb2.INTERNAL, "INTERNAL_ERROR")
    assert metadata["correlation_id"]
    assert "secret" not in response.results[0].status.message
    assert response.results[1].turns[0].sequence == 1


async def test_a_failure_of_the_whole_store_step_is_each_items_internal_error(
    served: tuple[TurnIdServer, Any, Recorder],
    thread_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, stub, recorder = served

    async def broken(allocations: Any) -> list[Any]:
        raise RuntimeError("sqlite3.OperationalError: secret internals")

    monkeypatch.setattr(server.store, "allocate_many", broken)
    items = [allocate(thread_id, request_id="a"), batch(thread_id, 5, request_id="b")]
    items.append(allocate("bad thread", request_id="c"))
    recorder.records.clear()
    response = await stub.AllocateMany(pb.AllocateManyRequest(items=items), timeout=TIMEOUT)
    reasons = [reason_of(result.status) for result in response.results]
    assert [(code, reason) for code, reason, _, _ in reasons] == [
        (code_pb2.INTERNAL, "INTERNAL_ERROR"),
        (code_pb2.INTERNAL, "INTERNAL_ERROR"),
        (code_pb2.INVALID_ARGUMENT, "INVALID_THREAD_ID"),
    ]
    correlation = [metadata["correlation_id"] for _, _, metadata, _ in reasons[:2]]
    assert all(correlation) and correlation[0] != correlation[1]
    assert all("secret" not in result.status.message for result in response.results)
    by_request = {r.request_id: r for r in recorder.records if r.method != "AllocateMany"}
    assert {key: (r.code, r.reason) for key, r in by_request.items()} == {
        "a": ("INTERNAL", "INTERNAL_ERROR"),
        "b": ("INTERNAL", "INTERNAL_ERROR"),
        "c": ("INVALID_ARGUMENT", "INVALID_THREAD_ID"),
    }


async def test_a_cancelled_call_cancels_the_waiting_items_and_keeps_the_refused_ones(
    served: tuple[TurnIdServer, Any, Recorder],
    thread_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, stub, _ = served
    arrived = asyncio.Event()

    async def hanging(allocations: Any) -> list[Any]:
        arrived.set()
        await asyncio.Event().wait()  # until the call is cancelled
        raise AssertionError("unreachable")

    monkeypatch.setattr(server.store, "allocate_many", hanging)
    heard = asyncio.Event()
    records: list[CallRecord] = []

    def observer(record: CallRecord) -> None:
        records.append(record)
        if record.method == "AllocateMany":
            heard.set()

    server.servicer.observers.append(observer)
    items = [allocate(thread_id, request_id="a"), allocate("bad thread", request_id="b")]
    call = stub.AllocateMany(pb.AllocateManyRequest(items=items), timeout=TIMEOUT)
    await asyncio.wait_for(arrived.wait(), TIMEOUT)
    call.cancel()
    await asyncio.wait_for(heard.wait(), TIMEOUT)
    by_request = {r.request_id: r for r in records if r.method != "AllocateMany"}
    assert {key: (r.code, r.reason) for key, r in by_request.items()} == {
        "a": ("CANCELLED", ""),
        "b": ("INVALID_ARGUMENT", "INVALID_THREAD_ID"),
    }


async def test_a_coalesced_call_is_one_sqlite_commit(tmp_path: Path, thread_id: str) -> None:
    server = TurnIdServer(
        ServerConfig(listen="127.0.0.1:0", database=f"sqlite://{tmp_path / 'commit.db'}")
    )
    await server.start()
    commits: list[tuple[int, int]] = []
    server.store.on_commit = lambda allocations, turns, seconds: commits.append(  # type: ignore[attr-defined]
        (allocations, turns)
    )
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = turnid_pb2_grpc.TurnIdServiceStub(channel)
            items = [allocate(f"{thread_id}-{i}") for i in range(30)] + [batch(thread_id, 5)]
            response = await stub.AllocateMany(pb.AllocateManyRequest(items=items), timeout=TIMEOUT)
            assert all(not r.HasField("status") for r in response.results)
            assert commits == [(31, 35)], "31 allocations, 35 turns, one transaction"
    finally:
        await server.stop(grace=0)


async def test_a_closing_server_refuses_the_call(
    served: tuple[TurnIdServer, Any, Recorder],
) -> None:
    server, stub, _ = served
    server.gate.begin_shutdown()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AllocateMany(pb.AllocateManyRequest(items=[allocate("t")]), timeout=TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert error_details(caught.value)[1].reason == "SHUTTING_DOWN"


async def test_bytes_that_do_not_decode_are_malformed(
    served: tuple[TurnIdServer, Any, Recorder],
) -> None:
    server, _, _ = served
    # items[0].allocate.thread_id = b"\xff" (not UTF-8)
    thread = b"\x0a\x01\xff"
    inner = b"\x0a" + bytes([len(thread)]) + thread
    payload = b"\x0a" + bytes([len(inner)]) + inner
    async with grpc.aio.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/turnid.v1.TurnIdService/AllocateMany")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(payload, timeout=TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value)[1].reason == "MALFORMED_REQUEST"


async def test_every_item_runs_in_the_namespace_of_the_calls_credentials(
    tmp_path: Path, thread_id: str
) -> None:
    tokens = {"alpha": "token-alpha", "beta": "token-beta"}
    lines = [f"{ns} sha256:{hashlib.sha256(t.encode()).hexdigest()}" for ns, t in tokens.items()]
    (tmp_path / "tokens").write_text("\n".join(lines) + "\n")
    config = ServerConfig(
        listen="127.0.0.1:0", database="memory:", auth_tokens=str(tmp_path / "tokens")
    )
    server = TurnIdServer(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = turnid_pb2_grpc.TurnIdServiceStub(channel)

            def bearer(namespace: str) -> tuple[tuple[str, str]]:
                return (("authorization", f"Bearer {tokens[namespace]}"),)

            items = [allocate(thread_id), batch(thread_id, 2)]
            response = await stub.AllocateMany(
                pb.AllocateManyRequest(items=items), timeout=TIMEOUT, metadata=bearer("alpha")
            )
            assert sorted(t.sequence for r in response.results for t in r.turns) == [1, 2, 3]
            mine = await stub.GetThread(
                pb.GetThreadRequest(thread_id=thread_id), timeout=TIMEOUT, metadata=bearer("alpha")
            )
            assert mine.thread.last_sequence == 3
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetThread(
                    pb.GetThreadRequest(thread_id=thread_id),
                    timeout=TIMEOUT,
                    metadata=bearer("beta"),
                )
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.AllocateMany(pb.AllocateManyRequest(items=items), timeout=TIMEOUT)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(grace=0)


# --- fuzz: hostile items, each answered like its unary RPC ----------------------------------


def _item_messages() -> st.SearchStrategy[pb.AllocateManyItem]:
    from .test_fuzz import SERVICE, messages

    fields = {
        "AllocateTurnId": "allocate",
        "BatchAllocateTurnIds": "batch_allocate",
        "ClaimTurnId": "claim",
    }
    strategies = []
    for method in SERVICE.methods:
        if method.name in fields:
            request_type = getattr(pb, method.input_type.name)
            strategies.append(
                messages(method).map(
                    lambda raw, f=fields[method.name], t=request_type: pb.AllocateManyItem(
                        **{f: t.FromString(raw)}
                    )
                )
            )
    return st.one_of(*strategies, st.just(pb.AllocateManyItem()))


def test_hostile_items_get_their_unary_errors(database: str) -> None:
    from .test_fuzz import LEAKS, REASON

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # grpc.aio looks the loop up; an async test before may unset it
    server = TurnIdServer(ServerConfig(listen="127.0.0.1:0", database=database))
    loop.run_until_complete(server.start())

    async def open_channel() -> tuple[grpc.aio.Channel, Any]:
        channel = grpc.aio.insecure_channel(server.target)
        return channel, turnid_pb2_grpc.TurnIdServiceStub(channel)

    channel, stub = loop.run_until_complete(open_channel())

    async def send(items: list[pb.AllocateManyItem]) -> None:
        request = pb.AllocateManyRequest(items=items)
        if request.ByteSize() > server.config.max_message_bytes:
            # Twelve hostile items can add up past --max-message-bytes: gRPC refuses the call
            # before the service sees it (as test_fuzz's `call` expects of every RPC).
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.AllocateMany(request, timeout=TIMEOUT)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            return
        response = await stub.AllocateMany(request, timeout=TIMEOUT)
        assert len(response.results) == len(items)
        for item, result in zip(items, response.results, strict=True):
            if not result.HasField("status"):
                assert result.turns
                continue
            code, reason, metadata, fields = reason_of(result.status)
            assert code not in (code_pb2.UNKNOWN, code_pb2.OK)
            assert REASON.fullmatch(reason)
            if code == code_pb2.INTERNAL:
                assert reason == "INTERNAL_ERROR" and metadata["correlation_id"]
            if code == code_pb2.INVALID_ARGUMENT:
                assert fields, f"{reason} without a BadRequest: {item}"
            for leak in LEAKS:
                assert leak not in result.status.message

    try:

        @settings(
            max_examples=150,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(items=st.lists(_item_messages(), max_size=12))
        def check(items: list[pb.AllocateManyItem]) -> None:
            loop.run_until_complete(send(items))

        check()
        loop.run_until_complete(
            stub.AllocateTurnId(
                pb.AllocateTurnIdRequest(thread_id=f"after-{uuid.uuid4()}", kind=REALTIME),
                timeout=TIMEOUT,
            )
        )
    finally:
        loop.run_until_complete(channel.close())
        loop.run_until_complete(server.stop(grace=0))
        asyncio.set_event_loop(None)
        loop.close()


# --- the proto ----------------------------------------------------------------------------------


def test_buf_lint_passes_with_allocate_many() -> None:
    buf = ROOT / "node_modules" / ".bin" / "buf"
    if not buf.exists() and shutil.which("buf") is None:
        pytest.skip("buf is not installed (make node-install)")
    command = str(buf) if buf.exists() else "buf"
    done = subprocess.run(
        [command, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "AllocateMany" in pb.DESCRIPTOR.services_by_name["TurnIdService"].methods_by_name


def test_the_item_status_is_wire_identical_to_google_rpc_status() -> None:
    ours = pb.Status.DESCRIPTOR
    theirs = status_pb2.Status.DESCRIPTOR
    assert [(f.name, f.number, f.type) for f in ours.fields] == [
        (f.name, f.number, f.type) for f in theirs.fields
    ]
    sample = status_pb2.Status(code=5, message="m")
    sample.details.add().Pack(error_details_pb2.ErrorInfo(reason="R", domain="turnid"))
    assert pb.Status.FromString(sample.SerializeToString()).SerializeToString() == (
        sample.SerializeToString()
    )
    assert ours.fields_by_name["details"].message_type.full_name == "google.protobuf.Any"
