"""Change notification for WatchTurns: the store says "this thread may have new turns", the
watchers of that thread wake and re-read it from the store.

A notification carries no turns: the durable read `sequence > last seen` is the truth, so a
lost or spurious wake-up costs at most one read or one fallback interval, never a gap or a
repeat. Everything here runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

ThreadKey = tuple[str, str]  # (namespace, thread_id)


class Subscription:
    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def clear(self) -> None:
        """Call before each read: a change after this point wakes the next `wait`."""
        self._event.clear()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, timeout: float | None) -> None:  # noqa: ASYNC109 (a bound)
        """Until notified, or `timeout` seconds (None: no limit)."""
        if timeout is None:
            await self._event.wait()
            return
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            pass


class ChangeFeed:
    """Per-thread wake-ups for watchers, fed by a store at commit (and by its cross-process
    change detector). `fallback_interval` is how often a watcher re-reads anyway (None:
    never), covering notifications that can be lost (PostgreSQL NOTIFY across a reconnect)."""

    def __init__(self, fallback_interval: float | None = None) -> None:
        self.fallback_interval = fallback_interval
        self._subscriptions: dict[ThreadKey, set[Subscription]] = {}
        #: Set while anyone watches: a store's cross-process change detector (PostgreSQL's
        #: LISTEN) runs only then, so that a process nobody watches is not woken by others.
        self.watched = asyncio.Event()
        #: time.monotonic() when the last watcher left (or the feed was made).
        self.idle_since = time.monotonic()

    @property
    def watchers(self) -> int:
        return sum(len(subs) for subs in self._subscriptions.values())

    @contextmanager
    def subscribe(self, key: ThreadKey) -> Iterator[Subscription]:
        subscription = Subscription()
        self._subscriptions.setdefault(key, set()).add(subscription)
        self.watched.set()
        try:
            yield subscription
        finally:
            subs = self._subscriptions.get(key)
            if subs is not None:
                subs.discard(subscription)
                if not subs:
                    del self._subscriptions[key]
                    if not self._subscriptions:
                        self.watched.clear()
                        self.idle_since = time.monotonic()

    def wants(self, key: ThreadKey) -> bool:
        return key in self._subscriptions

    def publish(self, key: ThreadKey) -> None:
        """The thread may have new turns."""
        for subscription in self._subscriptions.get(key, ()):
            subscription.notify()

    def publish_all(self) -> None:
        """Some thread may have new turns (e.g. another process committed)."""
        for subs in self._subscriptions.values():
            for subscription in subs:
                subscription.notify()

    def close(self) -> None:
        """Wake every watcher (the store is closing; they will find it closed)."""
        self.publish_all()
