"""Turns into protos: a list of turns becomes the same messages however `add_turns` builds them.

`add_turns` copies the message before when a turn differs from the one before only in turn_id
and sequence; every other field must still be the turn's own.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from turnid.service.domain.model import Turn, TurnKind, TurnRun, make_turn
from turnid.service.servicer import add_turns, turn_to_proto
from turnid.v1 import turnid_pb2

# Few values per field, so that neighbours often share all but one or two of them.
_turns = st.builds(
    make_turn,
    st.sampled_from(["t-a", "t-b"]),
    st.sampled_from(["0190a0b0-0000-7000-8000-000000000001", "auto-compact-1", "x"]),
    st.sampled_from([TurnKind(1), TurnKind(2), TurnKind(3)]),
    st.integers(1, 3),
    st.sampled_from([1_700_000_000_000_001, 1_700_000_000_999_999]),
    st.sampled_from(["", "r-1", "r-2"]),
    st.booleans(),
)


@given(st.lists(_turns, max_size=12))
def test_each_message_is_its_turns_whatever_its_neighbours(turns: list[Turn]) -> None:
    response = turnid_pb2.BatchAllocateTurnIdsResponse()
    add_turns(response.turns, turns)
    assert list(response.turns) == [turn_to_proto(turn) for turn in turns]


def test_the_turns_of_one_batch_keep_their_own_ids_and_sequences() -> None:
    turns = [
        make_turn("t", f"0190a0b0-0000-7000-8000-{i:012d}", TurnKind(1), 10 + i, 5, "r", False)
        for i in range(100)
    ]
    response = turnid_pb2.BatchAllocateTurnIdsResponse()
    add_turns(response.turns, turns)
    assert [(m.turn_id, m.sequence) for m in response.turns] == [
        (t.turn_id, t.sequence) for t in turns
    ]
    assert all(m == turn_to_proto(t) for m, t in zip(response.turns, turns, strict=True))


_runs = st.builds(
    TurnRun,
    st.sampled_from(["t-a", "t-b"]),
    st.lists(
        st.sampled_from(["0190a0b0-0000-7000-8000-000000000001", "auto-compact-1"]), max_size=5
    ),
    st.sampled_from([TurnKind(1), TurnKind(2), TurnKind(3)]),
    st.integers(1, 1 << 40),
    st.integers(0, 1 << 52),
    st.sampled_from(["", "r-1"]),
    st.booleans(),
)


@given(_runs)
def test_a_run_answers_as_the_turns_it_stands_for(run: TurnRun) -> None:
    # The servicer builds an allocation's answer from the run itself (no Turn per id); it must
    # be the messages of its turns one by one, the empty run included.
    response = turnid_pb2.BatchAllocateTurnIdsResponse()
    add_turns(response.turns, run)
    assert list(response.turns) == [turn_to_proto(turn) for turn in list(run)]
