"""The Store protocol, the domain's port to storage: what every store must do, identically.

Every key is `(namespace, thread_id)`: threads of different namespaces are unrelated. The
conformance suite in tests/stores/ holds each store to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from turnid.service.domain.errors import TurnIdError
from turnid.service.domain.model import Allocation, ThreadInfo, Turn
from turnid.service.domain.watch import ChangeFeed


class Store(Protocol):
    #: Woken at every commit that adds turns to a thread (WatchTurns).
    changes: ChangeFeed

    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    async def close(self) -> None:
        """Finish queued writes and release connections."""

    async def allocate(self, allocation: Allocation) -> Sequence[Turn]:
        """Apply one allocation atomically and durably, and return its turns (a TurnRun, or a
        Replayed list for a replay).

        The store reads the thread's state, the request_id's record and taken ids under the
        thread's lock and applies `domain.allocation.decide()`: everything is written or
        nothing is.
        """
        ...

    async def allocate_many(
        self, allocations: Sequence[Allocation]
    ) -> list[Sequence[Turn] | Exception]:
        """allocate() of each allocation, all at once (where the store groups commits, in one
        group): each result is the allocation's turns, or the exception its allocate() would
        have raised. Independent: one refused allocation does not hold back the others."""
        ...

    async def get(self, namespace: str, thread_id: str, turn_id: str) -> Turn | None: ...

    async def list(
        self, namespace: str, thread_id: str, after_sequence: int, limit: int
    ) -> list[Turn]:
        """Up to `limit` turns with sequence > after_sequence, in sequence order."""
        ...

    async def get_thread(self, namespace: str, thread_id: str) -> ThreadInfo | None:
        """Where the thread stands; None when it has no turns."""
        ...


async def allocate_queued(
    enqueue: Callable[[Allocation], asyncio.Future[Sequence[Turn]]],
    allocations: Sequence[Allocation],
) -> list[Sequence[Turn] | Exception]:
    """A queueing store's allocate_many: queue each allocation with `enqueue` (its future, or
    a TurnIdError when refused at the door), then wait for all of them at once (no task per
    allocation) and return each one's turns or exception."""
    outcomes: list[asyncio.Future[Sequence[Turn]] | Exception] = []
    for allocation in allocations:
        try:
            outcomes.append(enqueue(allocation))
        except TurnIdError as refused:  # closing, not open, or the queue is full
            outcomes.append(refused)
    futures = [outcome for outcome in outcomes if not isinstance(outcome, Exception)]
    if futures:
        await asyncio.gather(*futures, return_exceptions=True)
    results: list[Sequence[Turn] | Exception] = []
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            results.append(outcome)
            continue
        error = outcome.exception()
        if error is None:
            results.append(outcome.result())
        elif isinstance(error, Exception):
            results.append(error)
        else:
            raise error
    return results
