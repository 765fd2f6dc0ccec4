"""The store conformance suite: the semantics every store must share (DESIGN.md invariants)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence

import pytest

from turnid.service.domain import Allocation, Replayed, TurnIdError, TurnKind
from turnid.service.stores import Store

from .conftest import StoreFactory


class _Namespace:
    value = ""


#: The namespace every allocation of the running test goes to: the suite runs twice, in the
#: default namespace and in another one (invariant 10).
NS = _Namespace()


@pytest.fixture(autouse=True, params=["", "team-b"], ids=["default-ns", "other-ns"])
def namespace(request: pytest.FixtureRequest) -> str:
    NS.value = request.param
    return NS.value


def A(*args: object, **kwargs: object) -> Allocation:
    """An Allocation in the test's namespace."""
    kwargs.setdefault("namespace", NS.value)
    return Allocation(*args, **kwargs)  # type: ignore[arg-type]


REALTIME = TurnKind.REALTIME_DELEGATION
COMPACTION = TurnKind.AUTO_COMPACTION
USER = TurnKind.USER_INPUT


async def one(store: Store, thread_id: str, kind: TurnKind, request_id: str = ""):  # type: ignore[no-untyped-def]
    (turn,) = await store.allocate(A(thread_id, kind, 1, request_id))
    return turn


async def all_turns(store: Store, thread_id: str) -> list:  # type: ignore[type-arg]
    return await store.list(NS.value, thread_id, 0, 100_000)


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
    assert await store.get(NS.value, thread_id, turn.turn_id) == turn


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
    batch = await store.allocate(A(thread_id, COMPACTION, 5))
    assert [t.sequence for t in batch] == [2, 3, 4, 5, 6]
    assert [t.turn_id for t in batch] == [f"auto-compact-{n}" for n in range(5)]
    uuids = await store.allocate(A(thread_id, USER, 4))
    assert [t.sequence for t in uuids] == [7, 8, 9, 10]
    assert [t.turn_id for t in uuids] == sorted(t.turn_id for t in uuids)
    assert (await one(store, thread_id, COMPACTION)).turn_id == "auto-compact-5"


async def test_big_batches_among_small_allocations_read_back_as_answered(
    store: Store, thread_id: str
) -> None:
    # One group (where the store groups) mixing big batches, small ones and single turns in
    # the same threads: every turn reads back exactly as it was answered, in sequence order.
    other = thread_id + "-other"
    answers = await store.allocate_many(
        [
            A(thread_id, REALTIME, 1, "single"),
            A(thread_id, USER, 300, "big-uuids"),
            A(other, COMPACTION, 40),
            A(thread_id, COMPACTION, 3),
            A(thread_id, COMPACTION, 17, "big-compactions"),
            A(other, REALTIME, 16),
            A(thread_id, REALTIME, 1, claimed_turn_id="legacy-1"),
        ]
    )
    results: list[list] = []  # type: ignore[type-arg]
    for answer in answers:
        assert isinstance(answer, Sequence), answer
        results.append(answer)
    mine = [turn for result in results for turn in result if turn.thread_id == thread_id]
    theirs = [turn for result in results for turn in result if turn.thread_id == other]
    assert [t.sequence for t in mine] == list(range(1, 323))
    assert [t.sequence for t in theirs] == list(range(1, 57))
    assert [t.turn_id for t in mine if t.kind is COMPACTION] == [
        f"auto-compact-{n}" for n in range(20)
    ]
    big = results[1]
    assert {(t.kind, t.request_id, t.claimed) for t in big} == {(USER, "big-uuids", False)}
    assert len({t.create_time_us for t in big}) == 1
    for turn in big:
        assert_uuid7(turn.turn_id)
    assert [t.turn_id for t in big] == sorted({t.turn_id for t in big})
    assert results[6][0].claimed
    assert await all_turns(store, thread_id) == mine
    assert await all_turns(store, other) == theirs
    for turn in (big[0], big[150], big[-1], results[4][-1], results[5][0]):
        assert await store.get(NS.value, turn.thread_id, turn.turn_id) == turn
    assert await store.allocate(A(thread_id, USER, 300, "big-uuids")) == big


