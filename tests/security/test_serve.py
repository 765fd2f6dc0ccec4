"""The real server with TLS and tokens: in-process `TurnIdServer` with the real client, and
`turnid serve` / `turnid token create` as subprocesses (SIGHUP reload, bad files)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.serve_process import ServeProcess, serve_command
from tests.security.certs import Pki
from tests.security.conftest import ALL_TOKENS, TOKEN_A, TOKEN_A2, TOKEN_B, WRONG_TOKEN
from turnid.client import AsyncTurnIdClient, TurnIdClient
from turnid.client.errors import Unauthenticated, Unavailable
from turnid.service.auth import hash_token
from turnid.service.config import ServerConfig
from turnid.service.server import TurnIdServer


class _Server:
    def __init__(self, **security: str) -> None:
        config = ServerConfig(listen="127.0.0.1:0", database="memory:")
        config = dataclasses.replace(config, **security)  # type: ignore[arg-type]
        self.server = TurnIdServer(config)

    async def __aenter__(self) -> TurnIdServer:
        await self.server.start()
        return self.server

    async def __aexit__(self, *_: object) -> None:
        await self.server.stop(0)


async def test_tls_and_tokens_with_the_real_client(pki: Pki, tokens_file: Path) -> None:
    async with _Server(
        tls_cert=str(pki.server.cert_file),
        tls_key=str(pki.server.key_file),
        auth_tokens=str(tokens_file),
    ) as server:
        target, ca = server.target, pki.ca.cert
        async with (
            AsyncTurnIdClient(target, token=TOKEN_A, root_certificates=ca) as a,
            AsyncTurnIdClient(target, token=TOKEN_A2, root_certificates=ca) as a2,
            AsyncTurnIdClient(target, token=TOKEN_B, root_certificates=ca) as b,
        ):
            assert (await a.auto_compaction("t")).turn_id == "auto-compact-0"
            assert (await a2.auto_compaction("t")).turn_id == "auto-compact-1"
            assert (await b.auto_compaction("t")).turn_id == "auto-compact-0"
            assert (await a.get_thread("t")).last_sequence == 2
            assert (await b.get_thread("t")).last_sequence == 1
        for token, reason in [(None, "MISSING_CREDENTIALS"), (WRONG_TOKEN, "INVALID_CREDENTIALS")]:
            async with AsyncTurnIdClient(target, token=token, root_certificates=ca) as client:
                with pytest.raises(Unauthenticated) as raised:
                    await client.auto_compaction("t")
                assert raised.value.reason == reason
                assert WRONG_TOKEN not in str(raised.value)
                assert await client.check_health()  # health stays open
        assert server.security.authenticator.refusals == {
            "MISSING_CREDENTIALS": 1,
            "INVALID_CREDENTIALS": 1,
        }
        # Plaintext to a TLS server does not connect.
        async with AsyncTurnIdClient(target, token=TOKEN_A) as plain:
            with pytest.raises(Unavailable):
                await plain.get_thread("t", timeout=2)


async def test_mtls_only_namespaces_are_common_names(pki: Pki) -> None:
    team_b = pki.ca.issue("team-b-real", common_name="team-b")
    async with _Server(
        tls_cert=str(pki.server.cert_file),
        tls_key=str(pki.server.key_file),
        tls_client_ca=str(pki.ca.cert_file),
    ) as server:

        def client(pair: object) -> AsyncTurnIdClient:
            return AsyncTurnIdClient(
                server.target,
                root_certificates=pki.ca.cert,
                private_key=pair.key,  # type: ignore[attr-defined]
                certificate_chain=pair.cert,  # type: ignore[attr-defined]
            )

        async with client(pki.client) as a, client(team_b) as b:
            assert (await a.auto_compaction("t")).turn_id == "auto-compact-0"
            assert (await a.auto_compaction("t")).turn_id == "auto-compact-1"
            assert (await b.auto_compaction("t")).turn_id == "auto-compact-0"
        async with client(pki.foreign_client) as foreign:
            with pytest.raises(Unavailable):
                await foreign.get_thread("t", timeout=2)


@pytest.fixture
def serve_log_has_no_token() -> Iterator[list[ServeProcess]]:
    """Processes appended to the list get their whole log checked for tokens afterwards."""
    processes: list[ServeProcess] = []
    yield processes
    for process in processes:
        text = "".join(process.log)
        for token in ALL_TOKENS:
            assert token not in text


class _LogWaiter(list[str]):
    """A stand-in for `ServeProcess.log` that lets a test wait for a line (no sleeping)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(lines)
        self._changed = threading.Condition()

    def append(self, line: str) -> None:
        with self._changed:
            super().append(line)
            self._changed.notify_all()

    def wait_for(self, text: str, start: int, timeout: float = 30) -> str:
        def found() -> str | None:
            return next((line for line in self[start:] if text in line), None)

        with self._changed:
            if not self._changed.wait_for(lambda: found() is not None, timeout):
                raise TimeoutError(f"no log line with {text!r}: {''.join(self)}")
        line = found()
        assert line is not None
        return line


