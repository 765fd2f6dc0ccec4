"""The store conformance suite: the semantics every store must share (DESIGN.md invariants)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from turnid.service.domain import Allocation, TurnIdError, TurnKind
from turnid.service.stores import Store

from .conftest import StoreFactory

REALTIME = TurnKind.REALTIME_DELEGATION
COMPACTION = TurnKind.AUTO_COMPACTION
USER = TurnKind.USER_INPUT


async def one(store: Store, thread_id: str, kind: TurnKind, request_id: str = ""):  # type: ignore[no-untyped-def]
    (turn,) = await store.allocate(Allocation(thread_id, kind, 1, request_id))
    return turn


async def all_turns(store: Store, thread_id: str) -> list:  # type: ignore[type-arg]
    return await store.list(thread_id, 0, 100_000)


def assert_uuid7(text: str) -> None:
    parsed = uuid.UUID(text)
    assert str(parsed) == text
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122


async def test_realtime_turn_gets_uuid7_and_first_sequence(store: Store, thread_id: str) -> None:
    before_us = time.time_ns() // 1000
    turn = await one(store, thread_id, REALTIME)
    assert_uuid7(turn.turn_id)
    assert (turn.thread_id, turn.kind, turn.sequence, turn.claimed) == (
        thread_id,
        REALTIME,
        1,
        False,
    )
    assert before_us - 1_000_000 <= turn.create_time_us <= time.time_ns() // 1000 + 1_000_000
    assert await store.get(thread_id, turn.turn_id) == turn


async def test_compaction_counter_is_thread_scoped(store: Store, thread_id: str) -> None:
    other = thread_id + "-other"
    ids = [(await one(store, thread_id, COMPACTION)).turn_id for _ in range(3)]
    assert ids == ["auto-compact-0", "auto-compact-1", "auto-compact-2"]
    assert (await one(store, other, COMPACTION)).turn_id == "auto-compact-0"
    assert (await one(store, thread_id, COMPACTION)).turn_id == "auto-compact-3"


async def test_sequence_is_gap_free_across_kinds(store: Store, thread_id: str) -> None:
    kinds = [REALTIME, COMPACTION, USER, COMPACTION, REALTIME]
    turns = [await one(store, thread_id, kind) for kind in kinds]
    assert [t.sequence for t in turns] == [1, 2, 3, 4, 5]
    assert [t.turn_id for t in turns if t.kind is COMPACTION] == [
        "auto-compact-0",
        "auto-compact-1",
    ]
    assert await all_turns(store, thread_id) == turns


async def test_batch_takes_consecutive_sequences(store: Store, thread_id: str) -> None:
    await one(store, thread_id, REALTIME)
    batch = await store.allocate(Allocation(thread_id, COMPACTION, 5))
    assert [t.sequence for t in batch] == [2, 3, 4, 5, 6]
    assert [t.turn_id for t in batch] == [f"auto-compact-{n}" for n in range(5)]
    uuids = await store.allocate(Allocation(thread_id, USER, 4))
    assert [t.sequence for t in uuids] == [7, 8, 9, 10]
    assert [t.turn_id for t in uuids] == sorted(t.turn_id for t in uuids)
    assert (await one(store, thread_id, COMPACTION)).turn_id == "auto-compact-5"


async def test_request_id_retry_returns_the_original(store: Store, thread_id: str) -> None:
    first = await one(store, thread_id, REALTIME, "step-1")
    compaction = await one(store, thread_id, COMPACTION, "step-2")
    assert await one(store, thread_id, REALTIME, "step-1") == first
    assert await one(store, thread_id, COMPACTION, "step-2") == compaction
    batch = await store.allocate(Allocation(thread_id, COMPACTION, 3, "step-3"))
    assert await store.allocate(Allocation(thread_id, COMPACTION, 3, "step-3")) == batch
    assert len(await all_turns(store, thread_id)) == 5
    assert (await one(store, thread_id, COMPACTION)).turn_id == "auto-compact-4"


@pytest.mark.parametrize(
    "retry",
    [
        Allocation("", USER, 1, "rid"),
        Allocation("", REALTIME, 2, "rid"),
        Allocation("", REALTIME, 1, "rid", claimed_turn_id="legacy-1"),
    ],
    ids=["other-kind", "other-count", "claim"],
)
async def test_request_id_reused_for_another_request_is_refused(
    store: Store, thread_id: str, retry: Allocation
) -> None:
    original = await one(store, thread_id, REALTIME, "rid")
    with pytest.raises(TurnIdError) as caught:
        await store.allocate(
            Allocation(thread_id, retry.kind, retry.count, "rid", retry.claimed_turn_id)
        )
    assert caught.value.reason == "REQUEST_ID_REUSED"
    assert await all_turns(store, thread_id) == [original]


async def test_request_id_is_scoped_to_its_thread(store: Store, thread_id: str) -> None:
    a = await one(store, thread_id, COMPACTION, "same")
    b = await one(store, thread_id + "-b", COMPACTION, "same")
    assert (a.thread_id, b.thread_id) == (thread_id, thread_id + "-b")
    assert a.turn_id == b.turn_id == "auto-compact-0"


async def test_claim_records_an_id_minted_elsewhere(store: Store, thread_id: str) -> None:
    await one(store, thread_id, COMPACTION)
    (claimed,) = await store.allocate(
        Allocation(thread_id, REALTIME, 1, "c1", claimed_turn_id="rollout-7")
    )
    assert (claimed.turn_id, claimed.sequence, claimed.claimed) == ("rollout-7", 2, True)
    assert await store.get(thread_id, "rollout-7") == claimed
    # A retry of the claim is idempotent; the counter is untouched by claims.
    assert await store.allocate(
        Allocation(thread_id, REALTIME, 1, "c1", claimed_turn_id="rollout-7")
    ) == [claimed]
    assert (await one(store, thread_id, COMPACTION)).turn_id == "auto-compact-1"


async def test_claim_of_a_taken_id_is_refused_and_writes_nothing(
    store: Store, thread_id: str
) -> None:
    allocated = await one(store, thread_id, REALTIME)
    for taken in (allocated.turn_id, "rollout-1"):
        if taken == "rollout-1":
            await store.allocate(Allocation(thread_id, USER, 1, claimed_turn_id=taken))
        before = await all_turns(store, thread_id)
        with pytest.raises(TurnIdError) as caught:
            await store.allocate(Allocation(thread_id, USER, 1, "new-rid", claimed_turn_id=taken))
        assert caught.value.reason == "TURN_ID_TAKEN"
        assert await all_turns(store, thread_id) == before
    # The refused request_id was not recorded: it can be used for something else.
    assert (await one(store, thread_id, USER, "new-rid")).sequence == 3


async def test_same_claimed_id_in_another_thread_is_fine(store: Store, thread_id: str) -> None:
    await store.allocate(Allocation(thread_id, USER, 1, claimed_turn_id="rollout-0"))
    (other,) = await store.allocate(
        Allocation(thread_id + "-b", USER, 1, claimed_turn_id="rollout-0")
    )
    assert other.sequence == 1


async def test_get_and_list_of_unknown_things(store: Store, thread_id: str) -> None:
    assert await store.get(thread_id, "nope") is None
    assert await store.list(thread_id, 0, 10) == []
    await one(store, thread_id, REALTIME)
    assert await store.get(thread_id, "nope") is None


async def test_list_pages_by_sequence(store: Store, thread_id: str) -> None:
    turns = await store.allocate(Allocation(thread_id, USER, 25))
    assert await store.list(thread_id, 0, 10) == turns[:10]
    assert await store.list(thread_id, 10, 10) == turns[10:20]
    assert await store.list(thread_id, 20, 10) == turns[20:]
    assert await store.list(thread_id, 25, 10) == []


async def test_concurrent_allocations_stay_unique_and_gap_free(
    store: Store, thread_id: str
) -> None:
    kinds = [REALTIME, COMPACTION, USER, COMPACTION] * 50
    results = await asyncio.gather(*(one(store, thread_id, kind) for kind in kinds))
    turns = await all_turns(store, thread_id)
    assert sorted(results, key=lambda t: t.sequence) == turns
    assert [t.sequence for t in turns] == list(range(1, 201))
    assert len({t.turn_id for t in turns}) == 200
    compactions = [t.turn_id for t in turns if t.kind is COMPACTION]
    assert compactions == [f"auto-compact-{n}" for n in range(100)]


async def test_a_refused_request_does_not_disturb_its_neighbours(
    store: Store, thread_id: str
) -> None:
    await store.allocate(Allocation(thread_id, USER, 1, claimed_turn_id="taken"))
    requests = [
        Allocation(thread_id, COMPACTION, 1),
        Allocation(thread_id, USER, 1, claimed_turn_id="taken"),
        Allocation(thread_id, COMPACTION, 2),
        Allocation(thread_id, USER, 1, claimed_turn_id="fresh"),
    ]
    outcomes = await asyncio.gather(*(store.allocate(r) for r in requests), return_exceptions=True)
    assert isinstance(outcomes[1], TurnIdError) and outcomes[1].reason == "TURN_ID_TAKEN"
    turns = await all_turns(store, thread_id)
    assert [t.sequence for t in turns] == [1, 2, 3, 4, 5]
    assert sorted(t.turn_id for t in turns if t.kind is COMPACTION) == [
        "auto-compact-0",
        "auto-compact-1",
        "auto-compact-2",
    ]


async def test_everything_survives_a_reopen(store_factory: StoreFactory, thread_id: str) -> None:
    if not store_factory.durable:  # type: ignore[attr-defined]
        pytest.skip("the memory store keeps nothing")
    first = await store_factory()
    before = [
        await one(first, thread_id, kind, f"r{i}")
        for i, kind in enumerate([COMPACTION, REALTIME, COMPACTION])
    ]
    await first.close()
    second = await store_factory()
    assert await all_turns(second, thread_id) == before
    assert await one(second, thread_id, COMPACTION, "r0") == before[0]
    assert (await one(second, thread_id, COMPACTION)).turn_id == "auto-compact-2"


@pytest.mark.parametrize(
    "request_",
    [
        Allocation("", REALTIME, 1),
        Allocation("", COMPACTION, 1),
        Allocation("", USER, 1),
        Allocation("", COMPACTION, 3),
        Allocation("", USER, 1, claimed_turn_id="legacy"),
    ],
    ids=["realtime", "compaction", "user-input", "batch", "claim"],
)
async def test_concurrent_retries_of_one_request_all_get_the_original(
    store_factory: StoreFactory, thread_id: str, request_: Allocation
) -> None:
    # Two store instances on one database (durable stores; memory has only the one), as two
    # replicas would be; each round races 8 copies of one request, on a new thread (round 0)
    # and then on one that exists. Every copy gets the same turns; the thread holds one set.
    stores = [await store_factory(), await store_factory()]
    copies, rounds = 8, 5
    first_results = []
    for round_ in range(rounds):
        claimed = None if request_.claimed_turn_id is None else f"legacy-{round_}"
        allocation = Allocation(thread_id, request_.kind, request_.count, f"r{round_}", claimed)
        outcomes = await asyncio.gather(
            *(stores[i % len(stores)].allocate(allocation) for i in range(copies)),
            return_exceptions=True,
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert not errors, f"round {round_}: {errors[:1]}"
        results = [o for o in outcomes if not isinstance(o, BaseException)]
        assert all(r == results[0] for r in results), f"round {round_}: {results}"
        first_results.extend(results[0])
    assert await all_turns(stores[0], thread_id) == first_results
    assert [t.sequence for t in first_results] == list(range(1, rounds * request_.count + 1))