async def test_request_id_retry_returns_the_original(store: Store, thread_id: str) -> None:
    first = await one(store, thread_id, REALTIME, "step-1")
    compaction = await one(store, thread_id, COMPACTION, "step-2")
    assert await one(store, thread_id, REALTIME, "step-1") == first
    assert await one(store, thread_id, COMPACTION, "step-2") == compaction
    batch = await store.allocate(A(thread_id, COMPACTION, 3, "step-3"))
    assert not isinstance(batch, Replayed)
    again = await store.allocate(A(thread_id, COMPACTION, 3, "step-3"))
    assert again == batch
    assert isinstance(again, Replayed)  # the servicer counts replays apart (metrics)
    assert len(await all_turns(store, thread_id)) == 5
    assert (await one(store, thread_id, COMPACTION)).turn_id == "auto-compact-4"


@pytest.mark.parametrize(
    "retry",
    [
        A("", USER, 1, "rid"),
        A("", REALTIME, 2, "rid"),
        A("", REALTIME, 1, "rid", claimed_turn_id="legacy-1"),
    ],
    ids=["other-kind", "other-count", "claim"],
)
async def test_request_id_reused_for_another_request_is_refused(
    store: Store, thread_id: str, retry: Allocation
) -> None:
    original = await one(store, thread_id, REALTIME, "rid")
    with pytest.raises(TurnIdError) as caught:
        await store.allocate(A(thread_id, retry.kind, retry.count, "rid", retry.claimed_turn_id))
    assert caught.value.reason == "REQUEST_ID_REUSED"
    assert await all_turns(store, thread_id) == [original]


async def test_request_id_is_scoped_to_its_thread(store: Store, thread_id: str) -> None:
    a = await one(store, thread_id, COMPACTION, "same")
    b = await one(store, thread_id + "-b", COMPACTION, "same")
    assert (a.thread_id, b.thread_id) == (thread_id, thread_id + "-b")
    assert a.turn_id == b.turn_id == "auto-compact-0"


async def test_claim_records_an_id_minted_elsewhere(store: Store, thread_id: str) -> None:
    await one(store, thread_id, COMPACTION)
    (claimed,) = await store.allocate(A(thread_id, REALTIME, 1, "c1", claimed_turn_id="rollout-7"))
    assert (claimed.turn_id, claimed.sequence, claimed.claimed) == ("rollout-7", 2, True)
    assert await store.get(NS.value, thread_id, "rollout-7") == claimed
    # A retry of the claim is idempotent; the counter is untouched by claims.
    assert await store.allocate(A(thread_id, REALTIME, 1, "c1", claimed_turn_id="rollout-7")) == [
        claimed
    ]
    assert (await one(store, thread_id, COMPACTION)).turn_id == "auto-compact-1"


async def test_claim_of_a_taken_id_is_refused_and_writes_nothing(
    store: Store, thread_id: str
) -> None:
    allocated = await one(store, thread_id, REALTIME)
    for taken in (allocated.turn_id, "rollout-1"):
        if taken == "rollout-1":
            await store.allocate(A(thread_id, USER, 1, claimed_turn_id=taken))
        before = await all_turns(store, thread_id)
        with pytest.raises(TurnIdError) as caught:
            await store.allocate(A(thread_id, USER, 1, "new-rid", claimed_turn_id=taken))
        assert caught.value.reason == "TURN_ID_TAKEN"
        assert await all_turns(store, thread_id) == before
    # The refused request_id was not recorded: it can be used for something else.
    assert (await one(store, thread_id, USER, "new-rid")).sequence == 3


async def test_same_claimed_id_in_another_thread_is_fine(store: Store, thread_id: str) -> None:
    await store.allocate(A(thread_id, USER, 1, claimed_turn_id="rollout-0"))
    (other,) = await store.allocate(A(thread_id + "-b", USER, 1, claimed_turn_id="rollout-0"))
    assert other.sequence == 1


async def test_get_and_list_of_unknown_things(store: Store, thread_id: str) -> None:
    assert await store.get(NS.value, thread_id, "nope") is None
    assert await store.list(NS.value, thread_id, 0, 10) == []
    await one(store, thread_id, REALTIME)
    assert await store.get(NS.value, thread_id, "nope") is None


