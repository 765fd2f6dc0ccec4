"""Logs: text and JSON lines, the access log's levels and fields, and `turnid serve --log-format
json` end to end (every line parses; a failed call has its access line at the default level)."""

from __future__ import annotations

import io
import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from turnid.service import logs
from turnid.v1 import turnid_pb2 as pb
from turnid.v1 import turnid_pb2_grpc as pb_grpc

ACCESS_KEYS = {
    "method",
    "code",
    "reason",
    "request_id",
    "namespace",
    "peer",
    "duration_s",
    "correlation_id",
}


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    yield out
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def failed_call(**overrides: object) -> None:
    fields: dict[str, object] = {
        "method": "AllocateTurnId",
        "code": "INVALID_ARGUMENT",
        "reason": "INVALID_THREAD_ID",
        "request_id": "r-1",
        "namespace": "team-a",
        "peer": "ipv4:127.0.0.1:5555",
        "duration_s": 0.00123,
    }
    fields.update(overrides)
    logs.access_log(**fields)  # type: ignore[arg-type]


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_have_the_stable_keys_and_extras_at_the_top(stream: io.StringIO) -> None:
    logs.configure("INFO", "json", stream=stream)
    logging.getLogger("turnid.test").info("hello %s", "world", extra={"thread_id": "t-1"})
    failed_call()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("turnid.test").exception("it broke")
    first, access, broken = lines(stream)
    assert {"time", "level", "logger", "message", "pid"} <= first.keys()
    assert first["message"] == "hello world" and first["thread_id"] == "t-1"
    assert first["level"] == "INFO" and first["logger"] == "turnid.test"
    assert str(first["time"]).endswith("Z") and "T" in str(first["time"])
    assert access["logger"] == "turnid.access" and access["level"] == "INFO"
    assert access.keys() >= ACCESS_KEYS
    assert access["code"] == "INVALID_ARGUMENT" and access["reason"] == "INVALID_THREAD_ID"
    assert access["duration_s"] == 0.00123 and access["namespace"] == "team-a"
    assert "RuntimeError: boom" in str(broken["exception"])


def test_levels_failed_calls_show_at_info_successes_only_at_debug(stream: io.StringIO) -> None:
    logs.configure("INFO", "json", stream=stream)
    failed_call(code="OK", reason="")
    failed_call(code="NOT_FOUND", reason="TURN_NOT_FOUND")
    failed_call(code="INTERNAL", reason="INTERNAL_ERROR", correlation_id="c0ffee")
    failed_call(code="UNAVAILABLE", reason="STORE_UNAVAILABLE")
    failed_call(code="UNAVAILABLE", reason="SHUTTING_DOWN")
    seen = [(line["code"], line["level"]) for line in lines(stream)]
    assert seen == [
        ("NOT_FOUND", "INFO"),
        ("INTERNAL", "WARNING"),
        ("UNAVAILABLE", "WARNING"),
        ("UNAVAILABLE", "INFO"),
    ]
    assert lines(stream)[1]["correlation_id"] == "c0ffee"
    logs.configure("DEBUG", "json", stream=stream)
    failed_call(code="OK", reason="")
    assert lines(stream)[-1]["level"] == "DEBUG"


def test_access_log_does_nothing_when_its_level_is_off(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs.configure("INFO", "json", stream=stream)

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("access_log formatted a line nobody will see")

    monkeypatch.setattr(logs._access, "log", must_not_run)
    failed_call(code="OK", reason="")  # DEBUG is off: returns after one isEnabledFor

    class Record:
        method, code, reason, request_id, namespace = "GetTurn", "OK", "", "", ""
        duration_s, correlation_id = 0.001, ""

        @property
        def peer(self) -> str:
            raise AssertionError("the peer was read for a line nobody will see")

    logs.log_call(Record())


def test_text_lines_quote_what_could_forge_a_line(stream: io.StringIO) -> None:
    logs.configure("INFO", "text", stream=stream)
    failed_call(request_id="evil\n2026-01-01 INFO turnid.server: forged", reason="INVALID")
    (line,) = stream.getvalue().splitlines()
    assert " INFO turnid.access: AllocateTurnId INVALID_ARGUMENT method=AllocateTurnId" in line
    assert 'request_id="evil\\n2026-01-01 INFO turnid.server: forged"' in line
    assert "namespace=team-a peer=ipv4:127.0.0.1:5555 duration_s=0.00123" in line
    assert "correlation_id" not in line  # empty fields are left out in text


def test_long_fields_are_clipped(stream: io.StringIO) -> None:
    logs.configure("INFO", "json", stream=stream)
    failed_call(request_id="r" * 10_000)
    assert len(str(lines(stream)[0]["request_id"])) < 300


def test_bad_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text or json"):
        logs.configure("INFO", "yaml")


async def test_serve_json_logs_parse_line_by_line_and_carry_access_lines(tmp_path: Path) -> None:
    from tests.e2e.serve_process import ServeProcess

    with ServeProcess(f"sqlite://{tmp_path / 't.db'}", "--log-format", "json") as server:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TurnIdServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetTurn(pb.GetTurnRequest(thread_id="t", turn_id="nope"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            await stub.AllocateTurnId(
                pb.AllocateTurnIdRequest(thread_id="t", kind=pb.TURN_KIND_USER_INPUT), timeout=10
            )
        assert server.terminate(signal.SIGTERM) == 0
    entries = [json.loads(line) for line in server.log]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    access = [entry for entry in entries if entry["logger"] == "turnid.access"]
    assert [(a["method"], a["code"], a["reason"]) for a in access] == [
        ("GetTurn", "NOT_FOUND", "TURN_NOT_FOUND")
    ]
    assert str(access[0]["peer"]).startswith("ipv4:127.0.0.1:")
    serving = [entry for entry in entries if "turnid serving on" in str(entry["message"])]
    assert len(serving) == 1 and "plaintext" in str(serving[0]["message"])
