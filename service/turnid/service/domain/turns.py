"""TurnService: the use cases. Validates input, builds allocations, and asks the store."""

from __future__ import annotations

from dataclasses import dataclass

from turnid.service.domain import paging, validation
from turnid.service.domain.errors import turn_not_found
from turnid.service.domain.model import Allocation, Turn
from turnid.service.domain.store import Store


@dataclass(frozen=True, slots=True)
class TurnPage:
    turns: list[Turn]
    next_page_token: str


class TurnService:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def allocate(self, thread_id: str, kind: int, request_id: str = "") -> Turn:
        (turn,) = await self.allocate_batch(thread_id, kind, 1, request_id)
        return turn

    async def allocate_batch(
        self, thread_id: str, kind: int, count: int, request_id: str = ""
    ) -> list[Turn]:
        allocation = Allocation(
            validation.thread_id(thread_id),
            validation.kind(kind),
            validation.count(count),
            validation.request_id(request_id),
        )
        return await self.store.allocate(allocation)

    async def claim(self, thread_id: str, turn_id: str, kind: int, request_id: str = "") -> Turn:
        allocation = Allocation(
            validation.thread_id(thread_id),
            validation.claimable_kind(kind),
            1,
            validation.request_id(request_id),
            claimed_turn_id=validation.claimable_turn_id(turn_id),
        )
        (turn,) = await self.store.allocate(allocation)
        return turn

    async def get(self, thread_id: str, turn_id: str) -> Turn:
        turn = await self.store.get(validation.thread_id(thread_id), validation.turn_id(turn_id))
        if turn is None:
            raise turn_not_found(thread_id, turn_id)
        return turn

    async def list(self, thread_id: str, page_size: int = 0, page_token: str = "") -> TurnPage:
        validation.thread_id(thread_id)
        limit = validation.page_size(page_size)
        after = paging.decode(thread_id, page_token)
        # One extra row tells whether another page exists without a second query.
        turns = await self.store.list(thread_id, after, limit + 1)
        if len(turns) > limit:
            turns = turns[:limit]
            return TurnPage(turns, paging.encode(thread_id, turns[-1].sequence))
        return TurnPage(turns, "")
