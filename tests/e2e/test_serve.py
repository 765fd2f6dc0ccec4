"""End to end against `turnid serve` subprocesses: the scenario this product exists for."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from turnid.v1 import turnid_pb2 as pb
from turnid.v1 import turnid_pb2_grpc as pb_grpc

from .serve_process import ServeProcess, serve_command

pytestmark = pytest.mark.e2e

REALTIME = pb.TURN_KIND_REALTIME_DELEGATION
COMPACTION = pb.TURN_KIND_AUTO_COMPACTION


async def allocate(target: str, thread_id: str, kind: int, rid: str = "") -> pb.Turn:
    """One call on a fresh channel, as a freshly resumed orchestrator session would make."""
    async with grpc.aio.insecure_channel(target) as channel:
        response = await pb_grpc.TurnIdServiceStub(channel).AllocateTurnId(
            pb.AllocateTurnIdRequest(thread_id=thread_id, kind=kind, request_id=rid), timeout=30
        )
        return response.turn


async def list_all(target: str, thread_id: str) -> list[pb.Turn]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TurnIdServiceStub(channel)
        turns: list[pb.Turn] = []
        token = ""
        while True:
            page = await stub.ListTurns(
                pb.ListTurnsRequest(thread_id=thread_id, page_size=1000, page_token=token)
            )
            turns.extend(page.turns)
            if not (token := page.next_page_token):
                return turns


def assert_thread_consistent(turns: list[pb.Turn]) -> None:
    assert [t.sequence for t in turns] == list(range(1, len(turns) + 1))
    assert len({t.turn_id for t in turns}) == len(turns), "a turn id repeats"
    compactions = [t.turn_id for t in turns if t.kind == COMPACTION]
    assert compactions == [f"auto-compact-{n}" for n in range(len(compactions))]


async def test_kill_9_and_resume_on_a_fresh_process(tmp_path: Path, thread_id: str) -> None:
    database = f"sqlite://{tmp_path / 'turnid.db'}"
    remembered: dict[str, pb.Turn] = {}
    for session in range(3):
        with ServeProcess(database) as server:
            for step in range(4):
                kind = COMPACTION if step % 2 else REALTIME
                rid = f"session-{session}-step-{step}"
                remembered[rid] = await allocate(server.target, thread_id, kind, rid)
            # A retry of a step from an earlier session returns that session's turn.
            for rid in ("session-0-step-1", f"session-{session}-step-0"):
                earlier = remembered[rid]
                assert await allocate(server.target, thread_id, earlier.kind, rid) == earlier
            server.kill()  # SIGKILL: acknowledged turns must already be durable

    with ServeProcess(database) as server:
        turns = await list_all(server.target, thread_id)
        assert_thread_consistent(turns)
        assert len(turns) == 12
        assert [t.turn_id for t in turns if t.kind == COMPACTION] == [
            f"auto-compact-{n}" for n in range(6)
        ]
        assert {t.request_id: t for t in turns} == remembered
        assert (await allocate(server.target, thread_id, COMPACTION)).turn_id == "auto-compact-6"
        assert server.terminate() == 0


async def test_two_processes_on_one_sqlite_file(tmp_path: Path, thread_id: str) -> None:
    database = f"sqlite://{tmp_path / 'shared.db'}"
    with ServeProcess(database) as first, ServeProcess(database) as second:
        targets = [first.target, second.target]
        channels = [grpc.aio.insecure_channel(t) for t in targets]
        stubs = [pb_grpc.TurnIdServiceStub(c) for c in channels]

        async def worker(index: int) -> None:
            stub = stubs[index % 2]
            for step in range(40):
                kind = COMPACTION if (index + step) % 2 else REALTIME
                await stub.AllocateTurnId(
                    pb.AllocateTurnIdRequest(thread_id=thread_id, kind=kind), timeout=30
                )

        await asyncio.gather(*(worker(i) for i in range(8)))
        for channel in channels:
            await channel.close()
        turns = await list_all(first.target, thread_id)
        assert len(turns) == 320
        assert_thread_consistent(turns)
        assert len([t for t in turns if t.kind == COMPACTION]) == 160
        assert await list_all(second.target, thread_id) == turns
        assert first.terminate() == 0 and second.terminate() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signals_exit_zero_and_health_serves_until_then(
    tmp_path: Path, signum: signal.Signals
) -> None:
    with ServeProcess(f"sqlite://{tmp_path / 't.db'}") as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="turnid.v1.TurnIdService"), timeout=10
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        assert server.terminate(signum) == 0
        assert any("stopped" in line for line in server.log)


def test_unusable_database_url_fails_fast_with_one_line() -> None:
    with pytest.raises(RuntimeError) as caught:
        ServeProcess("mysql://nowhere")
    assert "unsupported database URL" in str(caught.value)
    assert "Traceback" not in str(caught.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "no-port", ":50051"])
def test_bad_listen_address_is_one_line_and_exit_2(listen: str) -> None:
    result = subprocess.run(
        serve_command("--listen", listen, "--database", "memory:"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "listen address" in result.stderr


def test_plaintext_is_said_and_a_non_loopback_plaintext_listen_is_warned_about() -> None:
    with ServeProcess("memory:") as server:
        assert server.terminate() == 0
    serving = next(line for line in server.log if "turnid serving on" in line)
    assert "plaintext, authentication off" in serving
    assert not any(" WARNING " in line for line in server.log), server.log
    with ServeProcess("memory:", listen="0.0.0.0:0") as server:
        assert server.terminate() == 0
    warnings = [line for line in server.log if " WARNING " in line]
    assert len(warnings) == 1 and "in plaintext with authentication off" in warnings[0]


def _create_token(namespace: str, tokens: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "turnid.service.cli", "token", "create", namespace],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TURNID_AUTH_TOKENS": str(tokens)},
    )
    assert result.returncode == 0, result.stderr
    (token,) = result.stdout.split()
    return token


async def test_tls_and_tokens_through_serve_and_sighup_reloads_the_tokens(
    tmp_path: Path, thread_id: str
) -> None:
    from tests.security.certs import make_pki
    from turnid.client import AsyncTurnIdClient, TurnIdError, TurnKind

    pki = make_pki(tmp_path / "pki")
    tokens = tmp_path / "tokens"
    token_a = _create_token("team-a", tokens)
    flags = ("--tls-cert", str(pki.server.cert_file), "--tls-key", str(pki.server.key_file))
    with ServeProcess(f"sqlite://{tmp_path / 't.db'}", *flags, "--auth-tokens", str(tokens)) as s:
        serving = next(line for line in s.log if "turnid serving on" in line)
        assert "TLS, bearer tokens" in serving
        assert token_a not in "".join(s.log)

        def client(token: str) -> AsyncTurnIdClient:
            return AsyncTurnIdClient(s.target, token=token, root_certificates=pki.ca.cert)

        async with client(token_a) as a:
            turn = await a.allocate(thread_id, TurnKind.USER_INPUT)
        assert turn.sequence == 1
        token_b = _create_token("team-b", tokens)
        async with client(token_b) as b:
            with pytest.raises(TurnIdError) as refused:
                await b.allocate(thread_id, TurnKind.USER_INPUT)
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
            s.process.send_signal(signal.SIGHUP)
            await asyncio.to_thread(s.wait_for_log, r"loaded \d+ token", count=2)
            # team-b has its own namespace: the same thread id is a new thread there.
            assert (await b.allocate(thread_id, TurnKind.USER_INPUT)).sequence == 1
        assert s.terminate() == 0
    assert token_b not in "".join(s.log)
