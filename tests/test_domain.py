"""Unit tests of the domain rules: limits, page tokens, allocation plans."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnid.service.domain import (
    NEW_THREAD,
    Allocation,
    Grant,
    Replay,
    RequestRecord,
    ThreadState,
    Turn,
    TurnIdError,
    TurnKind,
    decide,
    paging,
    validation,
)
from turnid.service.domain.minting import mint_uuid7_after, uuid7_successor
from turnid.service.domain.model import make_turn


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
    token = paging.encode("", thread, after)
    assert paging.decode("", thread, token) == after
    assert reason_of(paging.decode, "", thread + "x", token) == "INVALID_PAGE_TOKEN"
    assert reason_of(paging.decode, "team-a", thread, token) == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize("bad", ["x", "!!!", "MS4wLjA", "bm90IGEgdG9rZW4", "a" * 200])
def test_foreign_page_tokens_fail(bad: str) -> None:
    assert reason_of(paging.decode, "", "t", bad) == "INVALID_PAGE_TOKEN"


def _decide(allocation: Allocation, state: ThreadState = NEW_THREAD, **kw):  # type: ignore[no-untyped-def]
    taken = kw.pop("taken", set())
    return decide(allocation, state, kw.pop("seen", None), taken.__contains__, 1_000)


def test_decide_numbers_compactions_and_mints_in_order() -> None:
    grant = _decide(Allocation("t", TurnKind.AUTO_COMPACTION, 3), ThreadState(5, 7))
    assert isinstance(grant, Grant)
    assert [t.turn_id for t in grant.turns] == [
        "auto-compact-7",
        "auto-compact-8",
        "auto-compact-9",
    ]
    assert [t.sequence for t in grant.turns] == [5, 6, 7]
    assert (grant.state.next_sequence, grant.state.next_compaction) == (8, 10)
    minted = _decide(Allocation("t", TurnKind.USER_INPUT, 3))
    assert isinstance(minted, Grant)
    ids = [t.turn_id for t in minted.turns]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert minted.state.last_minted == ids[-1]
    assert minted.record is None


def test_decide_replays_before_it_checks_anything_else() -> None:
    seen = RequestRecord(int(TurnKind.USER_INPUT), 1, None, 3)
    again = Allocation("t", TurnKind.USER_INPUT, 1, "r", expected_last_sequence=0)
    assert _decide(again, ThreadState(9), seen=seen) == Replay(3, 1)
    other = Allocation("t", TurnKind.REALTIME_DELEGATION, 1, "r")
    assert reason_of(lambda: _decide(other, ThreadState(9), seen=seen)) == "REQUEST_ID_REUSED"


def test_decide_refuses_an_advanced_thread_and_a_taken_claim() -> None:
    conditional = Allocation("t", TurnKind.USER_INPUT, 1, expected_last_sequence=2)
    assert reason_of(_decide, conditional, ThreadState(4)) == "THREAD_ADVANCED"
    assert isinstance(_decide(conditional, ThreadState(3)), Grant)
    claim = Allocation("t", TurnKind.USER_INPUT, 1, claimed_turn_id="rollout-1")
    with pytest.raises(TurnIdError) as caught:
        _decide(claim, taken={"rollout-1"})
    assert caught.value.reason == "TURN_ID_TAKEN"
    grant = _decide(claim, ThreadState(max_claimed="a"))
    assert isinstance(grant, Grant) and grant.state.max_claimed == "rollout-1"


def test_decide_mints_past_a_claimed_id_it_collides_with(monkeypatch: pytest.MonkeyPatch) -> None:
    from turnid.service.domain import allocation

    claimed = "01900000-0000-7000-8000-000000000000"
    # The generator's next id is the claimed one, on both of decide's paths: the first id of a
    # run checked (mint_uuid7s), and each id on its own (mint_uuid7_after).
    monkeypatch.setattr(allocation, "mint_uuid7s", lambda count: [claimed] * count)
    monkeypatch.setattr(allocation, "mint_uuid7_after", lambda last: claimed)
    grant = _decide(
        Allocation("t", TurnKind.REALTIME_DELEGATION, 1),
        ThreadState(2, max_claimed=claimed),
        taken={claimed},
    )
    assert isinstance(grant, Grant)
    assert grant.turns[0].turn_id == uuid7_successor(claimed)


def test_decide_mints_a_run_past_the_threads_history_on_both_paths() -> None:
    # A run's ids follow the thread's last minted id and its greatest claim: at once when the
    # generator is past both, one by one (checked against the claims) when either is ahead.
    ahead = "ffffffff-ffff-7000-8000-000000000000"  # another process's clock, far ahead
    for state, taken in (
        (ThreadState(3), set()),
        (ThreadState(3, last_minted=ahead), set()),
        (ThreadState(3, max_claimed="rollout-7"), {"rollout-7"}),
    ):
        grant = _decide(Allocation("t", TurnKind.REALTIME_DELEGATION, 50), state, taken=taken)
        assert isinstance(grant, Grant)
        ids = grant.turns.turn_ids
        assert len(set(ids)) == 50 and ids == sorted(ids) and ids[0] > state.last_minted
        assert not taken & set(ids) and grant.state.last_minted == ids[-1]
        assert [t.sequence for t in grant.turns] == list(range(3, 53))


def test_uuid7_successor_keeps_version_variant_and_carries_into_the_millisecond() -> None:
    import uuid

    text = "01900000-0000-7000-8000-000000000000"
    nxt = uuid.UUID(uuid7_successor(text))
    assert (nxt.version, nxt.variant) == (7, uuid.RFC_4122)
    assert nxt.int == uuid.UUID(text).int + 1
    full = "01900000-0000-7fff-bfff-ffffffffffff"  # counter exhausted in this millisecond
    carried = uuid.UUID(uuid7_successor(full))
    assert carried.int >> 80 == (uuid.UUID(full).int >> 80) + 1
    assert str(carried) > full and carried.version == 7
    assert mint_uuid7_after("ffffffff-ffff-7000-8000-000000000000") > "ffffffff-ffff-7000-8"


def test_database_urls_are_redacted_for_logs() -> None:
    from turnid.service.config import redact_url

    assert redact_url("postgresql://u:s3cret@db:5432/t") == "postgresql://u:***@db:5432/t"
    assert redact_url("postgresql://u@db/t?password=s3cret") == "postgresql://u@db/t"
    assert redact_url("sqlite:///var/lib/turnid.db") == "sqlite:///var/lib/turnid.db"


def test_make_turn_makes_the_same_frozen_turn_as_its_constructor() -> None:
    # make_turn sets Turn's slots one by one: a field added to Turn must be added there too.
    values = ("thread", "turn", TurnKind.USER_INPUT, 7, 1_700_000_000_000_001, "req", True)
    made = make_turn(*values)
    assert made == Turn(*values)
    assert [getattr(made, f.name) for f in dataclasses.fields(Turn)] == list(values)
    assert list(inspect.signature(make_turn).parameters) == [
        f.name for f in dataclasses.fields(Turn)
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.sequence = 8  # type: ignore[misc]
    assert hash(made) == hash(Turn(*values))


def test_a_change_feed_is_watched_while_anyone_subscribes() -> None:
    from turnid.service.domain.watch import ChangeFeed

    feed = ChangeFeed()
    assert not feed.watched.is_set()
    made = feed.idle_since
    with feed.subscribe(("", "a")), feed.subscribe(("", "b")):
        assert feed.watched.is_set()
        with feed.subscribe(("", "a")):
            assert feed.watchers == 3
        assert feed.watched.is_set()  # others still watch
        assert feed.idle_since == made
    assert not feed.watched.is_set()
    assert feed.idle_since >= made


def test_a_turn_run_is_the_sequence_of_its_turns() -> None:
    from turnid.service.domain.model import TurnRun

    ids = ["a", "b", "c"]
    run = TurnRun("thread", ids, TurnKind.USER_INPUT, 7, 1_700_000_000_000_001, "req", False)
    turns = [
        Turn("thread", turn_id, TurnKind.USER_INPUT, 7 + i, 1_700_000_000_000_001, "req", False)
        for i, turn_id in enumerate(ids)
    ]
    assert len(run) == 3 and list(run) == turns and run == turns and turns == run
    assert [run[i] for i in (0, 1, 2, -1, -3)] == [*turns, turns[-1], turns[0]]
    assert run[1:] == turns[1:] and run[::-1] == turns[::-1] and run[5:] == []
    assert run.index(turns[1]) == 1 and turns[2] in run and run.count(turns[0]) == 1
    assert run != turns[:2] and run != [*turns[:2], turns[0]] and run != "abc"
    with pytest.raises(IndexError):
        run[3]
    with pytest.raises(IndexError):
        run[-4]
    (only,) = TurnRun("t", ["x"], TurnKind.REALTIME_DELEGATION, 1, 5, "", True)
    assert only == Turn("t", "x", TurnKind.REALTIME_DELEGATION, 1, 5, "", True)
    assert list(TurnRun("t", [], TurnKind.REALTIME_DELEGATION, 1, 5, "", False)) == []