async def test_list_pages_by_sequence(store: Store, thread_id: str) -> None:
    turns = await store.allocate(A(thread_id, USER, 25))
    assert await store.list(NS.value, thread_id, 0, 10) == turns[:10]
    assert await store.list(NS.value, thread_id, 10, 10) == turns[10:20]
    assert await store.list(NS.value, thread_id, 20, 10) == turns[20:]
    assert await store.list(NS.value, thread_id, 25, 10) == []


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
    await store.allocate(A(thread_id, USER, 1, claimed_turn_id="taken"))
    requests = [
        A(thread_id, COMPACTION, 1),
        A(thread_id, USER, 1, claimed_turn_id="taken"),
        A(thread_id, COMPACTION, 2),
        A(thread_id, USER, 1, claimed_turn_id="fresh"),
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


async def test_allocate_many_answers_each_allocation_as_allocate_would(
    store: Store, thread_id: str
) -> None:
    await store.allocate(A(thread_id, USER, 1, claimed_turn_id="taken"))
    (first,) = await store.allocate(A(thread_id, COMPACTION, 1, "r-first"))
    other = f"{thread_id}-other"
    outcomes = await store.allocate_many(
        [
            A(thread_id, REALTIME, 1, "r-new"),
            A(thread_id, USER, 1, claimed_turn_id="taken"),  # refused: TURN_ID_TAKEN
            A(thread_id, COMPACTION, 1, "r-first"),  # a retry: the original turn
            A(thread_id, REALTIME, 2, "r-first"),  # refused: REQUEST_ID_REUSED
            A(other, COMPACTION, 2, expected_last_sequence=0),
            A(other, COMPACTION, 1, expected_last_sequence=0),  # refused: THREAD_ADVANCED
            A(thread_id, COMPACTION, 1),
        ]
    )
    assert len(outcomes) == 7
    refused = {i: o.reason for i, o in enumerate(outcomes) if isinstance(o, TurnIdError)}
    assert refused == {1: "TURN_ID_TAKEN", 3: "REQUEST_ID_REUSED", 5: "THREAD_ADVANCED"}
    granted = [o for o in outcomes if isinstance(o, Sequence)]
    assert len(granted) == 4
    realtime, replay, others, compaction = granted
    assert replay == [first]
    assert isinstance(replay, Replayed) and not isinstance(realtime, Replayed)
    assert [t.turn_id for t in others] == ["auto-compact-0", "auto-compact-1"]
    assert [t.sequence for t in others] == [1, 2]
    # The granted ones are in the thread, gap-free, once each; the refused wrote nothing.
    turns = await all_turns(store, thread_id)
    assert [t.sequence for t in turns] == [1, 2, 3, 4]
    assert {t.turn_id for t in turns} == {
        "taken",
        first.turn_id,
        realtime[0].turn_id,
        compaction[0].turn_id,
    }
    assert compaction[0].turn_id == "auto-compact-1"
    assert await all_turns(store, other) == others


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
        A("", REALTIME, 1),
        A("", COMPACTION, 1),
        A("", USER, 1),
        A("", COMPACTION, 3),
        A("", USER, 1, claimed_turn_id="legacy"),
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
        allocation = A(thread_id, request_.kind, request_.count, f"r{round_}", claimed)
        outcomes = await asyncio.gather(
            *(stores[i % len(stores)].allocate(allocation) for i in range(copies)),
            return_exceptions=True,
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert not errors, f"round {round_}: {errors[:1]}"
        results = [o for o in outcomes if isinstance(o, Sequence)]
        assert all(r == results[0] for r in results), f"round {round_}: {results}"
        first_results.extend(results[0])
    assert await all_turns(stores[0], thread_id) == first_results
    assert [t.sequence for t in first_results] == list(range(1, rounds * request_.count + 1))


# --- namespaces (invariant 10) ----------------------------------------------------------------


async def test_namespaces_are_independent(store: Store, thread_id: str) -> None:
    other = NS.value + "-elsewhere"
    mine = [await one(store, thread_id, COMPACTION, "r") for _ in range(2)]
    (theirs,) = await store.allocate(Allocation(thread_id, COMPACTION, 1, "r", namespace=other))
    # The same thread id in another namespace has its own counters, history and request ids.
    assert (theirs.turn_id, theirs.sequence) == ("auto-compact-0", 1)
    assert mine[0] == mine[1]
    assert await store.get(other, thread_id, mine[0].turn_id) == theirs  # its own turn
    assert await store.list(other, thread_id, 0, 10) == [theirs]
    assert await all_turns(store, thread_id) == [mine[0]]
    # A claim in one namespace does not block the same id in the other.
    await store.allocate(A(thread_id, USER, 1, claimed_turn_id="rollout-1"))
    (claimed,) = await store.allocate(
        Allocation(thread_id, USER, 1, claimed_turn_id="rollout-1", namespace=other)
    )
    assert claimed.sequence == 2
    # An unknown namespace sees nothing at all.
    stranger = NS.value + "-stranger"
    assert await store.get(stranger, thread_id, "rollout-1") is None
    assert await store.list(stranger, thread_id, 0, 10) == []
    assert await store.get_thread(stranger, thread_id) is None


# --- GetThread --------------------------------------------------------------------------------


async def test_get_thread_tells_where_the_thread_stands(store: Store, thread_id: str) -> None:
    assert await store.get_thread(NS.value, thread_id) is None
    before_us = time.time_ns() // 1000
    await one(store, thread_id, COMPACTION)
    await store.allocate(A(thread_id, USER, 2))
    last = await one(store, thread_id, COMPACTION)
    info = await store.get_thread(NS.value, thread_id)
    assert info is not None
    assert info.thread_id == thread_id
    assert info.last_turn == last
    assert (info.state.last_sequence, info.state.next_compaction) == (4, 2)
    assert before_us - 1_000_000 <= info.state.create_time_us <= info.state.update_time_us
    assert info.state.update_time_us == last.create_time_us


# --- conditional allocation -------------------------------------------------------------------


async def test_conditional_allocation(store: Store, thread_id: str) -> None:
    (first,) = await store.allocate(A(thread_id, USER, 1, "a", expected_last_sequence=0))
    with pytest.raises(TurnIdError) as caught:
        await store.allocate(A(thread_id, USER, 1, "b", expected_last_sequence=0))
    assert caught.value.reason == "THREAD_ADVANCED"
    assert caught.value.metadata["last_sequence"] == "1"
    # A known request_id is replayed before the condition is checked.
    assert await store.allocate(A(thread_id, USER, 1, "a", expected_last_sequence=0)) == [first]
    batch = await store.allocate(A(thread_id, COMPACTION, 3, "c", expected_last_sequence=1))
    assert [t.sequence for t in batch] == [2, 3, 4]
    with pytest.raises(TurnIdError) as caught:
        await store.allocate(A(thread_id, USER, 1, claimed_turn_id="x", expected_last_sequence=3))
    assert caught.value.reason == "THREAD_ADVANCED"
    (claimed,) = await store.allocate(
        A(thread_id, USER, 1, claimed_turn_id="x", expected_last_sequence=4)
    )
    assert claimed.sequence == 5
    assert len(await all_turns(store, thread_id)) == 5


async def test_conditional_racers_have_exactly_one_winner(
    store_factory: StoreFactory, thread_id: str
) -> None:
    stores = [await store_factory(), await store_factory()]
    for round_ in range(8):
        outcomes = await asyncio.gather(
            *(
                stores[i % 2].allocate(
                    A(thread_id, REALTIME, 1, f"r{round_}-{i}", expected_last_sequence=round_)
                )
                for i in range(16)
            ),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if isinstance(o, Sequence)]
        losers = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(winners) == 1, f"round {round_}: {outcomes}"
        assert all(isinstance(o, TurnIdError) and o.reason == "THREAD_ADVANCED" for o in losers), (
            losers
        )
    assert [t.sequence for t in await all_turns(stores[0], thread_id)] == list(range(1, 9))


# --- UUIDv7 order is history order (invariant 8) ----------------------------------------------


async def test_minted_ids_sort_in_sequence_order(
    store_factory: StoreFactory, thread_id: str
) -> None:
    stores = [await store_factory(), await store_factory()]
    kinds = [REALTIME, USER]
    await asyncio.gather(
        *(stores[i % 2].allocate(A(thread_id, kinds[i % 2], 1 + i % 3)) for i in range(400))
    )
    turns = await all_turns(stores[0], thread_id)
    assert [t.sequence for t in turns] == list(range(1, len(turns) + 1))
    ids = [t.turn_id for t in turns]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


async def test_minting_follows_a_thread_minted_ahead_of_our_clock(
    store: Store, thread_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another replica whose clock runs an hour ahead minted the thread's last id: ours follow
    # it (its millisecond, a higher counter) instead of going back in time.
    from turnid.service.domain import minting

    ahead = int(time.time() * 1000) + 3_600_000
    future = str(uuid.UUID(int=(ahead << 80) | (0x7 << 76) | (0b10 << 62) | 5))
    real = minting.uuid_utils.uuid7
    monkeypatch.setattr(minting.uuid_utils, "uuid7", lambda: uuid.UUID(future))
    (first,) = await store.allocate(A(thread_id, REALTIME, 1))
    monkeypatch.setattr(minting.uuid_utils, "uuid7", real)
    assert first.turn_id == future
    later = await store.allocate(A(thread_id, USER, 3))
    ids = [t.turn_id for t in later]
    assert ids == sorted(ids) and ids[0] > future
    assert all(uuid.UUID(i).int >> 80 == ahead for i in ids)
    for text in ids:
        assert_uuid7(text)


async def test_a_minted_id_that_collides_with_a_claim_is_minted_again(
    store: Store, thread_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from turnid.service.domain import allocation

    claimed_id = str(uuid.UUID(int=(int(time.time() * 1000) << 80) | (0x7 << 76) | (2 << 62)))
    await store.allocate(A(thread_id, USER, 1, claimed_turn_id=claimed_id))
    # The generator's next id is the claimed one, on both of decide's paths (a run's first id,
    # checked; then each id on its own).
    monkeypatch.setattr(allocation, "mint_uuid7s", lambda count: [claimed_id] * count)
    monkeypatch.setattr(allocation, "mint_uuid7_after", lambda last: claimed_id)
    (minted,) = await store.allocate(A(thread_id, REALTIME, 1))
    assert minted.turn_id != claimed_id
    assert minted.turn_id > claimed_id
    assert_uuid7(minted.turn_id)
    assert len({t.turn_id for t in await all_turns(store, thread_id)}) == 2


# --- change feed (WatchTurns) -----------------------------------------------------------------


async def test_watchers_of_a_thread_are_woken_by_its_commits(
    store_factory: StoreFactory, thread_id: str
) -> None:
    from turnid.service.domain import TurnService

    writer = await store_factory()
    watcher_store = await store_factory()  # another instance (process, replica) when durable
    watch = await TurnService(watcher_store).watch(thread_id, 0, namespace=NS.value)
    first = await anext(watch)
    assert (first.turns, first.caught_up) == ([], True)
    seen: list[int] = []
    allocated = []
    for _ in range(3):
        allocated += await writer.allocate(A(thread_id, COMPACTION, 2))
        while len(seen) < len(allocated):
            update = await asyncio.wait_for(anext(watch), 10)
            assert update.caught_up
            seen += [t.sequence for t in update.turns]
    assert seen == [t.sequence for t in allocated] == list(range(1, 7))
    await watch.aclose()
    assert watcher_store.changes.watchers == 0


async def test_a_retry_in_the_same_group_is_a_replay(store: Store, thread_id: str) -> None:
    first, retry = await store.allocate_many(
        [A(thread_id, USER, 2, "dup"), A(thread_id, USER, 2, "dup")]
    )
    assert isinstance(first, Sequence) and isinstance(retry, Sequence)
    assert retry == first and len(first) == 2
    assert isinstance(retry, Replayed) and not isinstance(first, Replayed)
    assert len(await all_turns(store, thread_id)) == 2
