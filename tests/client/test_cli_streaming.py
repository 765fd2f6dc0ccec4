"""The streaming CLI commands (watch, list) and thread, health: subprocesses against the fake
service on the test's loop. Each test waits for the output it expects, never for time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

import pytest

from tests.client.fakes import WAIT, FakeServer
from turnid.client import TurnKind

THREAD = "thread-cli"
USER = int(TurnKind.USER_INPUT)


class Cli:
    """`turnid ARGS` as an asyncio subprocess whose output is read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, *args: str) -> Cli:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TURNID_")}
        env["PYTHONUNBUFFERED"] = "1"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "turnid.service.cli", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        return cls(process)

    async def line(self, stream: str = "stdout") -> str:
        reader = self.process.stdout if stream == "stdout" else self.process.stderr
        assert reader is not None
        raw = await asyncio.wait_for(reader.readline(), WAIT)
        assert raw, f"{stream} ended early"
        return raw.decode().rstrip("\n")

    async def wait_for_stderr(self, text: str) -> None:
        while text not in await self.line("stderr"):
            pass  # other lines (e.g. gRPC's own logging) may come first

    async def lines(self, count: int) -> list[str]:
        return [await self.line() for _ in range(count)]

    async def finish(self) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(self.process.communicate(), WAIT)
        assert self.process.returncode is not None
        return self.process.returncode, out.decode(), err.decode()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


async def run(*args: str) -> tuple[int, str, str]:
    cli = await Cli.start(*args)
    try:
        return await cli.finish()
    finally:
        cli.kill()


@pytest.mark.parametrize("as_json", [True, False])
async def test_watch_prints_history_then_live_turns_until_ctrl_c(
    fake_server: FakeServer, as_json: bool
) -> None:
    fake = fake_server.fake
    await fake.append(THREAD, USER, 2)
    flags = ["--json"] if as_json else []
    cli = await Cli.start("watch", THREAD, "--target", fake_server.target, *flags)
    try:
        history = await cli.lines(2)
        await cli.wait_for_stderr("caught up")
        await fake.append(THREAD, int(TurnKind.AUTO_COMPACTION))
        (live,) = await cli.lines(1)
        cli.process.send_signal(signal.SIGINT)
        code, rest, _ = await cli.finish()
    finally:
        cli.kill()
    assert code == 0, "Ctrl-C ends a watch with status 0"
    assert rest == ""
    if as_json:
        turns = [json.loads(line) for line in [*history, live]]
        assert [t["sequence"] for t in turns] == [1, 2, 3]
        assert turns[2]["turn_id"] == "auto-compact-0"
        assert turns[2]["kind"] == "AUTO_COMPACTION"
    else:
        assert [line.split()[0] for line in [*history, live]] == ["1", "2", "3"]
        assert live.split()[1:3] == ["auto-compact-0", "auto-compaction"]


async def test_watch_after(fake_server: FakeServer) -> None:
    await fake_server.fake.append(THREAD, USER, 3)
    cli = await Cli.start("watch", THREAD, "--after", "2", "--json", "--target", fake_server.target)
    try:
        (line,) = await cli.lines(1)
        assert json.loads(line)["sequence"] == 3
        cli.process.send_signal(signal.SIGINT)
        code, _, _ = await cli.finish()
    finally:
        cli.kill()
    assert code == 0
    assert fake_server.fake.attempts_of("WatchTurns")[0].after_sequence == 2


async def test_watch_negative_after_is_refused(fake_server: FakeServer) -> None:
    code, out, err = await run("watch", THREAD, "--after=-1", "--target", fake_server.target)
    assert code == 1
    assert out == ""
    assert "INVALID_SEQUENCE (INVALID_ARGUMENT)" in err


