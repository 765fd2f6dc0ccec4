"""`TurnIdClient`: the blocking client, and `TurnWatch`, its follower of a thread."""

from __future__ import annotations

import functools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc

from turnid.client import _coalesce, _core, _methods
from turnid.client._core import (
    CallPlan,
    ChannelOptions,
    ConnectOptions,
    OnRetry,
    RetryLoop,
    RetryPolicy,
)
from turnid.client._turn import Turn
from turnid.client._watch import StreamGap, WatchCursor
from turnid.v1 import turnid_pb2_grpc

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: Turns a watch reads ahead of its consumer before it stops reading (gRPC flow control then
#: holds the server back).
WATCH_BUFFER = 1024


def blocking(plan: Callable[_P, CallPlan[_T]]) -> Callable[Concatenate[TurnIdClient, _P], _T]:
    """A `TurnIdClient` method that runs the plan `plan(...)` builds and returns its result."""

    @functools.wraps(plan)
    def method(self: TurnIdClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._execute(plan(*args, **kwargs))

    _methods.present_as_method(method, plan)
    return method


class TurnIdClient:
    """A blocking client for `turnid.v1.TurnIdService`. Thread-safe; close it (or use `with`).

    Every write gets a `request_id` (a UUIDv7) made once per call and sent on every attempt;
    UNAVAILABLE, RESOURCE_EXHAUSTED and a server's CANCELLED are retried with backoff within
    the call's `timeout` (default 10 s): a reconnect can never mint a second turn for one
    logical step. Every error of a write carries that `request_id`, and passing it back
    (`request_id=error.request_id`) repeats the step. Pass your own `request_id` to extend that
    across processes (e.g. one derived from your orchestrator's step id).

    A `token` is sent as `authorization: Bearer ...`; over a plaintext channel to anything but
    a loopback target that is refused here (ValueError) unless `insecure=True`.

    Coalescing (`coalesce=True`, the default): writes made from many threads at once travel
    together. A write that finds no call of this client's in flight is sent at once, as its
    own unary call; writes made while one is in flight are gathered and sent in the next call,
    one `AllocateMany` for all of them. Each keeps its own deadline, retries, request_id and
    typed error. A server without AllocateMany (UNIMPLEMENTED) turns it off for good for this
    client; `coalesce=False` sends every write as its own unary call.
    """

    def __init__(
        self,
        target: str = _core.DEFAULT_TARGET,
        *,
        timeout: float = _core.DEFAULT_TIMEOUT,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        channel_options: ChannelOptions = (),
        retry: RetryPolicy | None = None,
        on_retry: OnRetry | None = None,
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor[Any, Any]] = (),
        insecure: bool = False,
        coalesce: bool = True,
    ) -> None:
        self.options = ConnectOptions(
            target=target,
            timeout=timeout,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            channel_options=tuple(channel_options),
            retry=retry or RetryPolicy(),
            insecure=insecure,
        )
        self._on_retry = on_retry
        credentials = self.options.credentials()
        grpc_options = self.options.grpc_options()
        channel = (
            grpc.secure_channel(target, credentials, grpc_options)
            if credentials is not None
            else grpc.insecure_channel(target, grpc_options)
        )
        self._raw_channel = channel
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._stubs: dict[str, Any] = {
            "turnid": turnid_pb2_grpc.TurnIdServiceStub(channel),
            "health": health_pb2_grpc.HealthStub(channel),
        }
        self._metadata = self.options.metadata()
        self._coalescer = (
            _coalesce.SyncCoalescer(self._stubs["turnid"], self._metadata) if coalesce else None
        )
        self._closed = threading.Event()
        self._watches: weakref.WeakSet[TurnWatch] = weakref.WeakSet()

    @property
    def target(self) -> str:
        return self.options.target

    # -- the methods (one definition each, in _methods) ---------------------------------------

    allocate = blocking(_methods.allocate)
    realtime_delegation = blocking(_methods.realtime_delegation)
    auto_compaction = blocking(_methods.auto_compaction)
    user_input = blocking(_methods.user_input)
    allocate_batch = blocking(_methods.allocate_batch)
    claim = blocking(_methods.claim)
    get = blocking(_methods.get)
    get_thread = blocking(_methods.get_thread)
    check_health = blocking(_methods.check_health)

    def list_turns(
        self, thread_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[Turn]:
        """Every turn of the thread in sequence order, fetched a page at a time as you iterate.

        `page_size` 0 lets the service choose (100); `timeout` applies to each page.
        """
        for page in self.list_pages(thread_id, page_size=page_size, timeout=timeout):
            yield from page

    def list_pages(
        self, thread_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[list[Turn]]:
        """The thread's turns a page (one ListTurns call) at a time, as you iterate."""
        token = ""
        while True:
            page_plan = _methods.list_page(
                thread_id, page_size=page_size, page_token=token, timeout=timeout
            )
            turns, token = self._execute(page_plan)
            yield turns
            if not token:
                return

    def watch(
        self,
        thread_id: str,
        after_sequence: int = 0,
        *,
        on_caught_up: Callable[[], object] | None = None,
    ) -> TurnWatch:
        """Follow the thread: every turn with `sequence > after_sequence`, in order, then live.

        The watch starts at once (in a background thread) and resumes by itself, from the last
        sequence it received, when the stream breaks (a restart, a reset connection, a
        draining server): no turn is yielded twice or skipped. See `TurnWatch`.
        """
        if self._closed.is_set():
            raise RuntimeError("the TurnIdClient is closed")
        watch = TurnWatch(
            self._stubs["turnid"],
            self._metadata,
            WatchCursor(thread_id, after_sequence, self.options.retry),
            on_caught_up=on_caught_up,
            on_retry=self._on_retry,
        )
        self._watches.add(watch)
        return watch

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls in flight fail `Cancelled`, open watches end."""
        if not self._closed.is_set():
            self._closed.set()
            if self._coalescer is not None:
                self._coalescer.close()
            for watch in list(self._watches):
                watch.close()
            self._raw_channel.close()

    def __enter__(self) -> TurnIdClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the executor: one plan, its retry loop ----------------------------------------------

    def _execute(self, plan: CallPlan[_T]) -> _T:
        if self._closed.is_set():
            raise RuntimeError("the TurnIdClient is closed")
        rpc = getattr(self._stubs[plan.stub], plan.method)
        timeout = self.options.timeout if plan.timeout is None else plan.timeout
        retries = RetryLoop(plan.method, self.options.retry, timeout, plan.request_id)
        coalescer = self._coalescer if plan.item else None
        while True:
            try:
                attempt_timeout = retries.next_attempt()
                if coalescer is not None and not coalescer.unimplemented:
                    return coalescer.call(plan, attempt_timeout)
                response = rpc(plan.request, timeout=attempt_timeout, metadata=self._metadata)
            except _coalesce.Fallback:  # the server has no AllocateMany: this attempt, unary
                retries.attempt -= 1
                continue
            except grpc.RpcError as rpc_error:
                retry = retries.retry_after(rpc_error, local=self._closed.is_set())
            else:
                return plan.decode(response)
            if self._on_retry is not None:
                self._on_retry(retry)
            if self._closed.wait(retry.delay):
                raise retries.closed()


class TurnWatch:
    """A live view of one thread's turns: iterate it (`for turn in watch`) to get each turn
    once, in sequence order; it blocks until the next turn arrives.

    A background thread reads the stream from the moment the watch is made, so `caught_up`
    and `wait_caught_up()` work before you iterate: `caught_up` turns true (and
    `on_caught_up()` is called once, on that thread) when the watch holds every turn that
    existed when it started. When the stream breaks it reconnects with the client's backoff
    and resumes after `last_sequence`; an error that is not worth a reconnect (e.g.
    InvalidArgument INVALID_SEQUENCE for a negative `after_sequence`) is raised by the
    iteration. `close()` (from any thread) or leaving a `with` block ends it; the iteration
    then stops.
    """

    def __init__(
        self,
        stub: Any,
        metadata: tuple[tuple[str, str], ...],
        cursor: WatchCursor,
        *,
        on_caught_up: Callable[[], object] | None = None,
        on_retry: OnRetry | None = None,
        buffer: int = WATCH_BUFFER,
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._cursor = cursor
        self._on_caught_up = on_caught_up
        self._on_retry = on_retry
        self._buffer_size = buffer
        self._changed = threading.Condition()
        self._turns: deque[Turn] = deque()
        self._caught_up = False
        self._error: BaseException | None = None
        self._reader_done = False
        self._finished = False  # the consumer has seen the end
        self._closing = threading.Event()
        self._call: Any = None
        self._reader = threading.Thread(
            target=self._read, name=f"turnid-watch-{cursor.thread_id}", daemon=True
        )
        self._reader.start()

    @property
    def thread_id(self) -> str:
        return self._cursor.thread_id

    @property
    def caught_up(self) -> bool:
        """True once the watch has received every turn that existed when it started."""
        with self._changed:
            return self._caught_up

    @property
    def last_sequence(self) -> int:
        """The sequence of the last turn received (the resume point; yielded or buffered)."""
        with self._changed:
            return self._cursor.last_sequence

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def wait_caught_up(self, timeout: float | None = None) -> bool:
        """Block until `caught_up` (True) or `timeout` seconds pass or the watch ends (False).

        Raises the watch's error if it failed before catching up.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not self._caught_up:
                if self._error is not None:
                    raise self._error
                if self._reader_done or self._closing.is_set():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def close(self) -> None:
        """End the watch (safe from any thread, and more than once)."""
        with self._changed:
            self._closing.set()
            call = self._call
            self._changed.notify_all()
        if call is not None:
            call.cancel()
        if threading.current_thread() is not self._reader:
            self._reader.join(30)

    def __iter__(self) -> TurnWatch:
        return self

    def __next__(self) -> Turn:
        with self._changed:
            while True:
                if self._closing.is_set() or self._finished:
                    raise StopIteration
                if self._turns:
                    turn = self._turns.popleft()
                    self._changed.notify_all()  # room in the buffer
                    return turn
                if self._reader_done:
                    self._finished = True
                    if self._error is not None:
                        raise self._error
                    raise StopIteration
                self._changed.wait()

    def __enter__(self) -> TurnWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TurnWatch(thread_id={self.thread_id!r}, last_sequence={self.last_sequence}, "
            f"caught_up={self.caught_up}, closed={self.closed})"
        )

    # -- the reader thread -------------------------------------------------------------------

    def _deliver(self, turns: list[Turn]) -> bool:
        """Buffer the turns (waiting for room); False when the watch was closed meanwhile."""
        with self._changed:
            for turn in turns:
                while len(self._turns) >= self._buffer_size and not self._closing.is_set():
                    self._changed.wait()
                if self._closing.is_set():
                    return False
                self._turns.append(turn)
                self._changed.notify_all()
            return not self._closing.is_set()

    def _mark_caught_up(self) -> None:
        with self._changed:
            self._caught_up = True
            self._changed.notify_all()
        if self._on_caught_up is not None:
            self._on_caught_up()

    def _read(self) -> None:
        try:
            while not self._closing.is_set():
                with self._changed:
                    if self._closing.is_set():
                        return
                    call = self._call = self._stub.WatchTurns(
                        self._cursor.request(), metadata=self._metadata
                    )
                try:
                    for response in call:
                        with self._changed:
                            turns, newly_caught_up = self._cursor.accept(response)
                        # Caught up once the message is in hand, before its turns wait for
                        # room in the read-ahead buffer (see the async client).
                        if newly_caught_up:
                            self._mark_caught_up()
                        if not self._deliver(turns):
                            return
                    retry = self._cursor.retry_after_end()
                except StreamGap as gap:
                    call.cancel()
                    if not self._deliver(gap.delivered):
                        return
                    retry = self._cursor.retry_after_gap()
                except grpc.RpcError as rpc_error:
                    if self._closing.is_set():
                        return
                    retry = self._cursor.retry_after(rpc_error)
                if self._on_retry is not None:
                    self._on_retry(retry)
                self._closing.wait(retry.delay)
        except BaseException as error:  # a final status, or a callback that raised
            with self._changed:
                self._error = error
        finally:
            with self._changed:
                self._reader_done = True
                self._call = None
                self._changed.notify_all()
