"""`AsyncTurnIdClient`: the asyncio client, the same surface as `TurnIdClient`."""

# `timeout=` is the gRPC deadline of a logical call (retries included), as in the sync client;
# asyncio.timeout() around a call would cancel it instead of bounding its retries.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc
import grpc.aio
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

#: Turns a watch reads ahead of its consumer before it stops reading.
WATCH_BUFFER = 1024


def awaitable(
    plan: Callable[_P, CallPlan[_T]],
) -> Callable[Concatenate[AsyncTurnIdClient, _P], Coroutine[Any, Any, _T]]:
    """An `AsyncTurnIdClient` method that runs the plan `plan(...)` builds: await its result."""

    @functools.wraps(plan)
    async def method(self: AsyncTurnIdClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await self._execute(plan(*args, **kwargs))

    _methods.present_as_method(method, plan)
    return method


async def _maybe_await(outcome: object) -> None:
    if inspect.isawaitable(outcome):
        await outcome


class AsyncTurnIdClient:
    """An asyncio client for `turnid.v1.TurnIdService`; `await client.close()` or `async with`.

    It may be built outside a running loop: the channel opens on the first call, on that call's
    loop, and the client then belongs to that loop. Retries, request_ids, errors and the
    token rule work as in `TurnIdClient`. `on_retry` may be a plain function or a coroutine
    function. Cancelling the task that awaits a call cancels the call; it is not retried.

    Coalescing (`coalesce=True`, the default) works as in `TurnIdClient`, for the tasks of the
    client's loop: a write with nothing in flight goes at once, unary; writes made while a call
    is in flight go together in the next one (one `AllocateMany`). `coalesce=False` sends every
    write as its own unary call.
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
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
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
        self._interceptors = list(interceptors)
        self._metadata = self.options.metadata()
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._coalesce = coalesce
        self._coalescer: _coalesce.AsyncCoalescer | None = None
        self._closed = False
        self._watches: weakref.WeakSet[AsyncTurnWatch] = weakref.WeakSet()

    @property
    def target(self) -> str:
        return self.options.target

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the client belongs to: None until its first call."""
        return self._loop

    # -- the methods (one definition each, in _methods) ---------------------------------------

    allocate = awaitable(_methods.allocate)
    realtime_delegation = awaitable(_methods.realtime_delegation)
    auto_compaction = awaitable(_methods.auto_compaction)
    user_input = awaitable(_methods.user_input)
    allocate_batch = awaitable(_methods.allocate_batch)
    claim = awaitable(_methods.claim)
    get = awaitable(_methods.get)
    get_thread = awaitable(_methods.get_thread)
    check_health = awaitable(_methods.check_health)

    async def list_turns(
        self, thread_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[Turn]:
        """Every turn of the thread in sequence order, a page at a time: `async for`.

        `page_size` 0 lets the service choose (100); `timeout` applies to each page.
        """
        async for page in self.list_pages(thread_id, page_size=page_size, timeout=timeout):
            for turn in page:
                yield turn

    async def list_pages(
        self, thread_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[list[Turn]]:
        """The thread's turns a page (one ListTurns call) at a time: `async for`."""
        token = ""
        while True:
            page_plan = _methods.list_page(
                thread_id, page_size=page_size, page_token=token, timeout=timeout
            )
            turns, token = await self._execute(page_plan)
            yield turns
            if not token:
                return

    def watch(
        self,
        thread_id: str,
        after_sequence: int = 0,
        *,
        on_caught_up: Callable[[], object] | None = None,
    ) -> AsyncTurnWatch:
        """Follow the thread: every turn with `sequence > after_sequence`, in order, then live.

        `async with client.watch(t) as watch: async for turn in watch: ...`. The stream opens
        when the watch is entered, first iterated or waited on, and resumes by itself from the
        last sequence it received when it breaks: no turn twice, none skipped. See
        `AsyncTurnWatch`.
        """
        if self._closed:
            raise RuntimeError("the AsyncTurnIdClient is closed")
        watch = AsyncTurnWatch(self, WatchCursor(thread_id, after_sequence, self.options.retry))
        watch._on_caught_up = on_caught_up
        self._watches.add(watch)
        return watch

    # -- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the channel; calls in flight fail `Cancelled`, open watches end."""
        self._closed = True
        if self._coalescer is not None:
            self._coalescer.close()
        for watch in list(self._watches):
            await watch.aclose()
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(None)

    async def __aenter__(self) -> AsyncTurnIdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- the channel and the executor --------------------------------------------------------

    def _stub(self, name: str) -> Any:
        if self._closed:
            raise RuntimeError("the AsyncTurnIdClient is closed")
        loop = asyncio.get_running_loop()
        if self._channel is None:
            credentials = self.options.credentials()
            grpc_options = self.options.grpc_options()
            interceptors = self._interceptors or None
            self._channel = (
                grpc.aio.secure_channel(
                    self.target, credentials, grpc_options, interceptors=interceptors
                )
                if credentials is not None
                else grpc.aio.insecure_channel(self.target, grpc_options, interceptors=interceptors)
            )
            self._stubs = {
                "turnid": turnid_pb2_grpc.TurnIdServiceStub(self._channel),
                "health": health_pb2_grpc.HealthStub(self._channel),
            }
            if self._coalesce:
                self._coalescer = _coalesce.AsyncCoalescer(
                    self._stubs["turnid"], self._metadata, loop
                )
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("an AsyncTurnIdClient belongs to the event loop it first ran on")
        return self._stubs[name]

    async def _execute(self, plan: CallPlan[_T]) -> _T:
        rpc = getattr(self._stub(plan.stub), plan.method)
        timeout = self.options.timeout if plan.timeout is None else plan.timeout
        retries = RetryLoop(plan.method, self.options.retry, timeout, plan.request_id)
        coalescer = self._coalescer if plan.item else None
        while True:
            # A cancelled task gets CancelledError here: not an RpcError, so never retried.
            try:
                attempt_timeout = retries.next_attempt()
                if coalescer is not None and not coalescer.unimplemented:
                    return await coalescer.call(plan, attempt_timeout)
                response = await rpc(plan.request, timeout=attempt_timeout, metadata=self._metadata)
            except _coalesce.Fallback:  # the server has no AllocateMany: this attempt, unary
                retries.attempt -= 1
                continue
            except grpc.RpcError as rpc_error:
                retry = retries.retry_after(rpc_error, local=self._closed)
            else:
                return plan.decode(response)
            if self._on_retry is not None:
                await _maybe_await(self._on_retry(retry))
            await asyncio.sleep(retry.delay)
            if self._closed:
                raise retries.closed()


_END = object()


class AsyncTurnWatch:
    """A live view of one thread's turns: `async for turn in watch` gets each turn once, in
    sequence order, waiting for the next one.

    A task reads the stream (from `__aenter__`, the first `__anext__` or `wait_caught_up()`),
    so `caught_up` turns true (and `on_caught_up()` is called once; it may be a coroutine
    function) when the watch holds every turn that existed when it started. When the stream
    breaks it reconnects with the client's backoff and resumes after `last_sequence`; an error
    not worth a reconnect (e.g. InvalidArgument INVALID_SEQUENCE) is raised by the iteration.
    `close()` (or `await aclose()`, or leaving `async with`) ends it and the iteration stops.
    """

    def __init__(
        self, client: AsyncTurnIdClient, cursor: WatchCursor, *, buffer: int = WATCH_BUFFER
    ) -> None:
        self._client = client
        self._cursor = cursor
        self._on_caught_up: Callable[[], object] | None = None
        self._queue: asyncio.Queue[object] = asyncio.Queue(buffer)
        self._caught_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._call: Any = None
        self._error: BaseException | None = None
        self._closed = False
        self._finished = False

    @property
    def thread_id(self) -> str:
        return self._cursor.thread_id

    @property
    def caught_up(self) -> bool:
        """True once the watch has received every turn that existed when it started."""
        return self._caught_up.is_set()

    @property
    def last_sequence(self) -> int:
        """The sequence of the last turn received (the resume point; yielded or buffered)."""
        return self._cursor.last_sequence

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        """Open the stream now (on the running loop); entering or iterating does it too."""
        if self._task is None and not self._closed:
            self._client._stub("turnid")  # binds the client to this loop, or refuses
            self._task = asyncio.get_running_loop().create_task(
                self._read(), name=f"turnid-watch-{self.thread_id}"
            )

    async def wait_caught_up(self, timeout: float | None = None) -> bool:
        """Wait until `caught_up` (True) or `timeout` seconds pass or the watch ends (False).

        Raises the watch's error if it failed before catching up.
        """
        self.start()
        if self._caught_up.is_set():
            return True
        if self._task is None:
            return False
        waiter = asyncio.ensure_future(self._caught_up.wait())
        try:
            await asyncio.wait(
                {waiter, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        if self._caught_up.is_set():
            return True
        if self._error is not None:
            raise self._error
        return False

    def close(self) -> None:
        """End the watch: the stream is cancelled and the iteration stops."""
        if self._closed:
            return
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_END)  # wakes a waiting consumer

    async def aclose(self) -> None:
        """`close()`, then wait until the reading task has ended."""
        self.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def __aiter__(self) -> AsyncTurnWatch:
        return self

    async def __anext__(self) -> Turn:
        self.start()
        if self._closed or self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if self._closed or item is _END:
            self._finished = True
            if self._error is not None and not self._closed:
                raise self._error
            raise StopAsyncIteration
        assert isinstance(item, Turn)
        return item

    async def __aenter__(self) -> AsyncTurnWatch:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"AsyncTurnWatch(thread_id={self.thread_id!r}, last_sequence={self.last_sequence}, "
            f"caught_up={self.caught_up}, closed={self.closed})"
        )

    # -- the reading task --------------------------------------------------------------------

    async def _deliver(self, turns: list[Turn]) -> None:
        for turn in turns:
            await self._queue.put(turn)

    async def _read(self) -> None:
        client = self._client
        try:
            while not self._closed:
                stub = client._stub("turnid")
                call = self._call = stub.WatchTurns(
                    self._cursor.request(), metadata=client._metadata
                )
                try:
                    async for response in call:
                        turns, newly_caught_up = self._cursor.accept(response)
                        # Caught up once the message is in hand, before its turns wait for
                        # room in the read-ahead buffer: a replay longer than the buffer must
                        # not keep `wait_caught_up()` from returning.
                        if newly_caught_up:
                            self._caught_up.set()
                            if self._on_caught_up is not None:
                                await _maybe_await(self._on_caught_up())
                        await self._deliver(turns)
                    retry = self._cursor.retry_after_end()
                except StreamGap as gap:
                    call.cancel()
                    await self._deliver(gap.delivered)
                    retry = self._cursor.retry_after_gap()
                except grpc.RpcError as rpc_error:
                    if self._closed or client._closed:
                        return
                    retry = self._cursor.retry_after(rpc_error)
                finally:
                    self._call = None
                if client._on_retry is not None:
                    await _maybe_await(client._on_retry(retry))
                await asyncio.sleep(retry.delay)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a final status, or a callback that raised
            self._error = error
        finally:
            if not self._closed:
                await self._queue.put(_END)
