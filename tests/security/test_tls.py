"""TLS and mutual TLS with certificates made at test time: plaintext is refused, client
certificates are required and verified, the common name is the namespace in mTLS-only mode,
and certificate files are reloaded when they change."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.grpc_helpers import error_details
from tests.security.certs import Authority, Pair, Pki
from tests.security.conftest import (
    ECHO_NAMESPACE,
    ECHO_STREAM,
    TOKEN_A,
    TOKEN_B,
    bearer,
    serve,
    stream,
    unary,
)
from turnid.service.auth import Authenticator, server_credentials
from turnid.service.servicer import SERVICE
from turnid.v1 import turnid_pb2

# A fresh subchannel per channel: a new channel must mean a new connection and handshake.
OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


def tls_channel(target: str, root: bytes, client: Pair | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.aio.secure_channel(target, credentials, OPTIONS)


async def health_check(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    return int(response.status)


async def refused_at_connect(channel: grpc.aio.Channel) -> None:
    """The call fails before any RPC: the TLS handshake (or the plaintext framing) failed."""
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health_check(channel)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def mtls(pki: Pki) -> grpc.ServerCredentials:
    return server_credentials(
        str(pki.server.cert_file), str(pki.server.key_file), str(pki.ca.cert_file)
    )


async def test_tls_serves_and_plaintext_is_refused(pki: Pki, authenticator: Authenticator) -> None:
    credentials = server_credentials(str(pki.server.cert_file), str(pki.server.key_file))
    async with serve(authenticator, credentials) as served:
        async with tls_channel(served.target, pki.ca.cert) as channel:
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
            echo = unary(channel, ECHO_NAMESPACE)
            assert await echo(b"", metadata=bearer(TOKEN_A), timeout=10) == b"team-a"
            # A client certificate is optional without a client CA; the token decides.
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await echo(b"", timeout=10)
            assert error_details(raised.value)[1].reason == "MISSING_CREDENTIALS"
        await refused_at_connect(grpc.aio.insecure_channel(served.target, OPTIONS))
        # A client that does not trust the server's CA does not talk to it.
        await refused_at_connect(tls_channel(served.target, pki.foreign_ca.cert))


async def test_plaintext_server_refuses_a_tls_client(pki: Pki) -> None:
    async with serve(None) as served:
        await refused_at_connect(tls_channel(served.target, pki.ca.cert))


async def test_mutual_tls_requires_a_certificate_from_the_client_ca(
    pki: Pki, authenticator: Authenticator
) -> None:
    async with serve(authenticator, mtls(pki)) as served:
        async with tls_channel(served.target, pki.ca.cert, pki.client) as channel:
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
            # With a tokens file the token decides the namespace, not the certificate's name.
            echo = unary(channel, ECHO_NAMESPACE)
            assert await echo(b"", metadata=bearer(TOKEN_B), timeout=10) == b"team-b"
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await echo(b"", timeout=10)
            assert error_details(raised.value)[1].reason == "MISSING_CREDENTIALS"
        # No client certificate, a foreign CA's certificate, plaintext: no connection at all,
        # not even to health.
        await refused_at_connect(tls_channel(served.target, pki.ca.cert))
        await refused_at_connect(tls_channel(served.target, pki.ca.cert, pki.foreign_client))
        await refused_at_connect(grpc.aio.insecure_channel(served.target, OPTIONS))


async def test_mtls_only_the_common_name_is_the_namespace(pki: Pki, tmp_path: Path) -> None:
    authenticator = Authenticator(client_cert_namespaces=True)
    team_b = pki.ca.issue("team-b", common_name="team-b")
    async with serve(authenticator, mtls(pki)) as served:
        async with tls_channel(served.target, pki.ca.cert, pki.client) as channel:
            assert await unary(channel, ECHO_NAMESPACE)(b"", timeout=10) == b"team-a"
            call = stream(channel, ECHO_STREAM)(b"", timeout=10)
            assert [m async for m in call] == [b"team-a", b"team-a"]
            # A bearer token does not change the namespace here: the certificate decides.
            echo = unary(channel, ECHO_NAMESPACE)
            assert await echo(b"", metadata=bearer(TOKEN_B), timeout=10) == b"team-a"

        # The real service: each certificate's name is its own namespace.
        request = turnid_pb2.AllocateTurnIdRequest(
            thread_id="t", kind=turnid_pb2.TURN_KIND_AUTO_COMPACTION
        )
        ids = []
        for client in (pki.client, pki.client, team_b):
            async with tls_channel(served.target, pki.ca.cert, client) as channel:
                allocate = channel.unary_unary(
                    f"/{SERVICE.full_name}/AllocateTurnId",
                    request_serializer=turnid_pb2.AllocateTurnIdRequest.SerializeToString,
                    response_deserializer=turnid_pb2.AllocateTurnIdResponse.FromString,
                )
                ids.append((await allocate(request, timeout=10)).turn.turn_id)
        assert ids == ["auto-compact-0", "auto-compact-1", "auto-compact-0"]
    assert not authenticator.refusals


@pytest.mark.parametrize("name", ["Team A", "team/a", "-team", "tëam"])
async def test_mtls_only_a_common_name_that_is_no_namespace_is_refused(pki: Pki, name: str) -> None:
    authenticator = Authenticator(client_cert_namespaces=True)
    client = pki.ca.issue("odd-name", common_name=name)
    async with (
        serve(authenticator, mtls(pki)) as served,
        tls_channel(served.target, pki.ca.cert, client) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await unary(channel, ECHO_NAMESPACE)(b"", timeout=10)
        code, info, _ = error_details(raised.value)
        assert (code, info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
        assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_mtls_only_a_certificate_with_two_common_names_gets_the_first(pki: Pki) -> None:
    """gRPC reports one common name per certificate (the first); the CA chose both names."""
    authenticator = Authenticator(client_cert_namespaces=True)
    client = pki.ca.issue("two-names", common_name="team-x", extra_common_names=("team-y",))
    async with (
        serve(authenticator, mtls(pki)) as served,
        tls_channel(served.target, pki.ca.cert, client) as channel,
    ):
        assert await unary(channel, ECHO_NAMESPACE)(b"", timeout=10) == b"team-x"


def test_namespace_for_certificate() -> None:
    assert Authenticator.namespace_for_certificate({"x509_common_name": [b"team-a"]}) == "team-a"
    for context, reason in [
        ({}, "MISSING_CREDENTIALS"),
        ({"transport_security_type": [b"ssl"]}, "MISSING_CREDENTIALS"),
        ({"x509_common_name": [b"a", b"b"]}, "INVALID_CREDENTIALS"),
        ({"x509_common_name": ["tëam".encode()]}, "INVALID_CREDENTIALS"),
        ({"x509_common_name": [b""]}, "INVALID_CREDENTIALS"),
    ]:
        with pytest.raises(Exception) as raised:
            Authenticator.namespace_for_certificate(context)
        assert getattr(raised.value, "reason", None) == reason, context


@pytest.mark.parametrize(
    "which", ["missing cert", "missing key", "key of another cert", "bad CA", "encrypted key"]
)
def test_bad_certificate_files_are_a_clear_value_error(
    pki: Pki, tmp_path: Path, which: str
) -> None:
    cert, key, ca = str(pki.server.cert_file), str(pki.server.key_file), str(pki.ca.cert_file)
    if which == "missing cert":
        cert = str(tmp_path / "nope.pem")
    elif which == "missing key":
        key = str(tmp_path / "nope.key")
    elif which == "key of another cert":
        key = str(pki.client.key_file)
    elif which == "bad CA":
        (tmp_path / "ca.pem").write_text("not a certificate\n")
        ca = str(tmp_path / "ca.pem")
    else:
        from cryptography.hazmat.primitives import serialization

        private = serialization.load_pem_private_key(pki.server.key, None)
        encrypted = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        (tmp_path / "encrypted.key").write_bytes(encrypted)
        key = str(tmp_path / "encrypted.key")
    with pytest.raises(ValueError) as raised:
        server_credentials(cert, key, ca)
    message = str(raised.value)
    assert "\n" not in message and "TLS" in message
    assert "secret" not in message
    assert "BEGIN" not in message  # no PEM material in messages


async def test_certificates_are_reloaded_when_the_files_change(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A new server certificate (here from a new CA) is used by the next connection; files
    that do not fit together are logged and the server keeps the ones it has."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(pki.server.cert_file, cert)
    shutil.copy(pki.server.key_file, key)
    credentials = server_credentials(str(cert), str(key))
    new_ca = Authority(tmp_path / "new-ca", name="the next CA")
    new_server = new_ca.issue("server", server=True)
    caplog.set_level("INFO", "turnid.tls")
    async with serve(None, credentials) as served:
        async with tls_channel(served.target, pki.ca.cert) as channel:
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING

            _replace(cert, new_server.cert)
            _replace(key, new_server.key)
            async with tls_channel(served.target, new_ca.cert) as renewed:
                assert await health_check(renewed) == health_pb2.HealthCheckResponse.SERVING
            assert "TLS certificate reloaded" in caplog.text
            # The connection that was open keeps working on the old certificate.
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
        await refused_at_connect(tls_channel(served.target, pki.ca.cert))

        # Half a rotation: a certificate whose key is not the one in the key file.
        _replace(cert, pki.server.cert)
        async with tls_channel(served.target, new_ca.cert) as channel:
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
        assert "cannot be used; keeping the old ones" in caplog.text
        assert "BEGIN" not in caplog.text

        # The key arrives: the pair now fits and is taken.
        _replace(key, pki.server.key)
        async with tls_channel(served.target, pki.ca.cert) as channel:
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING


def _replace(path: Path, content: bytes) -> None:
    """Write a new version as a deployment tool would: a new file renamed over the old."""
    fresh = path.with_suffix(".new")
    fresh.write_bytes(content)
    fresh.replace(path)
