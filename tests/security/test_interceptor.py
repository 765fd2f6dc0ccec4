"""Bearer tokens through the interceptor: every RPC refused without valid credentials, with the
right reason; health open; reflection and unknown methods closed; the namespace reaches the
handler; no token in any status or log line."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.grpc_helpers import error_details
from tests.security import raw_h2
from tests.security.conftest import (
    ECHO_NAMESPACE,
    ECHO_STREAM,
    TOKEN_A,
    TOKEN_A2,
    TOKEN_B,
    WRONG_TOKEN,
    bearer,
    serve,
    stream,
    unary,
)
from turnid.service.auth import Authenticator, current_namespace, hash_token
from turnid.service.servicer import SERVICE
from turnid.v1 import turnid_pb2

MISSING, INVALID = "MISSING_CREDENTIALS", "INVALID_CREDENTIALS"

MALFORMED = {
    "scheme only": (("authorization", "Bearer"),),
    "scheme and space": (("authorization", "Bearer "),),
    "two spaces": (("authorization", f"bearer  {TOKEN_A}"),),
    "lower-case scheme, wrong token": (("authorization", "bearer  x"),),
    "basic": (("authorization", "Basic dXNlcjpwYXNz"),),
    "token without scheme": (("authorization", TOKEN_A),),
    "empty": (("authorization", ""),),
    "trailing space": (("authorization", f"Bearer {TOKEN_A} "),),
    "leading space": (("authorization", f" Bearer {TOKEN_A}"),),
    "two headers, both valid": (("authorization", f"Bearer {TOKEN_A}"),) * 2,
    "two headers, one valid": (
        ("authorization", f"Bearer {TOKEN_A}"),
        ("authorization", f"Bearer {WRONG_TOKEN}"),
    ),
    "wrong token": bearer(WRONG_TOKEN),
    "a hash instead of the token": bearer(hash_token(TOKEN_A)),
    "token with a comma": (("authorization", f"Bearer {TOKEN_A},x"),),
}


def _request(method: Any) -> bytes:
    message = getattr(turnid_pb2, method.input_type.name)
    # A request the service would accept, so only the credentials can refuse it.
    fields = {"thread_id": "t"} if "thread_id" in message.DESCRIPTOR.fields_by_name else {}
    return bytes(message(**fields).SerializeToString())


async def _call(
    channel: grpc.aio.Channel, method: Any, metadata: tuple[tuple[str, str], ...] | None
) -> None:
    path = f"/{SERVICE.full_name}/{method.name}"
    if method.server_streaming:
        call = stream(channel, path)(_request(method), metadata=metadata, timeout=10)
        async for _ in call:
            break
        call.cancel()
    else:
        await unary(channel, path)(_request(method), metadata=metadata, timeout=10)


async def _refusal(
    channel: grpc.aio.Channel, method: Any, metadata: tuple[tuple[str, str], ...] | None
) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _call(channel, method, metadata)
    code, info, fields = error_details(raised.value)
    assert code == grpc.StatusCode.UNAUTHENTICATED, raised.value.details()
    assert not fields
    assert dict(info.metadata) == {}
    return str(info.reason)


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
async def test_every_rpc_needs_a_valid_token(
    authenticator: Authenticator, method: Any, no_token_in_logs: pytest.LogCaptureFixture
) -> None:
    async with serve(authenticator) as served, grpc.aio.insecure_channel(served.target) as channel:
        assert await _refusal(channel, method, None) == MISSING
        assert await _refusal(channel, method, (("x-other", "1"),)) == MISSING
        for name, metadata in MALFORMED.items():
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _call(channel, method, metadata)
            code, info, _ = error_details(raised.value)
            assert (code, info.reason) == (grpc.StatusCode.UNAUTHENTICATED, INVALID), name
            details = raised.value.details() or ""
            assert all(token not in details for token in (TOKEN_A, WRONG_TOKEN)), name
            trailing = str(raised.value.trailing_metadata())
            assert all(token not in trailing for token in (TOKEN_A, WRONG_TOKEN)), name
    assert authenticator.refusals == {MISSING: 2, INVALID: len(MALFORMED)}


async def test_a_valid_token_reaches_the_service_in_its_namespace(
    authenticator: Authenticator, no_token_in_logs: pytest.LogCaptureFixture
) -> None:
    async with serve(authenticator) as served, grpc.aio.insecure_channel(served.target) as channel:
        allocate = channel.unary_unary(
            f"/{SERVICE.full_name}/AllocateTurnId",
            request_serializer=turnid_pb2.AllocateTurnIdRequest.SerializeToString,
            response_deserializer=turnid_pb2.AllocateTurnIdResponse.FromString,
        )
        request = turnid_pb2.AllocateTurnIdRequest(
            thread_id="t", kind=turnid_pb2.TURN_KIND_AUTO_COMPACTION
        )
        # Both tokens of team-a (a rotation) share its threads; team-b has its own.
        first = await allocate(request, metadata=bearer(TOKEN_A))
        second = await allocate(request, metadata=bearer(TOKEN_A2))
        other = await allocate(request, metadata=bearer(TOKEN_B))
        lower = await allocate(request, metadata=(("authorization", f"bearer {TOKEN_A}"),))
        assert [r.turn.turn_id for r in (first, second, other, lower)] == [
            "auto-compact-0",
            "auto-compact-1",
            "auto-compact-0",
            "auto-compact-2",
        ]
        echo = await unary(channel, ECHO_NAMESPACE)(b"", metadata=bearer(TOKEN_B))
        assert echo == b"team-b"
        streamed = [m async for m in stream(channel, ECHO_STREAM)(b"", metadata=bearer(TOKEN_A))]
        assert streamed == [b"team-a", b"team-a"]
    assert not authenticator.refusals


async def test_watch_turns_streams_for_a_valid_token(authenticator: Authenticator) -> None:
    async with serve(authenticator) as served, grpc.aio.insecure_channel(served.target) as channel:
        watch = channel.unary_stream(
            f"/{SERVICE.full_name}/WatchTurns",
            request_serializer=turnid_pb2.WatchTurnsRequest.SerializeToString,
            response_deserializer=turnid_pb2.WatchTurnsResponse.FromString,
        )(turnid_pb2.WatchTurnsRequest(thread_id="t"), metadata=bearer(TOKEN_A), timeout=10)
        first = await anext(aiter(watch))
        assert first.caught_up
        watch.cancel()


async def test_health_is_open_without_credentials(authenticator: Authenticator) -> None:
    async with serve(authenticator) as served, grpc.aio.insecure_channel(served.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        response = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert (await anext(aiter(watch))).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        # A malformed token does not close health either: it does not look at credentials.
        response = await health.Check(
            health_pb2.HealthCheckRequest(), metadata=(("authorization", "Basic x"),), timeout=10
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert not authenticator.refusals


async def _list_services(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] | None
) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
        metadata=metadata,
        timeout=10,
    )
    names: list[str] = []
    async for response in responses:
        names.extend(s.name for s in response.list_services_response.service)
    return names


async def test_reflection_needs_credentials(authenticator: Authenticator) -> None:
    async with serve(authenticator) as served, grpc.aio.insecure_channel(served.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _list_services(channel, None)
        code, info, _ = error_details(raised.value)
        assert (code, info.reason) == (grpc.StatusCode.UNAUTHENTICATED, MISSING)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _list_services(channel, bearer(WRONG_TOKEN))
        assert error_details(raised.value)[1].reason == INVALID
        assert SERVICE.full_name in await _list_services(channel, bearer(TOKEN_A))


async def test_unknown_methods_are_unauthenticated_until_authenticated(
    authenticator: Authenticator,
) -> None:
    """An unauthenticated peer cannot even probe which methods exist."""
    async with serve(authenticator) as served, grpc.aio.insecure_channel(served.target) as channel:
        unknown = unary(channel, "/turnid.v1.TurnIdService/DeleteEverything")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await unknown(b"", timeout=10)
        assert error_details(raised.value)[:2][1].reason == MISSING
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await unknown(b"", metadata=bearer(TOKEN_A), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Health's own unknown methods stay as gRPC answers them.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await unary(channel, "/grpc.health.v1.Health/Nope")(b"", timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    "value",
    ["Bearer tök".encode(), b"Bearer t\xffk", b"Bearer t\x01k", "Bearer tid_é".encode()],
    ids=["utf-8", "latin-1", "control", "prefix-utf-8"],
)
async def test_non_ascii_authorization_is_invalid(
    authenticator: Authenticator, value: bytes
) -> None:
    """grpc's clients will not send such a header, but any peer can (raw HTTP/2 here)."""
    async with serve(authenticator) as served:
        code, message, _ = await asyncio.to_thread(
            raw_h2.call,
            "127.0.0.1",
            served.port,
            f"/{SERVICE.full_name}/GetTurn",
            [(b"authorization", value)],
        )
    assert code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert "malformed" in message
    assert authenticator.refusals == {INVALID: 1}


