"""Fuzzed requests over gRPC, against an in-process server (memory: and a SQLite file).

Invariant 7: bad input gets a clear error, never INTERNAL (unless something really broke, and
then with reason INTERNAL_ERROR and a correlation id), never UNKNOWN, never a crash. Every
error follows AIP-193: exactly one ErrorInfo, domain `turnid`, an UPPER_SNAKE reason, and a
BadRequest naming the field for a bad field. After the fuzz the server still answers a good
call.

Three kinds of input, to every RPC the service descriptor lists (server-streaming ones are
called as streams): random bytes; structured garbage (random field numbers and wire types,
including invalid UTF-8 in string fields); and well-formed messages whose fields hold
hostile values (unicode, control characters, huge strings, integer extremes, unknown enum
numbers), with a pool of valid thread ids mixed in so that some calls reach the store.

Each store runs on one event loop that the test creates; hypothesis runs each example on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turnid.service.config import ServerConfig
from turnid.service.server import TurnIdServer
from turnid.v1 import turnid_pb2 as pb

from .grpc_helpers import error_details

SERVICE = pb.DESCRIPTOR.services_by_name["TurnIdService"]
METHODS = list(SERVICE.methods)
CALL_TIMEOUT = 10.0
MESSAGE_LIMIT = ServerConfig().max_message_bytes  # --max-message-bytes, enforced by gRPC
REASON = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")
# What must never reach a client (invariant 7: no internals in the message).
LEAKS = ("Traceback", 'File "', "sqlite3.", "psycopg", "OperationalError", "IntegrityError")

FUZZ_SETTINGS = settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@contextlib.contextmanager
def running(database: str) -> Iterator[tuple[asyncio.AbstractEventLoop, grpc.aio.Channel]]:
    loop = asyncio.new_event_loop()
    server = TurnIdServer(ServerConfig(listen="127.0.0.1:0", database=database))
    loop.run_until_complete(server.start())

    async def open_channel() -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(server.target)

    channel = loop.run_until_complete(open_channel())
    try:
        yield loop, channel
        loop.run_until_complete(still_answers(channel))
    finally:
        loop.run_until_complete(channel.close())
        loop.run_until_complete(server.stop(grace=0))
        loop.close()


@pytest.fixture(params=["memory", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory:" if request.param == "memory" else f"sqlite://{tmp_path / 'fuzz.db'}"


# --- one call and what its answer must look like ---------------------------------------------


def check_error(method: str, error: grpc.aio.AioRpcError) -> None:
    code = error.code()
    assert code is not grpc.StatusCode.UNKNOWN, f"{method}: UNKNOWN: {error.details()}"
    assert code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED), (
        f"{method}: no answer within {CALL_TIMEOUT} s ({code.name})"
    )
    _, info, fields = error_details(error)  # exactly one ErrorInfo, domain turnid
    assert REASON.fullmatch(info.reason), f"{method}: reason {info.reason!r} is not UPPER_SNAKE"
    if code is grpc.StatusCode.INTERNAL:
        assert info.reason == "INTERNAL_ERROR", f"{method}: INTERNAL with reason {info.reason}"
        assert info.metadata.get("correlation_id"), f"{method}: INTERNAL without correlation_id"
    if code is grpc.StatusCode.INVALID_ARGUMENT and info.reason != "MALFORMED_REQUEST":
        assert fields, f"{method}: INVALID_ARGUMENT/{info.reason} without a BadRequest field"
    message = error.details() or ""
    for leak in LEAKS:
        assert leak not in message, f"{method}: the message leaks internals: {message!r}"


async def call(channel: grpc.aio.Channel, method: Any, payload: bytes) -> None:
    """Send raw request bytes to `method`; check the answer, whatever it is. A request above
    the server's message limit (AllocateMany's items can add up past it) is gRPC's to refuse,
    before the service sees it: RESOURCE_EXHAUSTED with no ErrorInfo, as
    test_oversized_request_is_refused pins."""
    path = f"/{SERVICE.full_name}/{method.name}"
    if len(payload) > MESSAGE_LIMIT:
        assert not method.server_streaming, f"{method.name}: a stream's request cannot get here"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary(path)(payload, timeout=CALL_TIMEOUT)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        return
    response_type = getattr(pb, method.output_type.name)
    try:
        if method.server_streaming:
            stream = channel.unary_stream(
                path, request_serializer=None, response_deserializer=None
            )(payload, timeout=CALL_TIMEOUT)
            try:
                first = await stream.read()
            finally:
                stream.cancel()
            assert first is not grpc.aio.EOF, f"{method.name}: the stream ended with no message"
            response_type.FromString(first)
        else:
            raw = await channel.unary_unary(
                path, request_serializer=None, response_deserializer=None
            )(payload, timeout=CALL_TIMEOUT)
            response_type.FromString(raw)
    except grpc.aio.AioRpcError as error:
        check_error(method.name, error)


async def still_answers(channel: grpc.aio.Channel) -> None:
    """After the fuzz: health SERVING, and an allocation that reads back."""
    health = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=CALL_TIMEOUT
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    thread_id = f"after-fuzz-{uuid.uuid4()}"
    allocate = channel.unary_unary(
        f"/{SERVICE.full_name}/AllocateTurnId",
        request_serializer=pb.AllocateTurnIdRequest.SerializeToString,
        response_deserializer=pb.AllocateTurnIdResponse.FromString,
    )
    get = channel.unary_unary(
        f"/{SERVICE.full_name}/GetTurn",
        request_serializer=pb.GetTurnRequest.SerializeToString,
        response_deserializer=pb.GetTurnResponse.FromString,
    )
    made = await allocate(
        pb.AllocateTurnIdRequest(thread_id=thread_id, kind=pb.TURN_KIND_AUTO_COMPACTION),
        timeout=CALL_TIMEOUT,
    )
    assert (made.turn.turn_id, made.turn.sequence) == ("auto-compact-0", 1)
    read = await get(
        pb.GetTurnRequest(thread_id=thread_id, turn_id="auto-compact-0"), timeout=CALL_TIMEOUT
    )
    assert read.turn == made.turn


# --- strategies ------------------------------------------------------------------------------

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
THREAD_POOL = ("fuzz-thread-1", "fuzz-thread-2", "ターン")
TURN_POOL = (
    "auto-compact-0",
    "auto-compact-1",
    "rollout-1",
    "0190a0a0-0000-7000-8000-000000000000",
)

hostile_text = st.one_of(
    st.sampled_from(THREAD_POOL + TURN_POOL),
    st.text(max_size=40),  # any code point but surrogates: control, format, separators...
    st.text(st.characters(codec="ascii"), max_size=20),
    st.sampled_from(
        [
            *("", " ", "\x00", "\n", "\t", "a b", "\x7f", "\u200b", "\ufeff", "\u2028", "🙂"),
            *("auto-compact-", "auto-compact--1", "auto-compact-99999999999999999999"),
        ]
    ),
    st.builds(
        lambda char, n: char * n,
        st.sampled_from(["a", "é", "🙂", "\x00", "~"]),
        # Up to 16 KB a field, so a one-field request stays below the server's message limit
        # (64 KB, --max-message-bytes); AllocateMany's items may add up past it (see call).
        st.sampled_from([127, 128, 129, 255, 256, 257, 1000, 4096]),
    ),
)


def integers(bounds: tuple[int, int], specials: list[int]) -> st.SearchStrategy[int]:
    low, high = bounds
    return st.one_of(st.sampled_from([low, high, *specials]), st.integers(low, high))


def field_values(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.name == "thread_id":  # mostly valid threads, so that calls reach the store
        return st.sampled_from(THREAD_POOL) | st.sampled_from(THREAD_POOL) | hostile_text
    if field.type == FieldDescriptor.TYPE_STRING:
        return hostile_text
    if field.type == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: any int32 goes
        return integers(INT32, [0, 1, 2, 3, 4, -1, 99])
    if field.type == FieldDescriptor.TYPE_INT32:
        return integers(INT32, [0, 1, -1, 5, 100, 1000, 1001])
    if field.type == FieldDescriptor.TYPE_INT64:
        return integers(INT64, [0, 1, -1, 2, 2**31, 2**53 + 1])
    if field.type == FieldDescriptor.TYPE_MESSAGE:  # AllocateMany's items: requests in requests
        inner = nested(getattr(pb, field.message_type.name))
        return st.lists(inner, max_size=5) if field.is_repeated else inner
    raise AssertionError(f"the fuzz does not know field type {field.type} ({field.full_name})")


def nested(message_type: Any) -> st.SearchStrategy[Any]:
    """A message of `message_type` with hostile field values; for a oneof, one member or none."""
    descriptor = message_type.DESCRIPTOR
    # Real oneofs only: proto3 `optional` makes a synthetic one ("_name") per optional field.
    oneofs = [oneof for oneof in descriptor.oneofs if not oneof.name.startswith("_")]
    members = {f.name for oneof in oneofs for f in oneof.fields}
    plain = {
        f.name: (st.none() | field_values(f)) if f.has_presence else field_values(f)
        for f in descriptor.fields
        if f.name not in members
    }
    chosen = st.sampled_from([None, *sorted(members)]) if members else st.none()

    def build(values: dict[str, Any], member: str | None) -> Any:
        kept = {k: v for k, v in values.items() if v is not None}
        if member is not None:
            kept[member] = getattr(pb, descriptor.fields_by_name[member].message_type.name)()
        return message_type(**kept)

    def fill(message: Any) -> st.SearchStrategy[Any]:
        member = message.WhichOneof(oneofs[0].name) if oneofs else None
        if member is None:
            return st.just(message)
        inner_type = getattr(pb, descriptor.fields_by_name[member].message_type.name)
        return nested(inner_type).map(lambda inner: message_type(**{member: inner}))

    return st.builds(build, st.fixed_dictionaries(plain), chosen).flatmap(fill)


def messages(method: Any) -> st.SearchStrategy[bytes]:
    """Well-formed requests of `method`'s type with hostile field values."""
    message_type = getattr(pb, method.input_type.name)
    fields = {
        f.name: (st.none() | field_values(f)) if f.has_presence else field_values(f)
        for f in method.input_type.fields
    }

    def build(values: dict[str, Any]) -> bytes:
        message = message_type(**{k: v for k, v in values.items() if v is not None})
        return message.SerializeToString()  # type: ignore[no-any-return]

    return st.fixed_dictionaries(fields).map(build)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Protobuf-shaped bytes: known and unknown field numbers with any wire type, strings
    that are not UTF-8, truncated lengths, varints past 64 bits."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        number = draw(st.one_of(st.integers(1, 6), st.integers(1, 2**29 - 1)))
        wire = draw(st.integers(0, 7))
        out += _varint(number << 3 | wire)
        if wire == 0:
            out += _varint(draw(st.integers(0, 2**70)))
        elif wire == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire == 2:
            body = draw(st.one_of(st.binary(max_size=40), st.just(b"\xff\xfe\xc0\x80")))
            claimed = len(body) + draw(st.sampled_from([0, 0, 0, 1, -1, 1000]))
            out += _varint(max(claimed, 0)) + body
        elif wire == 5:
            out += draw(st.binary(min_size=4, max_size=4))
    return bytes(out)


