"""Unit tests of the domain rules: limits, page tokens, allocation plans."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnid.service.domain import Allocation, TurnIdError, TurnKind, paging, validation


def reason_of(call, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(TurnIdError) as caught:
        call(*args)
    return caught.value.reason


@pytest.mark.parametrize(
    "good", ["t", "a" * 256, "é" * 128, "thread/with:punctuation-_.~", "日本語", "🙂" * 64]
)
def test_thread_ids_within_limits_pass(good: str) -> None:
    assert validation.thread_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a" * 257,
        "é" * 129,
        "🙂" * 65,
        "a b",
        "a\tb",
        "a\nb",
        "\x00",
        "a\x7fb",
        "a\u200bb",
        "a\u00a0b",
        "a\u2028b",
        "\ud800",
    ],
)
def test_thread_ids_outside_limits_fail(bad: str) -> None:
    assert reason_of(validation.thread_id, bad) == "INVALID_THREAD_ID"
    assert reason_of(validation.turn_id, bad) == "INVALID_TURN_ID"


def test_only_the_compaction_counter_makes_auto_compact_ids() -> None:
    assert reason_of(validation.claimable_turn_id, "auto-compact-3") == "RESERVED_TURN_ID"
    assert reason_of(validation.claimable_turn_id, "auto-compact-x") == "RESERVED_TURN_ID"
    assert validation.claimable_turn_id("rollout-3") == "rollout-3"
    assert validation.claimable_turn_id("auto-compacted") == "auto-compacted"
    assert reason_of(validation.claimable_kind, 2) == "INVALID_KIND"


@pytest.mark.parametrize("value", [0, 4, -1, 2**31 - 1])
def test_unknown_kinds_fail(value: int) -> None:
    assert reason_of(validation.kind, value) == "INVALID_KIND"


def test_kinds_match_the_proto_numbers() -> None:
    from turnid.v1 import turnid_pb2 as pb

    for kind in TurnKind:
        assert pb.TurnKind.Value(f"TURN_KIND_{kind.name}") == kind.value


@pytest.mark.parametrize("good", ["", "r", "r" * 128, "0192-abc_~!", "with space"])
def test_request_ids_within_limits_pass(good: str) -> None:
    assert validation.request_id(good) == good


@pytest.mark.parametrize("bad", ["r" * 129, "ü", "a\nb", "\x7f"])
def test_request_ids_outside_limits_fail(bad: str) -> None:
    assert reason_of(validation.request_id, bad) == "INVALID_REQUEST_ID"


@pytest.mark.parametrize("bad", [0, -1, 1001, -(2**31)])
def test_counts_outside_limits_fail(bad: int) -> None:
    assert reason_of(validation.count, bad) == "INVALID_COUNT"


def test_page_sizes() -> None:
    assert validation.page_size(0) == 100
    assert validation.page_size(5) == 5
    assert validation.page_size(10**6) == 1000
    assert reason_of(validation.page_size, -1) == "INVALID_PAGE_SIZE"


@given(st.text(min_size=1, max_size=50), st.integers(min_value=1, max_value=2**62))
def test_page_tokens_round_trip_and_are_bound_to_their_thread(thread: str, after: int) -> None:
    token = paging.encode(thread, after)
    assert paging.decode(thread, token) == after
    assert reason_of(paging.decode, thread + "x", token) == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize("bad", ["x", "!!!", "MS4wLjA", "bm90IGEgdG9rZW4", "a" * 200])
def test_foreign_page_tokens_fail(bad: str) -> None:
    assert reason_of(paging.decode, "t", bad) == "INVALID_PAGE_TOKEN"


def test_allocation_turn_ids_by_kind() -> None:
    assert Allocation("t", TurnKind.AUTO_COMPACTION, 3).turn_ids(7) == [
        "auto-compact-7",
        "auto-compact-8",
        "auto-compact-9",
    ]
    minted = Allocation("t", TurnKind.USER_INPUT, 3).turn_ids(7)
    assert minted == sorted(minted) and len(set(minted)) == 3
    claim = Allocation("t", TurnKind.USER_INPUT, 1, claimed_turn_id="rollout-1")
    assert claim.turn_ids(7) == ["rollout-1"]
    assert claim.compactions == 0


def test_database_urls_are_redacted_for_logs() -> None:
    from turnid.service.config import redact_url

    assert redact_url("postgresql://u:s3cret@db:5432/t") == "postgresql://u:***@db:5432/t"
    assert redact_url("postgresql://u@db/t?password=s3cret") == "postgresql://u@db/t"
    assert redact_url("sqlite:///var/lib/turnid.db") == "sqlite:///var/lib/turnid.db"