@pytest.mark.parametrize("as_json", [True, False])
async def test_list_prints_each_page_as_it_arrives(fake_server: FakeServer, as_json: bool) -> None:
    fake = fake_server.fake
    await fake.append(THREAD, USER, 5)
    fake.page_gate = asyncio.Event()  # pages after the first wait for it
    flags = ["--json"] if as_json else []
    cli = await Cli.start(
        "list", THREAD, "--page-size", "2", "--target", fake_server.target, *flags
    )
    try:
        first = await cli.lines(2 if as_json else 3)  # the first page, while the next one waits
        fake.page_gate.set()
        code, rest, err = await cli.finish()
    finally:
        cli.kill()
    assert code == 0, err
    lines = [*first, *rest.splitlines()]
    if as_json:
        assert [json.loads(line)["sequence"] for line in lines] == [1, 2, 3, 4, 5]
    else:
        assert lines[0].split()[:2] == ["SEQUENCE", "TURN_ID"]
        assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3", "4", "5"]
        # Later pages keep the first page's columns.
        assert len({line.index(line.split()[1]) for line in lines[1:]}) == 1
    assert len(fake.attempts_of("ListTurns")) == 3


async def test_list_of_an_empty_thread(fake_server: FakeServer) -> None:
    code, out, _ = await run("list", THREAD, "--json", "--target", fake_server.target)
    assert (code, out) == (0, "")
    code, out, _ = await run("list", THREAD, "--target", fake_server.target)
    assert code == 0
    assert out.split() == ["SEQUENCE", "TURN_ID", "KIND", "CREATE_TIME", "REQUEST_ID", "CLAIMED"]


async def test_thread(fake_server: FakeServer) -> None:
    await fake_server.fake.append(THREAD, USER, 2)
    await fake_server.fake.append(THREAD, int(TurnKind.AUTO_COMPACTION))
    code, out, err = await run("thread", THREAD, "--json", "--target", fake_server.target)
    assert code == 0, err
    document: dict[str, Any] = json.loads(out)
    assert document["thread_id"] == THREAD
    assert document["last_sequence"] == 3
    assert document["next_compaction_index"] == 1
    assert document["last_turn"]["turn_id"] == "auto-compact-0"
    assert document["create_time"].endswith("Z") and document["update_time"].endswith("Z")

    code, out, _ = await run("thread", THREAD, "--target", fake_server.target)
    assert code == 0
    rows = dict(line.split(None, 1) for line in out.splitlines())
    assert rows["last_sequence"] == "3"
    assert rows["last_turn"] == "auto-compact-0 (auto-compaction)"

    code, out, err = await run("thread", "unknown", "--target", fake_server.target)
    assert (code, out) == (1, "")
    assert "THREAD_NOT_FOUND (NOT_FOUND)" in err


async def test_health(fake_server: FakeServer) -> None:
    target = fake_server.target
    assert await run("health", "--target", target) == (0, "SERVING\n", "")
    code, out, _ = await run("health", "--target", target, "--service", "turnid.v1.TurnIdService")
    assert (code, out) == (0, "SERVING\n")
    code, out, _ = await run("health", "--target", target, "--service", "sick")
    assert (code, out) == (1, "NOT_SERVING\n")
    code, out, err = await run("health", "--target", target, "--service", "nope")
    assert (code, out) == (1, "")
    assert "NOT_FOUND" in err
    await fake_server.stop()
    code, out, err = await run("health", "--target", target, "--timeout", "0.3")
    assert (code, out) == (1, "")
    assert "UNAVAILABLE" in err


async def test_token_over_plaintext_is_a_usage_error_unless_insecure(
    fake_server: FakeServer,
) -> None:
    remote = ["--target", "turnid.invalid:1", "--token", "tok-s3cret", "--timeout", "0.3"]
    code, out, err = await run("get", "t", "x", *remote)
    assert (code, out) == (2, "")
    assert "cleartext" in err
    assert "tok-s3cret" not in err
    code, _, err = await run("get", "t", "x", *remote, "--insecure")
    assert code == 1, "allowed: the call is made (and fails to connect)"
    assert "cleartext" not in err
    code, _, err = await run("health", "--target", fake_server.target, "--token", "tok-s3cret")
    assert code == 0, err  # loopback
