"""Turn id helpers and the Turn value type: no server needed."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime

import pytest
import uuid_utils

from turnid.client import Turn, TurnIdForm, TurnKind, new_request_id, parse_turn_id


def test_parse_uuid7_with_its_timestamp() -> None:
    text = "01a21362-b516-7104-8128-27ff4543f1dd"
    parsed = parse_turn_id(text)
    assert parsed.form is TurnIdForm.UUID7
    assert parsed.uuid == uuid.UUID(text)
    assert parsed.timestamp == datetime.fromtimestamp(0x01A21362B516 / 1000, tz=UTC)
    assert parsed.compaction_index is None


def test_parse_fresh_uuid7_is_close_to_now() -> None:
    parsed = parse_turn_id(str(uuid_utils.uuid7()))
    assert parsed.form is TurnIdForm.UUID7
    assert parsed.timestamp is not None
    assert abs((datetime.now(UTC) - parsed.timestamp).total_seconds()) < 60


@pytest.mark.parametrize(("text", "n"), [("auto-compact-0", 0), ("auto-compact-42", 42)])
def test_parse_auto_compact(text: str, n: int) -> None:
    parsed = parse_turn_id(text)
    assert parsed.form is TurnIdForm.AUTO_COMPACTION
    assert parsed.compaction_index == n
    assert parsed.timestamp is None


@pytest.mark.parametrize(
    "text",
    [
        "rollout-7",
        "",
        "auto-compact-",
        "auto-compact-01",  # the counter never writes leading zeros
        "auto-compact--1",
        "auto-compact-1x",
        "auto-compact-\u0661",  # a non-ASCII digit
        str(uuid.uuid4()),  # a UUID, but version 4
        "01a21362b5167104812827ff4543f1dd",  # not hyphenated
        "01a21362-b516-7104-c128-27ff4543f1dd",  # version 7 but not the RFC variant
        " 01a21362-b516-7104-8128-27ff4543f1dd",
    ],
)
def test_parse_other(text: str) -> None:
    parsed = parse_turn_id(text)
    assert parsed.form is TurnIdForm.OTHER
    assert (parsed.uuid, parsed.timestamp, parsed.compaction_index) == (None, None, None)


def test_new_request_id_is_uuid7() -> None:
    first, second = new_request_id(), new_request_id()
    assert parse_turn_id(first).form is TurnIdForm.UUID7
    assert first < second


def test_turn_is_immutable_with_derived_fields() -> None:
    now = datetime.now(UTC)
    turn = Turn("t", "auto-compact-3", TurnKind.AUTO_COMPACTION, 4, now, "r", False)
    assert turn.compaction_index == 3
    assert turn.uuid_time is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        turn.sequence = 5  # type: ignore[misc]
    assert hash(turn) == hash(dataclasses.replace(turn))
    realtime = dataclasses.replace(
        turn, turn_id=str(uuid_utils.uuid7()), kind=TurnKind.REALTIME_DELEGATION
    )
    assert realtime.compaction_index is None
    assert realtime.uuid_time is not None


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("realtime-delegation", TurnKind.REALTIME_DELEGATION),
        ("AUTO_COMPACTION", TurnKind.AUTO_COMPACTION),
        ("TURN_KIND_USER_INPUT", TurnKind.USER_INPUT),
        ("3", TurnKind.USER_INPUT),
    ],
)
def test_turn_kind_parse(text: str, kind: TurnKind) -> None:
    assert TurnKind.parse(text) is kind


def test_turn_kind_parse_refuses_unknown() -> None:
    with pytest.raises(ValueError, match="unknown turn kind"):
        TurnKind.parse("compaction-ish")
    with pytest.raises(ValueError):
        TurnKind.parse("17")


def test_unknown_kind_numbers_read_as_unspecified() -> None:
    assert TurnKind(17) is TurnKind.UNSPECIFIED
