"""Fixtures for the security tests: certificates, a tokens file, servers with the interceptor."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from tests.security.certs import Pki, make_pki
from turnid.service.auth import Authenticator, current_namespace, hash_token
from turnid.service.domain import TurnService
from turnid.service.servicer import SERVICE, TurnIdServicer, add_to_server
from turnid.service.stores import open_store

TOKEN_A = "tid_team-a-token-one"
TOKEN_A2 = "tid_team-a-token-two"  # a second token of team-a, as during a rotation
TOKEN_B = "tid_team-b-token"
WRONG_TOKEN = "tid_not-a-token-of-this-server"
ALL_TOKENS = (TOKEN_A, TOKEN_A2, TOKEN_B, WRONG_TOKEN)

ECHO_NAMESPACE = "/turnid.test.Echo/Namespace"
ECHO_STREAM = "/turnid.test.Echo/Stream"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tokens_text() -> str:
    return (
        "# turnid tokens\n"
        "\n"
        f"team-a {hash_token(TOKEN_A)}\n"
        f"team-a\t{hash_token(TOKEN_A2)}\n"
        f"   team-b   {hash_token(TOKEN_B)}   \n"
    )


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(tokens_text())
    path.chmod(0o600)
    return path


@pytest.fixture
def authenticator(tokens_file: Path) -> Authenticator:
    return Authenticator(str(tokens_file))


class _Echo(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A tiny service that answers with the caller's namespace (unary and server stream)."""

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        if handler_call_details.method == ECHO_NAMESPACE:

            async def unary(request: bytes, context: object) -> bytes:
                return current_namespace.get().encode()

            return grpc.unary_unary_rpc_method_handler(unary)
        if handler_call_details.method == ECHO_STREAM:

            async def stream(request: bytes, context: object) -> AsyncIterator[bytes]:
                for _ in range(2):
                    yield current_namespace.get().encode()

            return grpc.unary_stream_rpc_method_handler(stream)
        return None


@dataclass
class Served:
    port: int
    server: grpc.aio.Server

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serve(
    authenticator: Authenticator | None, credentials: grpc.ServerCredentials | None = None
) -> AsyncIterator[Served]:
    """TurnIdService (memory store), health, reflection and the echo service, as the server
    assembles them, with the authenticator's interceptor."""
    store = open_store("memory:")
    await store.open()
    interceptor = authenticator.interceptor() if authenticator is not None else None
    server = grpc.aio.server(
        interceptors=[interceptor] if interceptor is not None else None,
        options=[("grpc.so_reuseport", 0)],
    )
    add_to_server(TurnIdServicer(TurnService(store)), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE.full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server
    )
    server.add_generic_rpc_handlers((_Echo(),))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield Served(port, server)
    finally:
        await server.stop(0)
        await store.close()


def unary(channel: grpc.aio.Channel, path: str) -> Any:
    """A unary method of raw bytes (no serializers)."""
    return channel.unary_unary(path, request_serializer=None, response_deserializer=None)


def stream(channel: grpc.aio.Channel, path: str) -> Any:
    """A server-streaming method of raw bytes (no serializers)."""
    return channel.unary_stream(path, request_serializer=None, response_deserializer=None)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def no_token_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture every log record at DEBUG; afterwards, assert none carries a token."""
    caplog.set_level("DEBUG")
    yield caplog
    for record in caplog.records:
        text = record.getMessage() + str(record.args or "") + str(record.exc_text or "")
        for token in ALL_TOKENS:
            assert token not in text, f"a token in the log: {record.name}"
