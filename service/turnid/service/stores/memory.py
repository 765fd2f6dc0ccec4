"""The `memory:` store: for tests and throwaway runs. Nothing survives the process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from turnid.service.domain.errors import request_id_reused, turn_id_taken
from turnid.service.domain.model import Allocation, Turn


@dataclass(slots=True)
class _Thread:
    turns: list[Turn] = field(default_factory=list)  # index = sequence - 1
    by_turn_id: dict[str, Turn] = field(default_factory=dict)
    requests: dict[str, tuple[Allocation, int]] = field(default_factory=dict)  # -> first seq
    next_compaction: int = 0


class MemoryStore:
    def __init__(self) -> None:
        self._threads: dict[str, _Thread] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def allocate(self, allocation: Allocation) -> list[Turn]:
        # No await inside: on one event loop this runs as one atomic step.
        thread = self._threads.get(allocation.thread_id)
        if thread is None:
            thread = self._threads[allocation.thread_id] = _Thread()
        if allocation.request_id:
            seen = thread.requests.get(allocation.request_id)
            if seen is not None:
                original, first = seen
                if not allocation.same_request(
                    original.kind, original.count, original.claimed_turn_id
                ):
                    raise request_id_reused(allocation.thread_id, allocation.request_id)
                return thread.turns[first - 1 : first - 1 + original.count]
        claimed = allocation.claimed_turn_id
        if claimed is not None and claimed in thread.by_turn_id:
            raise turn_id_taken(allocation.thread_id, claimed)

        first = len(thread.turns) + 1
        now_us = time.time_ns() // 1000
        turns = [
            Turn(
                allocation.thread_id,
                turn_id,
                allocation.kind,
                first + i,
                now_us,
                allocation.request_id,
                claimed is not None,
            )
            for i, turn_id in enumerate(allocation.turn_ids(thread.next_compaction))
        ]
        thread.turns.extend(turns)
        thread.by_turn_id.update((turn.turn_id, turn) for turn in turns)
        thread.next_compaction += allocation.compactions
        if allocation.request_id:
            thread.requests[allocation.request_id] = (allocation, first)
        return turns

    async def get(self, thread_id: str, turn_id: str) -> Turn | None:
        thread = self._threads.get(thread_id)
        return thread.by_turn_id.get(turn_id) if thread else None

    async def list(self, thread_id: str, after_sequence: int, limit: int) -> list[Turn]:
        thread = self._threads.get(thread_id)
        if thread is None:
            return []
        # turns[i] has sequence i + 1.
        return thread.turns[after_sequence : after_sequence + limit]
