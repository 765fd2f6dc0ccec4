"""Coalescing: concurrent allocations of one client travel together in one AllocateMany call.

Every unary gRPC call costs the server a few hundred microseconds of CPU for ~100 bytes of
work, which caps a client process far below what the store can do. So each client keeps one
coalescer per channel: a write (`allocate`, the shortcuts, `allocate_batch`, `claim`) that
finds nothing in flight is sent at once, as its own unary call (a lone caller never waits and
never changes its RPC); writes that arrive while a call is in flight queue, and the next call
takes everything queued (within `AllocateMany`'s limits) in one AllocateMany, whose results
come back in item order, each its turns or its own `google.rpc.Status`. The next call leaves
when a call ends, or at once when FOLLOW_MIN writes have queued and fewer than MAX_IN_FLIGHT
calls are in flight (so that, under load, the client decodes one answer while the server
works on the next call), or when the oldest queued write has waited MAX_HOLD (so one slow call
never holds up the others). A call of one write is that write's unary call.

Each item keeps the semantics of its own unary call: the plan's request (its `request_id`, its
`expected_last_sequence`), its own deadline (the AllocateMany deadline is the latest of its
items', capped; an item whose deadline passes while its batch is in flight fails
DEADLINE_EXCEEDED at once and its late answer is dropped), and its own error, shaped like a
failed unary call (`ItemError`), so the client's retry loop and error decoding are the ones a
unary call goes through. A server that answers AllocateMany UNIMPLEMENTED (older than the RPC)
turns coalescing off for the channel for good: the items of that call are re-sent unary.

`SyncCoalescer` serves `TurnIdClient` (any number of OS threads: a lock, a waiter lock per
item, and the channel's future callbacks that send the next call); `AsyncCoalescer` serves
`AsyncTurnIdClient` on its event loop (futures, a task per call in flight).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc

from turnid.client._core import CallPlan
from turnid.v1 import turnid_pb2

#: AllocateMany's limits (the proto documents them; the server refuses more TOO_MANY_ITEMS).
MAX_ITEMS = 1000
MAX_TURNS = 10_000
#: A call's request stays below this (the server accepts 64 KiB by default).
MAX_REQUEST_BYTES = 32 * 1024
#: ... and its estimated response below this (gRPC clients accept 4 MiB by default).
MAX_RESPONSE_BYTES = 2 * 1024 * 1024
#: The longest deadline an AllocateMany call gets, whatever its items' deadlines.
MAX_CALL_TIMEOUT = 60.0
#: Calls (unary or AllocateMany) a coalescer keeps in flight at once; more writes queue.
MAX_IN_FLIGHT = 2
#: A write that finds a call in flight starts a second one only once this many writes queue
#: (else they wait for the call in flight to end, and go then): a second call that carries a
#: few writes costs the server nearly what a full one does. Under sustained load from many
#: callers the two calls overlap (the client decodes one answer while the server works on the
#: other). Measured on 2 cores with 32 callers: 1 in flight, ~3.1x the unary ceiling; 2 with
#: 16 here, ~4.4x; fewer (4, 8) split the callers into small calls, more (20, 24) leave one
#: group waiting behind the other.
FOLLOW_MIN = 16
#: The longest a queued write waits for a call in flight to end before it goes anyway, in a
#: call of its own (with whatever queued beside it), whatever MAX_IN_FLIGHT and FOLLOW_MIN say:
#: a slow call (a thread's lock held, a store outage) must not hold up writes queued behind it.
#: Under load a call ends well within this, so it rarely fires.
MAX_HOLD = 0.010

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
_DETAILS_KEY = "grpc-status-details-bin"
_T = TypeVar("_T")


class ItemError(grpc.RpcError):
    """An AllocateMany item's status, or a failure of the call that carried it, shaped like a
    failed unary call (`code()`, `details()`, the rich status in `trailing_metadata()`), so
    `error_from_rpc` and the retry loop treat it as that item's unary call's error."""

    def __init__(self, code: grpc.StatusCode, details: str, status: bytes = b"") -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return ((_DETAILS_KEY, self._status),) if self._status else ()

    def initial_metadata(self) -> Any:
        return ()

    def debug_error_string(self) -> str:
        return f"{self._code.name}: {self._details}"

    @classmethod
    def from_status(cls, status: Any) -> ItemError:
        code = _STATUS_CODES.get(status.code, grpc.StatusCode.UNKNOWN)
        return cls(code, status.message, status.SerializeToString())


class Fallback(Exception):
    """The server has no AllocateMany: send this attempt (and all later ones) unary."""


def _closed_error() -> ItemError:
    # The details gRPC itself gives a call cut by Channel.close(): `cancelled_locally` knows it.
    return ItemError(grpc.StatusCode.CANCELLED, "Channel closed!")


def _deadline_error(plan: CallPlan[Any]) -> ItemError:
    return ItemError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{plan.method}: deadline exceeded")


class Item:
    """One queued write: its plan, its deadline (time.monotonic()) and its share of a call."""

    __slots__ = ("deadline", "plan", "response_bytes", "since", "size", "turns")

    def __init__(self, plan: CallPlan[Any], timeout: float) -> None:
        self.plan = plan
        self.since = time.monotonic()  # when it queued
        self.deadline = self.since + timeout
        request = plan.request
        if plan.item == "batch_allocate":
            count = request.count
            self.turns = count if 0 < count <= 1000 else 0
        else:
            self.turns = 1
        self.size = request.ByteSize() + 8  # the item's tags and lengths
        turn_id = len(request.turn_id) if plan.item == "claim" else 36
        self.response_bytes = max(self.turns, 1) * (
            len(request.thread_id) + len(request.request_id) + turn_id + 48
        )


_I = TypeVar("_I", bound=Item)


def take(queue: deque[_I], live: Callable[[_I], bool]) -> list[_I]:
    """The next call's items: queued live ones, oldest first, within AllocateMany's limits."""
    batch: list[_I] = []
    turns = size = response_bytes = 0
    while queue:
        item = queue[0]
        if not live(item):
            queue.popleft()
            continue
        if batch and (
            len(batch) >= MAX_ITEMS
            or turns + item.turns > MAX_TURNS
            or size + item.size > MAX_REQUEST_BYTES
            or response_bytes + item.response_bytes > MAX_RESPONSE_BYTES
        ):
            break
        queue.popleft()
        batch.append(item)
        turns += item.turns
        size += item.size
        response_bytes += item.response_bytes
    return batch


def many_request(batch: Sequence[Item]) -> Any:
    request = turnid_pb2.AllocateManyRequest()
    add = request.items.add
    for item in batch:
        getattr(add(), item.plan.item).CopyFrom(item.plan.request)
    return request


def call_timeout(batch: Sequence[Item]) -> float:
    """The latest of the items' remaining deadlines, capped (and never 0: gRPC's 'no time')."""
    latest = max(item.deadline for item in batch) - time.monotonic()
    return min(max(latest, 0.001), MAX_CALL_TIMEOUT)


def item_value(plan: CallPlan[_T], result: Any) -> _T:
    """The decoded value of an AllocateMany result, or its error raised as an `ItemError`."""
    if result.HasField("status") and result.status.code != 0:
        raise ItemError.from_status(result.status)
    turns = result.turns
    if not turns or plan.decode_turns is None:
        raise ItemError(grpc.StatusCode.INTERNAL, f"{plan.method}: the server answered no turn")
    return plan.decode_turns(turns)


def call_failure(rpc_error: grpc.RpcError, item: Item) -> grpc.RpcError:
    """What a failed AllocateMany call means for one of its items.

    The call's deadline is the latest of its items' (capped), so its DEADLINE_EXCEEDED is an
    item's own only when the item's deadline has passed too; for an item with time left (the
    cap) it is a transient failure, retried like UNAVAILABLE within the item's deadline.
    """
    code = getattr(rpc_error, "code", None)
    if (
        callable(code)
        and code() is grpc.StatusCode.DEADLINE_EXCEEDED
        and item.deadline > time.monotonic()
    ):
        return ItemError(grpc.StatusCode.UNAVAILABLE, "AllocateMany: the call's deadline passed")
    return rpc_error


def _unimplemented(rpc_error: BaseException) -> bool:
    code = getattr(rpc_error, "code", None)
    return callable(code) and code() is grpc.StatusCode.UNIMPLEMENTED


# --- the blocking client's coalescer -----------------------------------------------------------

_QUEUED, _SENT, _DONE, _ABANDONED = range(4)


class _SyncItem(Item):
    __slots__ = ("error", "state", "value", "waiter")

    def __init__(self, plan: CallPlan[Any], timeout: float) -> None:
        super().__init__(plan, timeout)
        self.state = _QUEUED
        self.value: Any = None
        self.error: BaseException | None = None
        self.waiter = threading.Lock()
        self.waiter.acquire()  # released when the item is resolved


class SyncCoalescer:
    """Gathers `TurnIdClient` writes from any number of OS threads (see the module doc).

    A write with nothing in flight is sent unary from its own thread, blocking, with its own
    deadline. Otherwise it queues and its thread waits on its waiter lock until it is resolved
    or its deadline passes. Whoever ends a call (a caller's thread, or the channel's thread that
    runs future callbacks) starts the next one, non-blocking (`.future()`), with what queued.
    """

    def __init__(self, stub: Any, metadata: Sequence[tuple[str, str]]) -> None:
        self._stub = stub
        self._metadata = tuple(metadata)
        self._lock = threading.Lock()
        self._queue: deque[_SyncItem] = deque()
        self._in_flight = 0
        self._closed = False
        #: True once the server answered AllocateMany UNIMPLEMENTED: the client goes unary.
        self.unimplemented = False
        #: Calls sent: (unary, AllocateMany); for tests and curious operators.
        self.calls = [0, 0]

    def call(self, plan: CallPlan[_T], timeout: float) -> _T:
        """Run one attempt of a coalescible write: its decoded value, or an RpcError raised."""
        with self._lock:
            if self._closed:
                raise _closed_error()
            if self.unimplemented:
                raise Fallback
            if not self._in_flight and not self._queue:
                self._in_flight += 1
                self.calls[0] += 1
                alone = True
            else:
                alone = False
                item = _SyncItem(plan, timeout)
                self._queue.append(item)
                batch = self._take_locked() if self._may_follow_locked() else None
        if alone:
            try:
                response = getattr(self._stub, plan.method)(
                    plan.request, timeout=timeout, metadata=self._metadata
                )
            finally:
                self._call_ended()
            return plan.decode(response)
        if batch:
            self._send(batch)
        return self._wait(item)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Fail the queued writes (the channel's close cancels the calls in flight)."""
        with self._lock:
            self._closed = True
            while self._queue:
                self._resolve_locked(self._queue.popleft(), None, _closed_error())

    # -- internals ---------------------------------------------------------------------------

    def _may_follow_locked(self) -> bool:
        """May a write that just queued start a call now (rather than wait for one to end)?"""
        if self._in_flight >= MAX_IN_FLIGHT:
            return False
        return not self._in_flight or len(self._queue) >= FOLLOW_MIN

    def _take_locked(self) -> list[_SyncItem]:
        batch = take(self._queue, lambda item: item.state == _QUEUED)
        if batch:
            self._in_flight += 1
            for item in batch:
                item.state = _SENT
        return batch

    def _wait(self, item: _SyncItem) -> Any:
        hold = min(MAX_HOLD, item.deadline - time.monotonic())
        if not (hold > 0 and item.waiter.acquire(timeout=hold)):
            # Held MAX_HOLD behind calls that have not ended: go now, with what queued.
            with self._lock:
                held = item.state == _QUEUED and not self._closed and not self.unimplemented
                batch = self._take_locked() if held else None
            if batch:
                self._send(batch)
            remaining = item.deadline - time.monotonic()
            resolved = remaining > 0 and item.waiter.acquire(timeout=remaining)
        else:
            resolved = True
        if not resolved:
            with self._lock:
                if not item.waiter.acquire(blocking=False):  # not resolved meanwhile
                    item.state = _ABANDONED
                    raise _deadline_error(item.plan)
        if item.error is not None:
            raise item.error
        return item.value

    def _resolve_locked(self, item: _SyncItem, value: Any, error: BaseException | None) -> None:
        if item.state == _ABANDONED or item.state == _DONE:
            return
        item.value, item.error, item.state = value, error, _DONE
        item.waiter.release()

    def _send(self, batch: list[_SyncItem]) -> None:
        """Start the call for `batch`, not waiting for it (it resolves in a callback)."""
        try:
            if len(batch) == 1:
                plan = batch[0].plan
                self.calls[0] += 1
                future = getattr(self._stub, plan.method).future(
                    plan.request, timeout=call_timeout(batch), metadata=self._metadata
                )
            else:
                self.calls[1] += 1
                future = self._stub.AllocateMany.future(
                    many_request(batch), timeout=call_timeout(batch), metadata=self._metadata
                )
        except Exception as error:  # e.g. the channel was closed under us
            self._sent(batch, None, _closed_error() if self._closed else error)
            return
        future.add_done_callback(lambda done: self._sent(batch, done))

    def _sent(
        self, batch: list[_SyncItem], future: Any, failure: BaseException | None = None
    ) -> None:
        """A call ended (on the channel's callback thread, or at once): resolve its items."""
        response: Any = None
        if failure is None:
            try:
                response = future.result()
            except grpc.RpcError as rpc_error:
                failure = rpc_error
            except grpc.FutureCancelledError:
                failure = _closed_error()
            except Exception as error:  # a bug must fail the items, not hang them
                failure = error
        outcomes: list[tuple[Any, BaseException | None]] = []
        fallback = False
        if failure is not None:
            fallback = len(batch) > 1 and _unimplemented(failure)
            for item in batch:
                if fallback:
                    outcomes.append((None, Fallback()))
                elif isinstance(failure, grpc.RpcError):
                    outcomes.append((None, call_failure(failure, item)))
                else:
                    outcomes.append((None, failure))
        elif len(batch) == 1:
            outcomes.append(_decoded(batch[0].plan, response, many=False))
        else:
            results = response.results
            for index, item in enumerate(batch):
                if index < len(results):
                    outcomes.append(_decoded(item.plan, results[index], many=True))
                else:
                    missing = ItemError(
                        grpc.StatusCode.INTERNAL, "AllocateMany: a result is missing"
                    )
                    outcomes.append((None, missing))
        with self._lock:
            if fallback:
                self.unimplemented = True
            for item, (value, problem) in zip(batch, outcomes, strict=True):
                self._resolve_locked(item, value, problem)
        self._call_ended()

    def _call_ended(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self.unimplemented:
                while self._queue:
                    self._resolve_locked(self._queue.popleft(), None, Fallback())
                return
            # A call ended: what queued meanwhile goes now, however little.
            batch = self._take_locked() if self._queue and not self._closed else None
        if batch:
            self._send(batch)


def _decoded(plan: CallPlan[Any], answer: Any, *, many: bool) -> tuple[Any, BaseException | None]:
    """(value, None) or (None, error) for one item's answer (a unary response, or a result)."""
    try:
        return (item_value(plan, answer) if many else plan.decode(answer)), None
    except Exception as error:  # an item's status (ItemError) or a bad answer
        return None, error


# --- the asyncio client's coalescer ------------------------------------------------------------


class _AsyncItem(Item, Generic[_T]):
    __slots__ = ("future", "queued")

    def __init__(self, plan: CallPlan[_T], timeout: float, future: asyncio.Future[_T]) -> None:
        super().__init__(plan, timeout)
        self.future = future
        self.queued = True  # not yet taken into a call


def _live(item: _AsyncItem[Any]) -> bool:
    return not item.future.done()


class AsyncCoalescer:
    """Gathers `AsyncTurnIdClient` writes from the tasks of its event loop (see the module doc).

    A write with nothing in flight awaits its own unary call in its own task (cancelling the
    task cancels it). Otherwise it queues on a future that a sending task resolves (or the
    deadline timer fails at its deadline); cancelling the waiting task drops the item (not yet
    sent: it never is; sent: its answer is dropped).

    Two loop timers serve all the items, not two per item (each TimerHandle, its heap entry
    and its cancel cost the loop more than the rest of a queued write): the hold timer is due
    when the oldest queued item has waited MAX_HOLD, the deadline timer at the earliest
    deadline of the items not yet resolved (kept in a heap of their own, from which resolved
    items are dropped lazily).
    """

    def __init__(
        self, stub: Any, metadata: Sequence[tuple[str, str]], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._stub = stub
        self._metadata = tuple(metadata)
        self._loop = loop
        self._queue: deque[_AsyncItem[Any]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.unimplemented = False
        self.calls = [0, 0]  # (unary, AllocateMany) calls sent
        #: Items waiting for their answer (queued or in a call), and their deadlines: a heap of
        #: (deadline, order, item), resolved items left in it until popped or pruned.
        self._waiting = 0
        self._deadlines: list[tuple[float, int, _AsyncItem[Any]]] = []
        self._order = itertools.count()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_due = 0.0  # when the deadline timer fires (time.monotonic())
        self._hold_timer: asyncio.TimerHandle | None = None

    async def call(self, plan: CallPlan[_T], timeout: float) -> _T:  # noqa: ASYNC109
        if self._closed:
            raise _closed_error()
        if self.unimplemented:
            raise Fallback
        if not self._in_flight and not self._queue:
            self._in_flight += 1
            self.calls[0] += 1
            try:
                response = await getattr(self._stub, plan.method)(
                    plan.request, timeout=timeout, metadata=self._metadata
                )
            finally:
                self._call_ended()
            return plan.decode(response)
        future: asyncio.Future[_T] = self._loop.create_future()
        item = _AsyncItem(plan, timeout, future)
        self._queue.append(item)
        self._watch_deadline(item)
        self._pump(ended=False)
        if item.queued and self._hold_timer is None:
            self._arm_hold()
        self._waiting += 1
        try:
            return await future
        finally:
            self._waiting -= 1

    def _watch_deadline(self, item: _AsyncItem[Any]) -> None:
        deadlines = self._deadlines
        if len(deadlines) > 2 * self._waiting + 64:  # mostly resolved items: prune
            deadlines[:] = [entry for entry in deadlines if not entry[2].future.done()]
            heapq.heapify(deadlines)
        heapq.heappush(deadlines, (item.deadline, next(self._order), item))
        timer = self._deadline_timer
        if timer is None or item.deadline < self._deadline_due:
            if timer is not None:
                timer.cancel()
            self._arm_deadline(item.deadline)

    def _arm_deadline(self, due: float) -> None:
        self._deadline_due = due
        self._deadline_timer = self._loop.call_later(due - time.monotonic(), self._deadlines_passed)

    def _deadlines_passed(self) -> None:
        """The deadline timer: fail the items whose deadline has passed, wait for the next."""
        self._deadline_timer = None
        deadlines = self._deadlines
        now = time.monotonic()
        while deadlines and (deadlines[0][0] <= now or deadlines[0][2].future.done()):
            _expire(heapq.heappop(deadlines)[2])
        if deadlines:
            self._arm_deadline(deadlines[0][0])

    def _arm_hold(self) -> None:
        """Wake when the oldest queued item will have waited MAX_HOLD."""
        delay = self._queue[0].since + MAX_HOLD - time.monotonic()
        self._hold_timer = self._loop.call_later(delay, self._held)

    def _held(self) -> None:
        """The hold timer: if the oldest queued item has waited MAX_HOLD behind calls that have
        not ended, send what queued (whatever is in flight); then wait for the next oldest."""
        self._hold_timer = None
        queue = self._queue
        while queue and queue[0].future.done():
            queue.popleft()
        if not queue or self._closed:
            return
        if queue[0].since + MAX_HOLD <= time.monotonic():
            self._start(take(queue, _live))
        if queue:
            self._arm_hold()

    def close(self) -> None:
        """Fail the queued writes (closing the channel ends the calls in flight)."""
        self._closed = True
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(_closed_error())
        for timer in (self._hold_timer, self._deadline_timer):
            if timer is not None:
                timer.cancel()
        self._hold_timer = self._deadline_timer = None

    def _start(self, batch: list[_AsyncItem[Any]]) -> None:
        if not batch:
            return
        for queued in batch:
            queued.queued = False
        self._in_flight += 1
        task = self._loop.create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pump(self, *, ended: bool = True) -> None:
        """Start calls for what queued: after a call `ended`, whatever queued; after a write
        queued, a second call only once FOLLOW_MIN writes wait."""
        while self._queue and self._in_flight < MAX_IN_FLIGHT and not self._closed:
            if self._in_flight and not ended and len(self._queue) < FOLLOW_MIN:
                return
            ended = False
            if self.unimplemented:
                while self._queue:
                    item = self._queue.popleft()
                    if not item.future.done():
                        item.future.set_exception(Fallback())
                return
            batch = take(self._queue, _live)
            if not batch:
                return
            self._start(batch)

    async def _send(self, batch: list[_AsyncItem[Any]]) -> None:
        try:
            if len(batch) == 1:
                await self._send_one(batch[0])
            else:
                await self._send_many(batch)
        finally:
            # The call counts as in flight until the tasks its answers woke have run: those
            # that write again meanwhile queue, and go together in the next call (rather than
            # the first of them alone, the rest behind it).
            self._loop.call_soon(self._call_ended)

    def _call_ended(self) -> None:
        self._in_flight -= 1
        self._pump()

    async def _send_one(self, item: _AsyncItem[Any]) -> None:
        plan = item.plan
        self.calls[0] += 1
        try:
            response = await getattr(self._stub, plan.method)(
                plan.request, timeout=call_timeout((item,)), metadata=self._metadata
            )
            value = plan.decode(response)
        except asyncio.CancelledError:
            _fail(item, _closed_error())
            raise
        except grpc.RpcError as rpc_error:
            _fail(item, call_failure(rpc_error, item))
        except Exception as error:
            _fail(item, error)
        else:
            if not item.future.done():
                item.future.set_result(value)

    async def _send_many(self, batch: list[_AsyncItem[Any]]) -> None:
        self.calls[1] += 1
        try:
            response = await self._stub.AllocateMany(
                many_request(batch), timeout=call_timeout(batch), metadata=self._metadata
            )
        except asyncio.CancelledError:
            for item in batch:
                _fail(item, _closed_error())
            raise
        except grpc.RpcError as rpc_error:
            if _unimplemented(rpc_error):
                self.unimplemented = True
                for item in batch:
                    _fail(item, Fallback())
            else:
                for item in batch:
                    _fail(item, call_failure(rpc_error, item))
            return
        except Exception as error:
            for item in batch:
                _fail(item, error)
            return
        results = response.results
        for index, item in enumerate(batch):
            if item.future.done():
                continue
            try:
                if index >= len(results):
                    raise ItemError(grpc.StatusCode.INTERNAL, "AllocateMany: a result is missing")
                item.future.set_result(item_value(item.plan, results[index]))
            except Exception as error:
                item.future.set_exception(error)


def _fail(item: _AsyncItem[Any], error: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(error)


def _expire(item: _AsyncItem[Any]) -> None:
    if not item.future.done():
        item.future.set_exception(_deadline_error(item.plan))