async def test_raw_http2_client_sees_a_valid_token_accepted(authenticator: Authenticator) -> None:
    """The raw client is faithful: the same path with a valid token gets the service's answer."""
    async with serve(authenticator) as served:
        code, message, _ = await asyncio.to_thread(
            raw_h2.call,
            "127.0.0.1",
            served.port,
            f"/{SERVICE.full_name}/GetTurn",
            [(b"authorization", f"Bearer {TOKEN_A}".encode())],
            turnid_pb2.GetTurnRequest(thread_id="t", turn_id="x").SerializeToString(),
        )
    assert code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no turn" in message


def _write(path: Path, text: str) -> None:
    path.write_text(text)


async def test_reload_takes_effect_for_the_next_call(
    authenticator: Authenticator, tokens_file: Path, no_token_in_logs: pytest.LogCaptureFixture
) -> None:
    async with serve(authenticator) as served, grpc.aio.insecure_channel(served.target) as channel:
        echo = unary(channel, ECHO_NAMESPACE)
        assert await echo(b"", metadata=bearer(TOKEN_A)) == b"team-a"
        # Rotation's last step: the old token's line goes, the new one stays.
        _write(tokens_file, f"team-a {hash_token(TOKEN_A2)}\n")
        assert authenticator.reload()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await echo(b"", metadata=bearer(TOKEN_A))
        assert error_details(raised.value)[1].reason == INVALID
        assert await echo(b"", metadata=bearer(TOKEN_A2)) == b"team-a"
        # A broken file keeps what was loaded.
        _write(tokens_file, f"team-a {hash_token(TOKEN_B).upper()}\n")
        assert not authenticator.reload()
        assert await echo(b"", metadata=bearer(TOKEN_A2)) == b"team-a"


