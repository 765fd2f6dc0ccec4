"""TurnService: the use cases. Validates input, builds allocations, and asks the store."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from turnid.service.domain import paging, validation
from turnid.service.domain.errors import thread_not_found, turn_not_found
from turnid.service.domain.model import Allocation, ThreadInfo, Turn
from turnid.service.domain.store import Store

#: Turns per WatchTurns message (and per read behind it): bounds a watcher's memory.
WATCH_PAGE = 1000


@dataclass(frozen=True, slots=True)
class TurnPage:
    turns: list[Turn]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class WatchUpdate:
    """One WatchTurns message: new turns (maybe none, first) and whether replay is complete."""

    turns: list[Turn]
    caught_up: bool


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """One write as it was asked for, not validated yet: an allocation of `count` turns, or a
    claim of `claimed_turn_id` (not None)."""

    thread_id: str
    kind: int
    count: int = 1
    request_id: str = ""
    namespace: str = ""
    expected_last_sequence: int | None = None
    claimed_turn_id: str | None = None


class TurnService:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def allocate(
        self,
        thread_id: str,
        kind: int,
        request_id: str = "",
        *,
        namespace: str = "",
        expected_last_sequence: int | None = None,
    ) -> Turn:
        (turn,) = await self.store.allocate(
            _allocation(thread_id, kind, 1, request_id, namespace, expected_last_sequence)
        )
        return turn

    async def allocate_batch(
        self,
        thread_id: str,
        kind: int,
        count: int,
        request_id: str = "",
        *,
        namespace: str = "",
        expected_last_sequence: int | None = None,
    ) -> Sequence[Turn]:
        return await self.store.allocate(
            _allocation(thread_id, kind, count, request_id, namespace, expected_last_sequence)
        )

    async def claim(
        self,
        thread_id: str,
        turn_id: str,
        kind: int,
        request_id: str = "",
        *,
        namespace: str = "",
        expected_last_sequence: int | None = None,
    ) -> Turn:
        (turn,) = await self.store.allocate(
            _allocation(thread_id, kind, 1, request_id, namespace, expected_last_sequence, turn_id)
        )
        return turn

    async def write(self, allocation: Allocation) -> Sequence[Turn]:
        """One validated allocation (see `allocation`): its turns, a `Replayed` list when its
        request_id was seen."""
        return await self.store.allocate(allocation)

    def allocation(self, request: WriteRequest) -> Allocation:
        """The validated Allocation of a write (TurnIdError for bad input), for allocate_many."""
        return _allocation(
            request.thread_id,
            request.kind,
            request.count,
            request.request_id,
            request.namespace,
            request.expected_last_sequence,
            request.claimed_turn_id,
        )

    async def allocate_many(
        self, allocations: Sequence[Allocation]
    ) -> list[Sequence[Turn] | Exception]:
        """Independent allocations at once (the store takes them as one group where it groups):
        each result is the allocation's turns, or the exception (a TurnIdError for a refusal)
        that allocating it alone would have raised."""
        return await self.store.allocate_many(allocations)

    async def get(self, thread_id: str, turn_id: str, *, namespace: str = "") -> Turn:
        turn = await self.store.get(
            namespace, validation.thread_id(thread_id), validation.turn_id(turn_id)
        )
        if turn is None:
            raise turn_not_found(thread_id, turn_id)
        return turn

    async def list(
        self, thread_id: str, page_size: int = 0, page_token: str = "", *, namespace: str = ""
    ) -> TurnPage:
        validation.thread_id(thread_id)
        limit = validation.page_size(page_size)
        after = paging.decode(namespace, thread_id, page_token)
        # One extra row tells whether another page exists without a second query.
        turns = await self.store.list(namespace, thread_id, after, limit + 1)
        if len(turns) > limit:
            turns = turns[:limit]
            return TurnPage(turns, paging.encode(namespace, thread_id, turns[-1].sequence))
        return TurnPage(turns, "")

    async def get_thread(self, thread_id: str, *, namespace: str = "") -> ThreadInfo:
        info = await self.store.get_thread(namespace, validation.thread_id(thread_id))
        if info is None:
            raise thread_not_found(thread_id)
        return info

    async def watch(
        self, thread_id: str, after_sequence: int = 0, *, namespace: str = ""
    ) -> AsyncGenerator[WatchUpdate, None]:
        """Replay turns with sequence > after_sequence, then follow the thread live.

        The first update comes at once (maybe empty); `caught_up` is set on the update that
        completes the replay and on every update after it. Each read starts after the last
        sequence delivered, so no turn is delivered twice or skipped; reads are at most
        WATCH_PAGE turns and the next read waits until the consumer took the update, so a
        slow consumer holds one page, however far the thread runs ahead.
        """
        validation.thread_id(thread_id)
        last = validation.after_sequence(after_sequence)
        return self._watch(namespace, thread_id, last)

    async def _watch(
        self, namespace: str, thread_id: str, last: int
    ) -> AsyncGenerator[WatchUpdate, None]:
        store = self.store
        feed = store.changes
        caught_up = False
        with feed.subscribe((namespace, thread_id)) as subscription:
            while True:
                subscription.clear()  # a commit from here on wakes the wait below
                turns = await store.list(namespace, thread_id, last, WATCH_PAGE)
                if turns:
                    last = turns[-1].sequence
                if not caught_up:
                    caught_up = len(turns) < WATCH_PAGE
                    yield WatchUpdate(turns, caught_up)
                    continue
                if turns:
                    yield WatchUpdate(turns, True)
                    if len(turns) == WATCH_PAGE:
                        continue
                await subscription.wait(feed.fallback_interval)


def _allocation(
    thread_id: str,
    kind: int,
    count: int,
    request_id: str,
    namespace: str,
    expected_last_sequence: int | None,
    claimed_turn_id: str | None = None,
) -> Allocation:
    """A validated Allocation (a claim when `claimed_turn_id` is given), fields checked in
    request order so the first bad field is the one reported."""
    return Allocation(
        validation.thread_id(thread_id),
        validation.kind(kind) if claimed_turn_id is None else validation.claimable_kind(kind),
        validation.count(count),
        validation.request_id(request_id),
        claimed_turn_id=(
            None if claimed_turn_id is None else validation.claimable_turn_id(claimed_turn_id)
        ),
        namespace=namespace,
        expected_last_sequence=validation.expected_last_sequence(expected_last_sequence),
    )
