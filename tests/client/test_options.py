"""Connection options and what goes on the wire: the bearer token and one request_id per call."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from turnid.client import (
    NO_RETRY,
    AsyncTurnIdClient,
    ConnectOptions,
    RetryPolicy,
    TurnIdClient,
    Unavailable,
)
from turnid.service.domain import TurnService
from turnid.service.servicer import TurnIdServicer, add_to_server
from turnid.service.stores.memory import MemoryStore
from turnid.testing import TurnIdTestServer

WAIT = 30.0


class Recorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records each attempt's metadata and request; signals after `signal_after` attempts."""

    def __init__(self, signal_after: int) -> None:
        self.attempts: list[tuple[dict[str, str], Any]] = []
        self.signal_after = signal_after
        self.enough = threading.Event()

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], details: Any, request: Any
    ) -> Any:
        self.attempts.append((dict(details.metadata or ()), request))
        if len(self.attempts) >= self.signal_after:
            self.enough.set()
        return continuation(details, request)


def test_every_attempt_carries_the_same_request_id_and_the_token(
    turnid_server: TurnIdTestServer, thread_id: str
) -> None:
    recorder = Recorder(signal_after=3)
    client = TurnIdClient(
        turnid_server.target,
        token="s3cret",
        timeout=WAIT,
        retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.05),
        interceptors=[recorder],
    )
    turnid_server.stop()
    with client, ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.user_input, thread_id)
        assert recorder.enough.wait(WAIT), "the call was not retried"
        turnid_server.start()
        turn = call.result(WAIT)
    assert len(recorder.attempts) >= 3
    assert {request.request_id for _, request in recorder.attempts} == {turn.request_id}
    assert all(meta["authorization"] == "Bearer s3cret" for meta, _ in recorder.attempts)


def test_connect_options() -> None:
    plain = ConnectOptions()
    assert plain.target == "127.0.0.1:50051"
    assert not plain.uses_tls
    assert plain.credentials() is None
    assert plain.metadata() == ()
    assert ConnectOptions(tls=True).uses_tls
    assert ConnectOptions(root_certificates=b"pem").uses_tls
    options = dict(
        ConnectOptions(channel_options=[("grpc.max_reconnect_backoff_ms", 500)]).grpc_options()
    )
    assert options["grpc.max_reconnect_backoff_ms"] == 500  # the caller's option wins
    with pytest.raises(ValueError, match="together"):
        ConnectOptions(private_key=b"key")
    with pytest.raises(ValueError, match="timeout"):
        ConnectOptions(timeout=0)


def _make_certificates(directory: Path) -> dict[str, bytes]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=turnid test CA",
    )
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        openssl(
            "req",
            *ec,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=turnid test {name}",
        )
        (directory / f"{name}.ext").write_text(extension + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
        )
    return {path.name: path.read_bytes() for path in directory.iterdir()}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_with_client_certificates_against_a_mutual_tls_server(
    tmp_path: Path, thread_id: str
) -> None:
    pem = _make_certificates(tmp_path)
    server = grpc.aio.server()
    add_to_server(TurnIdServicer(TurnService(MemoryStore())), server)
    credentials = grpc.ssl_server_credentials(
        [(pem["server.key"], pem["server.pem"])],
        root_certificates=pem["ca.pem"],
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    target = f"127.0.0.1:{port}"
    try:
        async with AsyncTurnIdClient(
            target,
            root_certificates=pem["ca.pem"],
            private_key=pem["client.key"],
            certificate_chain=pem["client.pem"],
            timeout=WAIT,
        ) as client:
            assert (await client.auto_compaction(thread_id)).turn_id == "auto-compact-0"
        # Without a client certificate the handshake fails: the certificate really was used.
        async with AsyncTurnIdClient(
            target, root_certificates=pem["ca.pem"], timeout=2, retry=NO_RETRY
        ) as anonymous:
            with pytest.raises(Unavailable):
                await anonymous.auto_compaction(thread_id)
    finally:
        await server.stop(0)


def test_retry_policy_backoff_grows_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.5, multiplier=2, jitter=0.2)
    for _ in range(50):
        assert 0.08 <= policy.delay(1) <= 0.12
        assert 0.16 <= policy.delay(2) <= 0.24
        assert 0.4 <= policy.delay(10) <= 0.6
    assert RetryPolicy(max_attempts=2).allows(1)
    assert not RetryPolicy(max_attempts=2).allows(2)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=2)