async def test_refusals_are_logged_without_the_token(
    authenticator: Authenticator, no_token_in_logs: pytest.LogCaptureFixture
) -> None:
    async with serve(authenticator) as served, grpc.aio.insecure_channel(served.target) as channel:
        echo = unary(channel, ECHO_NAMESPACE)
        with pytest.raises(grpc.aio.AioRpcError):
            await echo(b"", metadata=bearer(WRONG_TOKEN))
        with pytest.raises(grpc.aio.AioRpcError):
            await echo(b"", metadata=(("authorization", f"Basic {TOKEN_A}"),))
    lines = [r.getMessage() for r in no_token_in_logs.records if r.name == "turnid.auth"]
    assert any("unknown token" in line and ECHO_NAMESPACE in line for line in lines), lines
    # Refused calls never reach the servicer, so the interceptor writes their access lines.
    access = [r for r in no_token_in_logs.records if r.name == "turnid.access"]
    assert [(r.levelname, r.code, r.reason) for r in access] == [  # type: ignore[attr-defined]
        ("INFO", "UNAUTHENTICATED", "INVALID_CREDENTIALS")
    ] * 2


def test_interceptor_is_none_when_auth_is_off() -> None:
    authenticator = Authenticator()
    assert not authenticator.enabled
    assert authenticator.interceptor() is None
    assert Authenticator(client_cert_namespaces=True).enabled


async def test_auth_off_is_the_default_namespace() -> None:
    async with serve(None) as served, grpc.aio.insecure_channel(served.target) as channel:
        assert await unary(channel, ECHO_NAMESPACE)(b"", timeout=10) == b""
        # A token sent to a server with auth off is ignored, not an error.
        assert await unary(channel, ECHO_NAMESPACE)(b"", metadata=bearer(TOKEN_A)) == b""


class _FakeContext:
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


async def test_handlers_are_wrapped_once_per_method_and_the_namespace_is_scoped(
    authenticator: Authenticator,
) -> None:
    seen: list[str] = []

    async def behavior(request: bytes, context: object) -> bytes:
        seen.append(current_namespace.get())
        return request

    handler = grpc.unary_unary_rpc_method_handler(behavior)
    interceptor = authenticator.interceptor()
    assert interceptor is not None

    async def continuation(details: object) -> Any:
        return handler

    details = types.SimpleNamespace(method="/x.Y/Z", invocation_metadata=())
    first = await interceptor.intercept_service(continuation, details)  # type: ignore[arg-type]
    again = await interceptor.intercept_service(continuation, details)  # type: ignore[arg-type]
    assert first is again and first is not handler
    wrapped: Any = first.unary_unary
    assert await wrapped(b"r", _FakeContext(bearer(TOKEN_B))) == b"r"
    assert seen == ["team-b"]
    assert current_namespace.get() == ""  # set only for the handler's duration