# --- the tests -------------------------------------------------------------------------------


def test_random_bytes_to_every_rpc(database: str) -> None:
    with running(database) as (loop, channel):

        @FUZZ_SETTINGS
        @given(method=st.sampled_from(METHODS), payload=st.binary(max_size=512) | garbage())
        def check(method: Any, payload: bytes) -> None:
            loop.run_until_complete(call(channel, method, payload))

        check()


def test_hostile_field_values_in_every_rpc(database: str) -> None:
    with running(database) as (loop, channel):

        @FUZZ_SETTINGS
        @given(data=st.data(), method=st.sampled_from(METHODS))
        def check(data: st.DataObject, method: Any) -> None:
            payload = data.draw(messages(method), label=method.name)
            loop.run_until_complete(call(channel, method, payload))

        check()


def test_oversized_request_is_refused(database: str) -> None:
    """Above --max-message-bytes gRPC itself refuses the request, RESOURCE_EXHAUSTED (it never
    reaches the service, so it carries no ErrorInfo); the server goes on answering."""
    limit = ServerConfig().max_message_bytes
    with running(database) as (loop, channel):
        for method in METHODS:
            payload = pb.GetTurnRequest(thread_id="t", turn_id="x" * limit).SerializeToString()
            path = f"/{SERVICE.full_name}/{method.name}"

            async def send(path: str = path, payload: bytes = payload) -> grpc.StatusCode:
                try:
                    await channel.unary_unary(path)(payload, timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as error:
                    return error.code()
                raise AssertionError(f"{path}: a {len(payload)}-byte request was accepted")

            if not method.server_streaming:
                assert loop.run_until_complete(send()) is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_every_rpc_is_fuzzed() -> None:
    """The fuzz follows the descriptor: a new RPC or field type cannot slip past it."""
    assert {m.name for m in METHODS} >= {
        "AllocateTurnId",
        "BatchAllocateTurnIds",
        "ClaimTurnId",
        "GetTurn",
        "ListTurns",
        "GetThread",
        "WatchTurns",
    }
    for method in METHODS:
        for field in method.input_type.fields:
            field_values(field)
