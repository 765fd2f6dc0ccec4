"""The client commands of the `turnid` CLI, run as subprocesses against an in-process server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from turnid.client import TurnIdClient, TurnKind
from turnid.testing import TurnIdTestServer


def turnid(
    *args: str, target: str | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TURNID_TARGET", "TURNID_TOKEN")}
    if target is not None:
        env["TURNID_TARGET"] = target
    done = subprocess.run(
        [sys.executable, "-m", "turnid.service.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(done.stdout)


def test_allocate_readable(turnid_server: TurnIdTestServer, thread_id: str) -> None:
    done = turnid("allocate", thread_id, "auto-compaction", "--target", turnid_server.target)
    header, row = done.stdout.splitlines()
    assert header.split() == ["SEQUENCE", "TURN_ID", "KIND", "CREATE_TIME", "REQUEST_ID", "CLAIMED"]
    assert row.split()[:3] == ["1", "auto-compact-0", "auto-compaction"]
    assert done.stderr == ""


def test_allocate_json_and_request_id(turnid_server: TurnIdTestServer, thread_id: str) -> None:
    args = ["allocate", thread_id, "REALTIME_DELEGATION", "--json", "--request-id", "step-1"]
    first = as_json(turnid(*args, target=turnid_server.target))
    assert first["kind"] == "REALTIME_DELEGATION"
    assert first["sequence"] == 1
    assert first["request_id"] == "step-1"
    assert first["claimed"] is False
    assert first["uuid_time"].endswith("Z")
    assert first["create_time"].endswith("Z")
    assert as_json(turnid(*args, target=turnid_server.target)) == first  # idempotent


def test_allocate_batch(turnid_server: TurnIdTestServer, thread_id: str) -> None:
    done = turnid(
        "allocate", thread_id, "auto-compaction", "--count", "3", "--json",
        target=turnid_server.target,
    )  # fmt: skip
    turns = as_json(done)
    assert [t["turn_id"] for t in turns] == ["auto-compact-0", "auto-compact-1", "auto-compact-2"]
    assert [t["compaction_index"] for t in turns] == [0, 1, 2]


def test_claim_get_list(turnid_server: TurnIdTestServer, thread_id: str) -> None:
    target = turnid_server.target
    claimed = as_json(
        turnid("claim", thread_id, "rollout-3", "user-input", "--json", target=target)
    )
    assert claimed["claimed"] is True
    assert as_json(turnid("get", thread_id, "rollout-3", "--json", target=target)) == claimed

    with TurnIdClient(target) as client:
        client.allocate_batch(thread_id, TurnKind.USER_INPUT, 4)
    done = turnid("list", thread_id, "--json", "--page-size", "2", target=target)
    listed = [json.loads(line) for line in done.stdout.splitlines()]  # JSON lines
    assert [t["sequence"] for t in listed] == [1, 2, 3, 4, 5]
    assert listed[0] == claimed

    readable = turnid("list", thread_id, target=target).stdout.splitlines()
    assert len(readable) == 6
    assert readable[1].split()[1] == "rollout-3"
    assert readable[1].split()[-1] == "yes"


def test_target_flag_wins_over_environment(turnid_server: TurnIdTestServer, thread_id: str) -> None:
    done = turnid(
        "allocate", thread_id, "user-input", "--target", turnid_server.target,
        target="127.0.0.1:1",
    )  # fmt: skip
    assert "user-input" in done.stdout


def test_not_found_reason_on_stderr(turnid_server: TurnIdTestServer, thread_id: str) -> None:
    done = turnid("get", thread_id, "nope", target=turnid_server.target, ok=False)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "TURN_NOT_FOUND" in done.stderr
    assert "turn_id: nope" in done.stderr


def test_conflict_reason_on_stderr(turnid_server: TurnIdTestServer, thread_id: str) -> None:
    turnid("claim", thread_id, "r-1", "user-input", target=turnid_server.target)
    done = turnid("claim", thread_id, "r-1", "user-input", target=turnid_server.target, ok=False)
    assert done.returncode == 1
    assert "TURN_ID_TAKEN" in done.stderr


def test_invalid_argument_reason_on_stderr(turnid_server: TurnIdTestServer) -> None:
    done = turnid("allocate", "bad thread", "user-input", target=turnid_server.target, ok=False)
    assert done.returncode == 1
    assert "INVALID_THREAD_ID (INVALID_ARGUMENT)" in done.stderr


def test_unreachable_service(turnid_server: TurnIdTestServer, thread_id: str) -> None:
    turnid_server.stop()
    done = turnid("get", thread_id, "x", "--timeout", "0.3", target=turnid_server.target, ok=False)
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr


def test_unknown_kind_is_a_usage_error() -> None:
    done = turnid("allocate", "t", "compaction-ish", target="127.0.0.1:1", ok=False)
    assert done.returncode == 2
    assert "unknown kind 'compaction-ish'" in done.stderr


@pytest.mark.parametrize("json_flag", [False, True])
def test_parse_needs_no_server(json_flag: bool) -> None:
    ids = ["auto-compact-12", "01a21362-b516-7104-8128-27ff4543f1dd", "rollout-1"]
    done = turnid("parse", *ids, *(["--json"] if json_flag else []), target="127.0.0.1:1")
    if json_flag:
        assert as_json(done) == [
            {"turn_id": ids[0], "form": "auto-compaction", "compaction_index": 12},
            {"turn_id": ids[1], "form": "uuid7", "uuid_time": "2026-11-25T15:46:05.718000Z"},
            {"turn_id": ids[2], "form": "other"},
        ]
    else:
        lines = done.stdout.splitlines()
        assert lines[0].split() == ["TURN_ID", "FORM", "DETAIL"]
        assert lines[1].split() == ["auto-compact-12", "auto-compaction", "N", "=", "12"]
        assert lines[2].split()[:3] == [ids[1], "uuid7", "time"]
        assert lines[3].split() == ["rollout-1", "other", "-"]


def test_console_script_is_installed() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "turnid")
    if not os.path.exists(script):
        pytest.skip("no turnid console script next to this interpreter")
    done = subprocess.run(
        [script, "parse", "auto-compact-0"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "auto-compaction" in done.stdout