def _watch_log(process: ServeProcess) -> _LogWaiter:
    waiter = _LogWaiter(process.log)
    process.log = waiter  # the drain thread appends to whatever `log` is
    return waiter


def _token_create(namespace: str, tokens: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "turnid.service.cli", "token", "create", namespace],
        env={**os.environ, "TURNID_AUTH_TOKENS": str(tokens)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = done.stdout.strip()
    assert token not in done.stderr
    return token


def _reason(target: str, token: str | None) -> str:
    with TurnIdClient(target, token=token) as client:
        try:
            client.get_thread("t", timeout=10)
        except Unauthenticated as error:
            return error.reason
        except Exception as error:  # NOT_FOUND: the token was accepted
            return type(error).__name__
    return "OK"


@pytest.mark.e2e
def test_token_create_then_sighup_reloads_turnid_serve(
    tmp_path: Path, serve_log_has_no_token: list[ServeProcess]
) -> None:
    tokens = tmp_path / "tokens"
    first = _token_create("team-a", tokens)
    assert oct(tokens.stat().st_mode & 0o777) == "0o600"
    with ServeProcess("memory:", "--auth-tokens", str(tokens)) as process:
        serve_log_has_no_token.append(process)
        log = _watch_log(process)
        target = process.target  # loopback: a token over plaintext is allowed there
        assert _reason(target, first) == "NotFound"
        assert _reason(target, None) == "MISSING_CREDENTIALS"

        second = _token_create("team-b", tokens)
        assert _reason(target, second) == "INVALID_CREDENTIALS"  # not loaded yet
        mark = len(log)
        process.process.send_signal(signal.SIGHUP)
        assert "2 namespace(s)" in log.wait_for("loaded 2 token(s)", mark)
        assert _reason(target, second) == "NotFound"

        # A broken file on SIGHUP: the old tokens stay, the log says why (file and line).
        tokens.write_text(f"team-a {hash_token(first)}\nteam-b {second}\n")
        mark = len(log)
        process.process.send_signal(signal.SIGHUP)
        line = log.wait_for("not reloaded", mark)
        assert f"{tokens}:2" in line
        assert _reason(target, second) == "NotFound"

        # Rotation done: only the new token's line is left.
        tokens.write_text(f"team-b {hash_token(second)}\n")
        mark = len(log)
        process.process.send_signal(signal.SIGHUP)
        log.wait_for("loaded 1 token(s)", mark)
        assert _reason(target, first) == "INVALID_CREDENTIALS"
        assert _reason(target, second) == "NotFound"
        assert process.terminate() == 0
    assert "UNAUTHENTICATED" in "".join(process.log)  # refusals have access lines


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("flag", "content", "expected"),
    [
        ("--auth-tokens", f"team-a {TOKEN_A}\n", "tokens:1: the second field"),
        ("--auth-tokens", None, "no such file"),
        ("--tls-cert", "not a certificate\n", "TLS"),
    ],
)
def test_turnid_serve_refuses_bad_files_in_one_line(
    tmp_path: Path, pki: Pki, flag: str, content: str | None, expected: str
) -> None:
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    extra = [flag, str(path)]
    if flag == "--tls-cert":
        extra += ["--tls-key", str(pki.server.key_file)]
    done = subprocess.run(
        serve_command("--listen", "127.0.0.1:0", "--database", "memory:", *extra),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert TOKEN_A not in done.stderr and "BEGIN" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.e2e
def test_turnid_serve_with_tls_and_tokens(
    tmp_path: Path, pki: Pki, tokens_file: Path, serve_log_has_no_token: list[ServeProcess]
) -> None:
    with ServeProcess(
        "memory:",
        "--tls-cert",
        str(pki.server.cert_file),
        "--tls-key",
        str(pki.server.key_file),
        "--auth-tokens",
        str(tokens_file),
    ) as process:
        serve_log_has_no_token.append(process)
        assert "TLS, bearer tokens" in "".join(process.log)
        with TurnIdClient(process.target, token=TOKEN_A, root_certificates=pki.ca.cert) as a:
            assert a.auto_compaction("t").turn_id == "auto-compact-0"
        with TurnIdClient(process.target, token=WRONG_TOKEN, root_certificates=pki.ca.cert) as c:
            with pytest.raises(Unauthenticated) as raised:
                c.auto_compaction("t")
            assert raised.value.reason == "INVALID_CREDENTIALS"
        with TurnIdClient(process.target) as plain, pytest.raises(Unavailable):
            plain.get_thread("t", timeout=2)
        assert process.terminate() == 0
