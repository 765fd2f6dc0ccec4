"""The Node example client (examples/node, TypeScript stubs from `make stubs-ts`, Connect's gRPC
transport) against `turnid serve` in a subprocess: the protos work from a second language."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from tests.cross_language.conftest import REPO, ServeProcess, checked

UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
TURN_FIELDS = ("thread_id", "turn_id", "kind", "sequence", "create_time", "request_id", "claimed")


def run_client(client: Path, target: str) -> list[dict[str, Any]]:
    node = shutil.which("node")
    assert node is not None
    output = checked([node, client, target], REPO)
    return [json.loads(line) for line in output.splitlines()]


def events(lines: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == name]


def turn(line: dict[str, Any]) -> dict[str, Any]:
    return {field: line[field] for field in TURN_FIELDS}


def test_node_client_allocates_reads_back_and_decodes_refusals(
    node_example: Path, turnid_serve: ServeProcess
) -> None:
    lines = run_client(node_example, turnid_serve.target)

    assert lines[0] == {"event": "target", "target": turnid_serve.target}
    assert lines[-1] == {"event": "done"}

    # A realtime delegation (UUIDv7, canonical text), then two compactions in the fresh thread.
    allocated = events(lines, "allocated")
    assert [line["kind"] for line in allocated] == [
        "TURN_KIND_REALTIME_DELEGATION",
        "TURN_KIND_AUTO_COMPACTION",
        "TURN_KIND_AUTO_COMPACTION",
    ]
    assert UUID7.fullmatch(allocated[0]["turn_id"]), allocated[0]["turn_id"]
    assert [line["turn_id"] for line in allocated[1:]] == ["auto-compact-0", "auto-compact-1"]
    assert [line["sequence"] for line in allocated] == ["1", "2", "3"]
    assert len({line["thread_id"] for line in allocated}) == 1
    assert not any(line["claimed"] for line in allocated)

    # The retry with the same request_id got the original turn back.
    [retried] = events(lines, "retried")
    assert turn(retried) == turn(allocated[0])
    assert retried["request_id"] != ""

    # GetTurn and ListTurns read back exactly what was allocated, in sequence order.
    assert [turn(line) for line in events(lines, "read")] == [turn(line) for line in allocated]
    assert [turn(line) for line in events(lines, "listed")] == [turn(line) for line in allocated]

    # The watch was established before anything was allocated and saw every turn once.
    assert lines[1] == {"event": "watching", "thread_id": allocated[0]["thread_id"]}
    [started] = events(lines, "started")
    assert started["sequence"] == "4"
    assert events(lines, "watched") == [{"event": "watched", "sequences": ["1", "2", "3", "4"]}]
    assert events(lines, "thread") == [
        {
            "event": "thread",
            "last_sequence": "3",
            "next_compaction_index": "2",
            "last_turn_id": "auto-compact-1",
        }
    ]

    # The reasons come from the ErrorInfo in the google.rpc.Status details.
    advanced, invalid, not_found = events(lines, "refused")
    assert (advanced["code"], advanced["reason"]) == ("FAILED_PRECONDITION", "THREAD_ADVANCED")
    assert advanced["metadata"]["last_sequence"] == "4"
    assert invalid["rpc"] == "AllocateTurnId"
    assert invalid["code"] == "INVALID_ARGUMENT"
    assert invalid["reason"] == "INVALID_THREAD_ID"
    assert invalid["domain"] == "turnid"
    assert invalid["metadata"] == {"thread_id": "not a thread id"}
    assert [violation["field"] for violation in invalid["field_violations"]] == ["thread_id"]
    assert not_found["rpc"] == "GetTurn"
    assert not_found["code"] == "NOT_FOUND"
    assert not_found["reason"] == "TURN_NOT_FOUND"
    assert not_found["domain"] == "turnid"


def test_each_fresh_thread_counts_compactions_from_zero(
    node_example: Path, turnid_serve: ServeProcess
) -> None:
    first, second = (run_client(node_example, turnid_serve.target) for _ in range(2))
    for lines in (first, second):
        compactions = [
            line["turn_id"]
            for line in events(lines, "allocated")
            if line["kind"] == "TURN_KIND_AUTO_COMPACTION"
        ]
        assert compactions == ["auto-compact-0", "auto-compact-1"]
    threads = {events(lines, "allocated")[0]["thread_id"] for lines in (first, second)}
    assert len(threads) == 2
