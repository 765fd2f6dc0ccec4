"""The `memory:` store: for tests and throwaway runs. Nothing survives the process."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from turnid.service.domain.allocation import Replay, decide
from turnid.service.domain.model import (
    NEW_THREAD,
    Allocation,
    Replayed,
    RequestRecord,
    ThreadInfo,
    ThreadState,
    Turn,
)
from turnid.service.domain.watch import ChangeFeed


@dataclass(slots=True)
class _Thread:
    state: ThreadState = NEW_THREAD
    turns: list[Turn] = field(default_factory=list)  # index = sequence - 1
    by_turn_id: dict[str, Turn] = field(default_factory=dict)
    requests: dict[str, RequestRecord] = field(default_factory=dict)


class MemoryStore:
    def __init__(self) -> None:
        self._threads: dict[tuple[str, str], _Thread] = {}
        self.changes = ChangeFeed()

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        self.changes.close()

    async def allocate(self, allocation: Allocation) -> Sequence[Turn]:
        return self._allocate(allocation)

    async def allocate_many(
        self, allocations: Sequence[Allocation]
    ) -> list[Sequence[Turn] | Exception]:
        # Through allocate(), which never awaits: each is still one atomic step, and a store
        # built on this one that changes allocate() changes this too.
        results: list[Sequence[Turn] | Exception] = []
        for allocation in allocations:
            try:
                results.append(await self.allocate(allocation))
            except Exception as error:
                results.append(error)
        return results

    def _allocate(self, allocation: Allocation) -> Sequence[Turn]:
        # Not a coroutine: on one event loop this runs as one atomic step, the thread's
        # serialization point.
        key = (allocation.namespace, allocation.thread_id)
        thread = self._threads.get(key) or _Thread()
        seen = thread.requests.get(allocation.request_id) if allocation.request_id else None
        decision = decide(
            allocation, thread.state, seen, thread.by_turn_id.__contains__, time.time_ns() // 1000
        )
        if isinstance(decision, Replay):
            first = decision.first_sequence - 1
            return Replayed(thread.turns[first : first + decision.count])
        self._threads[key] = thread
        thread.state = decision.state
        turns = list(decision.turns)
        thread.turns += turns
        thread.by_turn_id.update(zip(decision.turns.turn_ids, turns, strict=True))
        if decision.record is not None:
            thread.requests[allocation.request_id] = decision.record
        self.changes.publish(key)
        return decision.turns

    async def get(self, namespace: str, thread_id: str, turn_id: str) -> Turn | None:
        thread = self._threads.get((namespace, thread_id))
        return thread.by_turn_id.get(turn_id) if thread else None

    async def list(
        self, namespace: str, thread_id: str, after_sequence: int, limit: int
    ) -> list[Turn]:
        thread = self._threads.get((namespace, thread_id))
        if thread is None:
            return []
        # turns[i] has sequence i + 1.
        return thread.turns[after_sequence : after_sequence + limit]

    async def get_thread(self, namespace: str, thread_id: str) -> ThreadInfo | None:
        thread = self._threads.get((namespace, thread_id))
        if thread is None or not thread.turns:
            return None
        return ThreadInfo(thread_id, thread.state, thread.turns[-1])
