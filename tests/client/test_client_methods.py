"""Every client method, sync and async, against an in-process server (the plugin's fixtures).

Each test runs on the memory store and on a temporary SQLite file (indirect parametrization
of `turnid_server`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from turnid.client import (
    AsyncTurnIdClient,
    Turn,
    TurnIdClient,
    TurnIdForm,
    TurnKind,
    parse_turn_id,
)
from turnid.testing import TurnIdTestServer

pytestmark = pytest.mark.parametrize("turnid_server", ["memory", "sqlite"], indirect=True)


def assert_recent(turn: Turn) -> None:
    assert turn.create_time.tzinfo is not None
    assert abs(datetime.now(UTC) - turn.create_time) < timedelta(minutes=5)


def assert_uuid7(turn: Turn) -> None:
    parsed = parse_turn_id(turn.turn_id)
    assert parsed.form is TurnIdForm.UUID7
    assert turn.uuid_time is not None
    assert turn.compaction_index is None
    # The id's embedded millisecond time and the recorded time come from the same server clock.
    assert abs(turn.uuid_time - turn.create_time) < timedelta(seconds=5)


# -- sync --------------------------------------------------------------------------------------


def test_allocate_each_kind(turnid_client: TurnIdClient, thread_id: str) -> None:
    realtime = turnid_client.allocate(thread_id, TurnKind.REALTIME_DELEGATION)
    compaction = turnid_client.allocate(thread_id, TurnKind.AUTO_COMPACTION)
    user = turnid_client.allocate(thread_id, TurnKind.USER_INPUT)

    assert [t.sequence for t in (realtime, compaction, user)] == [1, 2, 3]
    assert [t.kind for t in (realtime, compaction, user)] == [
        TurnKind.REALTIME_DELEGATION,
        TurnKind.AUTO_COMPACTION,
        TurnKind.USER_INPUT,
    ]
    assert_uuid7(realtime)
    assert_uuid7(user)
    assert compaction.turn_id == "auto-compact-0"
    assert compaction.compaction_index == 0
    assert compaction.uuid_time is None
    for turn in (realtime, compaction, user):
        assert turn.thread_id == thread_id
        assert not turn.claimed
        assert turn.request_id, "the client gives every write a request_id"
        assert parse_turn_id(turn.request_id).form is TurnIdForm.UUID7
        assert_recent(turn)
    assert len({t.request_id for t in (realtime, compaction, user)}) == 3


def test_shortcuts(turnid_client: TurnIdClient, thread_id: str) -> None:
    first = turnid_client.auto_compaction(thread_id)
    realtime = turnid_client.realtime_delegation(thread_id)
    user = turnid_client.user_input(thread_id)
    second = turnid_client.auto_compaction(thread_id)

    assert (first.turn_id, second.turn_id) == ("auto-compact-0", "auto-compact-1")
    assert realtime.kind is TurnKind.REALTIME_DELEGATION
    assert user.kind is TurnKind.USER_INPUT
    assert [t.sequence for t in (first, realtime, user, second)] == [1, 2, 3, 4]


def test_explicit_request_id_is_idempotent(turnid_client: TurnIdClient, thread_id: str) -> None:
    once = turnid_client.auto_compaction(thread_id, request_id="step-1")
    again = turnid_client.auto_compaction(thread_id, request_id="step-1")
    assert once == again
    assert once.request_id == "step-1"
    assert [t.turn_id for t in turnid_client.list_turns(thread_id)] == ["auto-compact-0"]


def test_allocate_batch(turnid_client: TurnIdClient, thread_id: str) -> None:
    turnid_client.user_input(thread_id)
    batch = turnid_client.allocate_batch(thread_id, TurnKind.AUTO_COMPACTION, 3)
    assert [t.turn_id for t in batch] == ["auto-compact-0", "auto-compact-1", "auto-compact-2"]
    assert [t.sequence for t in batch] == [2, 3, 4]
    assert [t.compaction_index for t in batch] == [0, 1, 2]
    assert len({t.request_id for t in batch}) == 1

    again = turnid_client.allocate_batch(
        thread_id, TurnKind.AUTO_COMPACTION, 3, request_id=batch[0].request_id
    )
    assert again == batch


def test_claim_and_get(turnid_client: TurnIdClient, thread_id: str) -> None:
    claimed = turnid_client.claim(thread_id, "rollout-7", TurnKind.USER_INPUT)
    assert claimed.claimed
    assert claimed.turn_id == "rollout-7"
    assert claimed.kind is TurnKind.USER_INPUT
    assert parse_turn_id(claimed.turn_id).form is TurnIdForm.OTHER

    assert turnid_client.get(thread_id, "rollout-7") == claimed
    minted = turnid_client.realtime_delegation(thread_id)
    assert turnid_client.get(thread_id, minted.turn_id) == minted


def test_list_turns_walks_every_page_lazily(turnid_client: TurnIdClient, thread_id: str) -> None:
    turns = turnid_client.allocate_batch(thread_id, TurnKind.USER_INPUT, 7)
    turns.append(turnid_client.auto_compaction(thread_id))

    listed = turnid_client.list_turns(thread_id, page_size=3)
    assert next(listed) == turns[0]  # an iterator: the first page is enough for this
    assert [turns[0], *listed] == turns
    assert list(turnid_client.list_turns(thread_id)) == turns
    assert list(turnid_client.list_turns(f"{thread_id}-empty")) == []


def test_context_manager_closes(turnid_server: TurnIdTestServer, thread_id: str) -> None:
    with TurnIdClient(turnid_server.target) as client:
        client.user_input(thread_id)
    with pytest.raises(RuntimeError, match="closed"):
        client.user_input(thread_id)
    client.close()  # idempotent


# -- async -------------------------------------------------------------------------------------


async def test_async_allocate_each_kind(
    turnid_async_client: AsyncTurnIdClient, thread_id: str
) -> None:
    client = turnid_async_client
    realtime = await client.allocate(thread_id, TurnKind.REALTIME_DELEGATION)
    compaction = await client.allocate(thread_id, TurnKind.AUTO_COMPACTION)
    user = await client.allocate(thread_id, TurnKind.USER_INPUT)
    assert [t.sequence for t in (realtime, compaction, user)] == [1, 2, 3]
    assert_uuid7(realtime)
    assert_uuid7(user)
    assert compaction.turn_id == "auto-compact-0"
    for turn in (realtime, compaction, user):
        assert turn.request_id
        assert_recent(turn)


async def test_async_shortcuts(turnid_async_client: AsyncTurnIdClient, thread_id: str) -> None:
    client = turnid_async_client
    first = await client.auto_compaction(thread_id)
    realtime = await client.realtime_delegation(thread_id)
    user = await client.user_input(thread_id)
    second = await client.auto_compaction(thread_id, request_id="compact-2")
    assert (first.turn_id, second.turn_id) == ("auto-compact-0", "auto-compact-1")
    assert realtime.kind is TurnKind.REALTIME_DELEGATION
    assert user.kind is TurnKind.USER_INPUT
    assert await client.auto_compaction(thread_id, request_id="compact-2") == second


async def test_async_allocate_batch(turnid_async_client: AsyncTurnIdClient, thread_id: str) -> None:
    batch = await turnid_async_client.allocate_batch(thread_id, TurnKind.REALTIME_DELEGATION, 4)
    assert [t.sequence for t in batch] == [1, 2, 3, 4]
    ids = [t.turn_id for t in batch]
    assert ids == sorted(ids), "UUIDv7 from one process are strictly increasing"
    assert len(set(ids)) == 4


async def test_async_claim_and_get(turnid_async_client: AsyncTurnIdClient, thread_id: str) -> None:
    claimed = await turnid_async_client.claim(
        thread_id, "legacy-1", TurnKind.REALTIME_DELEGATION, request_id="claim-1"
    )
    assert claimed.claimed
    assert claimed.request_id == "claim-1"
    assert await turnid_async_client.get(thread_id, "legacy-1") == claimed


async def test_async_list_turns(turnid_async_client: AsyncTurnIdClient, thread_id: str) -> None:
    turns = await turnid_async_client.allocate_batch(thread_id, TurnKind.AUTO_COMPACTION, 5)
    listed = [turn async for turn in turnid_async_client.list_turns(thread_id, page_size=2)]
    assert listed == turns
    empty = [turn async for turn in turnid_async_client.list_turns(f"{thread_id}-none")]
    assert empty == []


async def test_async_context_manager_and_lazy_channel(
    turnid_server: TurnIdTestServer, thread_id: str
) -> None:
    client = AsyncTurnIdClient(turnid_server.target)
    assert client.loop is None  # no channel until the first call
    async with client:
        await client.user_input(thread_id)
    with pytest.raises(RuntimeError, match="closed"):
        await client.user_input(thread_id)
