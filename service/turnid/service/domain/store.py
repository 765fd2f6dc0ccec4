"""The Store protocol, the domain's port to storage: what every store must do, identically.

The conformance suite in tests/stores/ holds each store to it.
"""

from __future__ import annotations

from typing import Protocol

from turnid.service.domain.model import Allocation, Turn


class Store(Protocol):
    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    async def close(self) -> None:
        """Finish queued writes and release connections."""

    async def allocate(self, allocation: Allocation) -> list[Turn]:
        """Apply one allocation atomically and durably, and return its turns.

        A request_id the thread has seen returns the original turns (or raises
        REQUEST_ID_REUSED when the parameters differ); a claimed id the thread already has
        raises TURN_ID_TAKEN; otherwise the thread's counters advance by the allocation and
        the turns are inserted with consecutive sequences. Either everything is written or
        nothing is.
        """
        ...

    async def get(self, thread_id: str, turn_id: str) -> Turn | None: ...

    async def list(self, thread_id: str, after_sequence: int, limit: int) -> list[Turn]:
        """Up to `limit` turns with sequence > after_sequence, in sequence order."""
        ...
