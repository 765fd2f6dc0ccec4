"""Client coalescing (issue 13): concurrent writes of one client travel in one AllocateMany.

Against the real in-process server (memory: and a SQLite file) unless a fake is the point:
a lone caller's write goes at once, as its own unary call; 32 tasks / 32 OS threads share far
fewer calls, each caller with its own turn or its own typed error (and its request_id);
request_id retries across a server restart return the original turns; every caller keeps its
own deadline, even when its item sits in a call in flight; UNAVAILABLE on an item or on the
whole call is retried; a server without AllocateMany (a fake) makes the client fall back to
unary for good; `coalesce=False` sends every write unary. RPCs are counted by client
interceptors. Every wait is on an event (with a bound), never a pause.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from tests.client.fakes import WAIT, FakeServer, LoopThread
from turnid.client import (
    AsyncTurnIdClient,
    Cancelled,
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    RetryEvent,
    RetryPolicy,
    Turn,
    TurnIdClient,
    TurnIdError,
    TurnKind,
)
from turnid.client._coalesce import FOLLOW_MIN
from turnid.service.config import ServerConfig
from turnid.service.domain import TurnService
from turnid.service.domain.errors import store_unavailable
from turnid.service.server import TurnIdServer

FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)
N = 32


# --- counting RPCs ----------------------------------------------------------------------------


class AioCounter(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.methods: Counter[str] = Counter()

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        self.methods[method.rsplit("/", 1)[-1]] += 1
        return await continuation(details, request)


class SyncCounter(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.methods: Counter[str] = Counter()
        self._lock = threading.Lock()

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        with self._lock:
            self.methods[details.method.rsplit("/", 1)[-1]] += 1
        return continuation(details, request)


class WatchedQueue(deque[Any]):
    """A coalescer queue that tells a waiting test how many writes have queued."""

    def __init__(self) -> None:
        super().__init__()
        self.appended = 0
        self.changed = threading.Condition()

    def append(self, item: Any) -> None:
        super().append(item)
        with self.changed:
            self.appended += 1
            self.changed.notify_all()

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.appended >= count, WAIT), self.appended


def watch_queue(client: TurnIdClient) -> WatchedQueue:
    queue = WatchedQueue()
    client._coalescer._queue = queue  # type: ignore[union-attr]
    return queue


# --- servers ----------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory:" if request.param == "memory" else f"sqlite://{tmp_path / 'coalesce.db'}"


@pytest.fixture
async def server(database: str) -> AsyncIterator[TurnIdServer]:
    running = TurnIdServer(ServerConfig(listen="127.0.0.1:0", database=database))
    await running.start()
    yield running
    await running.stop(grace=0)


@pytest.fixture
def threaded_server(loop_thread: LoopThread, database: str) -> Iterator[TurnIdServer]:
    """The real server on a loop thread, for the blocking client."""

    async def start() -> TurnIdServer:
        running = TurnIdServer(ServerConfig(listen="127.0.0.1:0", database=database))
        await running.start()
        return running

    running = loop_thread.run(start())
    yield running
    loop_thread.run(running.stop(grace=0))


class Gate:
    """Holds server-side allocations of chosen threads until released (thread-safe)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.arrived: dict[str, threading.Event] = {}
        self._release: dict[str, threading.Event] = {}
        self.hold_first = False
        self.first = threading.Event()
        self._release_first = threading.Event()
        # Every write use case (a gated one that calls another passes the second gate: its
        # release is set by then).
        for name in ("allocate", "allocate_batch", "claim"):
            monkeypatch.setattr(TurnService, name, self._held(getattr(TurnService, name)))
        # The unary RPCs' writes (the servicer's entry point: one validated Allocation).
        if hasattr(TurnService, "write"):
            original_write = TurnService.write

            async def write(service: TurnService, allocation: Any) -> Any:
                await self._pass([allocation.thread_id])
                return await original_write(service, allocation)

            monkeypatch.setattr(TurnService, "write", write)
        # AllocateMany's writes reach the service together, in one call.
        if hasattr(TurnService, "allocate_many"):
            monkeypatch.setattr(
                TurnService, "allocate_many", self._held_many(TurnService.allocate_many)
            )

    async def _pass(self, thread_ids: Any) -> None:
        """Wait here while the first write or any of `thread_ids` is held."""
        if self.hold_first and not self.first.is_set():
            self.first.set()
            await _wait_threadsafe(self._release_first)
        for thread_id in dict.fromkeys(thread_ids):
            if thread_id in self._release:
                self.arrived[thread_id].set()
                await _wait_threadsafe(self._release[thread_id])

    def _held(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def held(service: TurnService, thread_id: str, *args: Any, **kwargs: Any) -> Any:
            await self._pass([thread_id])
            return await original(service, thread_id, *args, **kwargs)

        return held

    def _held_many(self, original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def held(service: TurnService, requests: Any, *args: Any, **kwargs: Any) -> Any:
            await self._pass(request.thread_id for request in requests)
            return await original(service, requests, *args, **kwargs)

        return held

    def hold(self, thread_id: str) -> None:
        self.arrived[thread_id] = threading.Event()
        self._release[thread_id] = threading.Event()

    def release(self, thread_id: str) -> None:
        self._release[thread_id].set()

    def release_first(self) -> None:
        self._release_first.set()


async def _wait_threadsafe(event: threading.Event) -> None:
    await asyncio.get_running_loop().run_in_executor(None, event.wait, WAIT)


async def wait_event(event: threading.Event) -> None:
    assert await asyncio.get_running_loop().run_in_executor(None, event.wait, WAIT)


# --- the mixed workload: every caller its own outcome ----------------------------------------

Call = tuple[str, Callable[[Any], Any], Callable[[Any], None]]


def mixed_calls(thread_id: str) -> list[Call]:
    """(request_id, call(client), check(outcome)): 32 writes, successes and typed errors."""
    calls: list[Call] = []

    def expect_turn(kind: TurnKind, thread: str) -> Callable[[Any], None]:
        def check(outcome: Any) -> None:
            assert isinstance(outcome, Turn), outcome
            assert outcome.kind is kind and outcome.thread_id == thread

        return check

    def expect_error(kind: type[TurnIdError], reason: str, rid: str) -> Callable[[Any], None]:
        def check(outcome: Any) -> None:
            assert isinstance(outcome, kind), outcome
            assert outcome.reason == reason
            assert outcome.request_id == rid, "every error carries its caller's request_id"

        return check

    for i in range(12):
        thread, rid = f"{thread_id}-own-{i}", f"own-{i}"
        kind = (TurnKind.REALTIME_DELEGATION, TurnKind.AUTO_COMPACTION, TurnKind.USER_INPUT)[i % 3]
        calls.append(
            (
                rid,
                lambda c, t=thread, k=kind, r=rid: c.allocate(t, k, request_id=r),
                expect_turn(kind, thread),
            )
        )
    for i in range(4):
        rid = f"bad-{i}"
        calls.append(
            (
                rid,
                lambda c, r=rid: c.user_input("bad thread id", request_id=r),
                expect_error(InvalidArgument, "INVALID_THREAD_ID", rid),
            )
        )
    for i in range(4):
        rid = f"taken-{i}"
        calls.append(
            (
                rid,
                lambda c, r=rid: c.claim(
                    f"{thread_id}-taken", "rollout-1", TurnKind.USER_INPUT, request_id=r
                ),
                expect_error(Conflict, "TURN_ID_TAKEN", rid),
            )
        )
    for i in range(4):
        rid = f"late-{i}"

        def loser(outcome: Any, r: str = rid) -> None:
            expect_error(FailedPrecondition, "THREAD_ADVANCED", r)(outcome)
            assert outcome.last_sequence == 1

        calls.append(
            (
                rid,
                lambda c, r=rid: c.realtime_delegation(
                    f"{thread_id}-busy", expected_last_sequence=0, request_id=r
                ),
                loser,
            )
        )
    for i in range(6):
        rid, thread = f"batch-{i}", f"{thread_id}-batch-{i}"

        def batch_check(outcome: Any, t: str = thread) -> None:
            assert [turn.sequence for turn in outcome] == [1, 2, 3]
            assert all(turn.thread_id == t for turn in outcome)

        calls.append(
            (
                rid,
                lambda c, t=thread, r=rid: c.allocate_batch(
                    t, TurnKind.USER_INPUT, 3, request_id=r
                ),
                batch_check,
            )
        )
    rid = "count"
    calls.append(
        (
            rid,
            lambda c, r=rid: c.allocate_batch(
                f"{thread_id}-x", TurnKind.USER_INPUT, 1001, request_id=r
            ),
            expect_error(InvalidArgument, "INVALID_COUNT", rid),
        )
    )
    rid = "claim-ok"
    calls.append(
        (
            rid,
            lambda c, r=rid: c.claim(
                f"{thread_id}-claims", "rollout-9", TurnKind.USER_INPUT, request_id=r
            ),
            expect_turn(TurnKind.USER_INPUT, f"{thread_id}-claims"),
        )
    )
    assert len(calls) == N
    return calls


def check_own_turns(outcomes: list[Any]) -> None:
    turns = [o for o in outcomes if isinstance(o, Turn)]
    turns += [t for o in outcomes if isinstance(o, list) for t in o]
    ids = [(t.thread_id, t.turn_id) for t in turns]
    assert len(set(ids)) == len(ids), "no two callers got the same turn"


# --- async ------------------------------------------------------------------------------------


async def test_async_a_lone_caller_sends_at_once_unary(
    server: TurnIdServer, thread_id: str
) -> None:
    counter = AioCounter()
    async with AsyncTurnIdClient(server.target, interceptors=[counter]) as client:
        turn = await client.auto_compaction(thread_id)
        assert turn.turn_id == "auto-compact-0"
        assert counter.methods == {"AllocateTurnId": 1}
        await client.allocate_batch(thread_id, TurnKind.USER_INPUT, 3)
        await client.claim(thread_id, "rollout-1", TurnKind.USER_INPUT)
        assert counter.methods == {"AllocateTurnId": 1, "BatchAllocateTurnIds": 1, "ClaimTurnId": 1}


async def test_async_32_tasks_share_three_calls_each_with_its_own_outcome(
    server: TurnIdServer, thread_id: str
) -> None:
    counter = AioCounter()
    async with AsyncTurnIdClient(server.target, interceptors=[counter], retry=FAST) as client:
        await client.claim(f"{thread_id}-taken", "rollout-1", TurnKind.USER_INPUT)
        await client.user_input(f"{thread_id}-busy")
        counter.methods.clear()
        calls = mixed_calls(thread_id)
        outcomes = await asyncio.gather(
            *(call(client) for _, call, _ in calls), return_exceptions=True
        )
        for (_, _, check), outcome in zip(calls, outcomes, strict=True):
            check(outcome)
        check_own_turns(outcomes)
        # The first goes at once, alone; of the 31 that come while it is in flight, the first
        # FOLLOW_MIN go in a second call, the rest when a call ends.
        assert counter.methods == {"AllocateTurnId": 1, "AllocateMany": 2}


async def test_async_coalesced_allocations_number_each_thread_without_gaps(
    server: TurnIdServer, thread_id: str
) -> None:
    counter = AioCounter()
    async with AsyncTurnIdClient(server.target, interceptors=[counter]) as client:
        for _ in range(3):
            await asyncio.gather(
                *(
                    client.allocate(f"{thread_id}-{i % 4}", TurnKind.AUTO_COMPACTION)
                    for i in range(N)
                )
            )
        assert counter.methods == {"AllocateTurnId": 3, "AllocateMany": 6}
        for thread in (f"{thread_id}-{i}" for i in range(4)):
            everything = [t async for t in client.list_turns(thread)]
            assert [t.sequence for t in everything] == list(range(1, 3 * N // 4 + 1))
            assert [t.turn_id for t in everything] == [
                f"auto-compact-{n}" for n in range(3 * N // 4)
            ]


async def test_async_request_id_retries_across_a_restart_return_the_original_turns(
    tmp_path: Path, thread_id: str
) -> None:
    database = f"sqlite://{tmp_path / 'restart.db'}"
    first = TurnIdServer(ServerConfig(listen="127.0.0.1:0", database=database))
    await first.start()
    port = first.port
    retried = asyncio.Event()

    def on_retry(event: RetryEvent) -> None:
        retried.set()

    counter = AioCounter()
    async with AsyncTurnIdClient(
        first.target, retry=FAST, on_retry=on_retry, interceptors=[counter], timeout=30
    ) as client:

        def step(i: int) -> Awaitable[Any]:
            if i % 3 == 0:
                return client.allocate_batch(
                    f"{thread_id}-{i % 5}", TurnKind.USER_INPUT, 2, request_id=f"step-{i}"
                )
            return client.allocate(
                f"{thread_id}-{i % 5}", TurnKind(1 + i % 3), request_id=f"step-{i}"
            )

        originals = await asyncio.gather(*(step(i) for i in range(N)))
        assert counter.methods["AllocateMany"] >= 1
        await first.stop(grace=0)
        retries = [asyncio.ensure_future(step(i)) for i in range(N)]
        await asyncio.wait_for(retried.wait(), WAIT)  # they find the server down, and retry
        second = TurnIdServer(ServerConfig(listen=f"127.0.0.1:{port}", database=database))
        await second.start()
        try:
            again = await asyncio.gather(*retries)
            assert again == originals
        finally:
            await second.stop(grace=0)


async def test_async_a_callers_deadline_holds_while_its_item_is_in_flight(
    server: TurnIdServer, thread_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch)
    hold, slow, fine = f"{thread_id}-hold", f"{thread_id}-slow", f"{thread_id}-fine"
    gate.hold(hold)
    gate.hold(slow)
    counter = AioCounter()
    async with AsyncTurnIdClient(server.target, interceptors=[counter]) as client:
        first = asyncio.ensure_future(client.user_input(hold))
        await wait_event(gate.arrived[hold])  # in flight, alone
        late = asyncio.ensure_future(client.user_input(slow, timeout=0.5, request_id="mine"))
        other = asyncio.ensure_future(client.user_input(fine, timeout=WAIT))
        await asyncio.sleep(0)  # a yield, not a pause: both tasks take their first step, queue
        assert client._coalescer is not None and len(client._coalescer._queue) == 2
        gate.release(hold)
        await first
        await wait_event(gate.arrived[slow])  # the AllocateMany carrying `late` is in flight
        with pytest.raises(DeadlineExceeded) as caught:
            await late
        assert caught.value.request_id == "mine"
        assert not other.done(), "the call it travelled in is still in flight"
        gate.release(slow)
        turn = await other
        assert turn.thread_id == fine
        assert counter.methods == {"AllocateTurnId": 1, "AllocateMany": 1}
        # The late item was written all the same: its request_id tells the caller's retry so.
        again = await client.user_input(slow, request_id="mine")
        assert again.request_id == "mine" and again.sequence == 1


async def test_async_a_caller_queued_behind_a_stuck_call_is_not_held_up_by_it(
    server: TurnIdServer, thread_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One slow write (its thread's lock held, say) must not make other threads' writes wait
    # for it: after MAX_HOLD they go in a call of their own.
    gate = Gate(monkeypatch)
    hold = f"{thread_id}-hold"
    gate.hold(hold)
    async with AsyncTurnIdClient(server.target) as client:
        first = asyncio.ensure_future(client.user_input(hold))
        await wait_event(gate.arrived[hold])
        queued = await client.auto_compaction(f"{thread_id}-queued", timeout=2, request_id="q")
        assert (queued.turn_id, queued.request_id) == ("auto-compact-0", "q")
        assert not first.done()
        gate.release(hold)
        await first


async def test_async_an_items_unavailable_is_retried_within_its_deadline(
    server: TurnIdServer, thread_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky = f"{thread_id}-flaky"
    failures = [store_unavailable("injected")]
    original = TurnService.allocate

    async def allocate(service: TurnService, thread: str, *args: Any, **kwargs: Any) -> Any:
        if thread == flaky and failures:
            raise failures.pop()
        return await original(service, thread, *args, **kwargs)

    monkeypatch.setattr(TurnService, "allocate", allocate)  # user_input() is an allocate()
    if hasattr(TurnService, "write"):  # ... which the servicer's unary RPCs call as write()
        original_write = TurnService.write

        async def write(service: TurnService, allocation: Any) -> Any:
            if allocation.thread_id == flaky and failures:
                raise failures.pop()
            return await original_write(service, allocation)

        monkeypatch.setattr(TurnService, "write", write)
    if hasattr(TurnService, "allocate_many"):  # an AllocateMany's writes, all at once
        original_many = TurnService.allocate_many

        async def allocate_many(service: TurnService, requests: Any) -> list[Any]:
            fail = [request.thread_id == flaky and bool(failures) for request in requests]
            errors = [failures.pop() for failed in fail if failed]
            rest = [request for request, failed in zip(requests, fail, strict=True) if not failed]
            answers = iter(await original_many(service, rest) if rest else [])
            return [errors.pop() if failed else next(answers) for failed in fail]

        monkeypatch.setattr(TurnService, "allocate_many", allocate_many)
    events: list[RetryEvent] = []
    counter = AioCounter()
    async with AsyncTurnIdClient(
        server.target, retry=FAST, on_retry=events.append, interceptors=[counter]
    ) as client:
        turns = await asyncio.gather(
            client.user_input(f"{thread_id}-a"),
            client.user_input(flaky, request_id="flaky-1"),
            client.user_input(f"{thread_id}-b"),
        )
    assert turns[1].thread_id == flaky and turns[1].request_id == "flaky-1"
    assert [(e.method, e.request_id, e.error.reason) for e in events] == [
        ("AllocateTurnId", "flaky-1", "STORE_UNAVAILABLE")
    ]
    assert counter.methods["AllocateMany"] == 1


class FailFirstMany(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The first AllocateMany fails with `code` before any work."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.armed = True

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.endswith("/AllocateMany"):
            return handler
        inner = handler.unary_unary

        async def fail(request: Any, context: Any) -> Any:
            if self.armed:
                self.armed = False
                await context.abort(self.code, "injected")
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            fail,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED],
)
async def test_async_a_failed_allocate_many_is_retried_by_each_caller(
    thread_id: str, code: grpc.StatusCode
) -> None:
    interceptor = FailFirstMany(code)
    running = TurnIdServer(
        ServerConfig(listen="127.0.0.1:0", database="memory:"), interceptors=[interceptor]
    )
    await running.start()
    events: list[RetryEvent] = []
    try:
        async with AsyncTurnIdClient(running.target, retry=FAST, on_retry=events.append) as client:
            turns = await asyncio.gather(
                *(client.user_input(f"{thread_id}-{i}", request_id=f"r-{i}") for i in range(8))
            )
        assert [t.request_id for t in turns] == [f"r-{i}" for i in range(8)]
        assert not interceptor.armed
        assert sorted(e.request_id for e in events) == [f"r-{i}" for i in range(1, 8)]
        assert {e.error.code for e in events} == {code}
    finally:
        await running.stop(grace=0)


async def test_async_falls_back_to_unary_for_good_on_unimplemented(
    fake_server: FakeServer, thread_id: str
) -> None:
    counter = AioCounter()
    async with AsyncTurnIdClient(fake_server.target, interceptors=[counter]) as client:
        turns = await asyncio.gather(
            *(client.user_input(f"{thread_id}-{i}", request_id=f"r-{i}") for i in range(N))
        )
        assert [t.request_id for t in turns] == [f"r-{i}" for i in range(N)]
        # Every write went unary in the end; the AllocateMany calls that left before the first
        # UNIMPLEMENTED came back (a second one early, a write held past MAX_HOLD on a slow
        # machine) learned that the server has none.
        many = counter.methods["AllocateMany"]
        assert counter.methods == {"AllocateTurnId": N, "AllocateMany": many} and many >= 1
        assert client._coalescer is not None and client._coalescer.unimplemented
        await asyncio.gather(*(client.user_input(f"{thread_id}-{i}") for i in range(N)))
        assert counter.methods == {"AllocateTurnId": 2 * N, "AllocateMany": many}


async def test_async_coalesce_false_sends_every_write_unary(
    server: TurnIdServer, thread_id: str
) -> None:
    counter = AioCounter()
    async with AsyncTurnIdClient(server.target, interceptors=[counter], coalesce=False) as client:
        await asyncio.gather(*(client.user_input(f"{thread_id}-{i}") for i in range(N)))
        assert client._coalescer is None
    assert counter.methods == {"AllocateTurnId": N}


async def test_async_closing_fails_queued_writes_cancelled(
    server: TurnIdServer, thread_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch)
    hold = f"{thread_id}-hold"
    gate.hold(hold)
    client = AsyncTurnIdClient(server.target)
    first = asyncio.ensure_future(client.user_input(hold))
    await wait_event(gate.arrived[hold])
    queued = asyncio.ensure_future(client.user_input(f"{thread_id}-q", request_id="q"))
    await asyncio.sleep(0)  # a yield, not a pause: the task takes its first step and queues
    assert client._coalescer is not None and len(client._coalescer._queue) == 1
    await client.close()
    with pytest.raises(Cancelled) as caught:
        await queued
    assert caught.value.request_id == "q"
    with pytest.raises(asyncio.CancelledError):  # the lone unary call: as without coalescing
        await first
    gate.release(hold)


# --- sync: 32 OS threads ---------------------------------------------------------------------


def run_threads(calls: list[Callable[[], Any]]) -> list[Any]:
    def outcome(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except TurnIdError as error:
            return error

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(outcome, calls))


def test_sync_a_lone_caller_sends_at_once_unary(
    threaded_server: TurnIdServer, thread_id: str
) -> None:
    counter = SyncCounter()
    with TurnIdClient(threaded_server.target, interceptors=[counter]) as client:
        assert client.auto_compaction(thread_id).turn_id == "auto-compact-0"
        client.allocate_batch(thread_id, TurnKind.USER_INPUT, 2)
        client.claim(thread_id, "rollout-1", TurnKind.USER_INPUT)
    assert counter.methods == {"AllocateTurnId": 1, "BatchAllocateTurnIds": 1, "ClaimTurnId": 1}


def test_sync_32_threads_share_a_few_calls_each_with_its_own_outcome(
    threaded_server: TurnIdServer, thread_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch)
    counter = SyncCounter()
    with TurnIdClient(threaded_server.target, interceptors=[counter], retry=FAST) as client:
        client.claim(f"{thread_id}-taken", "rollout-1", TurnKind.USER_INPUT)
        client.user_input(f"{thread_id}-busy")
        counter.methods.clear()
        queue = watch_queue(client)
        calls = mixed_calls(thread_id)
        gate.hold_first = True  # the first write stays in flight until the rest have queued

        def release_when_queued() -> None:
            assert gate.first.wait(WAIT)
            queue.wait_for(N - 1)
            gate.release_first()

        releaser = threading.Thread(target=release_when_queued)
        releaser.start()
        outcomes = run_threads([lambda call=call: call(client) for _, call, _ in calls])
        releaser.join(WAIT)
        for (_, _, check), outcome in zip(calls, outcomes, strict=True):
            check(outcome)
        check_own_turns(outcomes)
    # One unary call (held until the rest queued), then a few calls for the other 31: an
    # AllocateMany at FOLLOW_MIN queued, the rest when a call ends (one alone goes unary).
    assert counter.methods["AllocateMany"] >= 1
    assert sum(counter.methods.values()) <= 8, counter.methods


def test_sync_many_threads_use_far_fewer_calls_than_allocations(
    threaded_server: TurnIdServer, thread_id: str
) -> None:
    counter = SyncCounter()
    per_thread = 20
    with TurnIdClient(threaded_server.target, interceptors=[counter]) as client:
        start = threading.Barrier(N)

        def work(i: int) -> list[Turn]:
            start.wait(WAIT)
            return [client.user_input(f"{thread_id}-{i}") for _ in range(per_thread)]

        with ThreadPoolExecutor(N) as pool:
            results = list(pool.map(work, range(N)))
    for turns in results:
        assert [t.sequence for t in turns] == list(range(1, per_thread + 1))
    total = sum(counter.methods.values())
    assert counter.methods["AllocateMany"] >= 1
    assert total < N * per_thread / 2, counter.methods


def test_sync_a_callers_deadline_holds_while_its_item_is_in_flight(
    threaded_server: TurnIdServer, thread_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch)
    hold, slow, fine = f"{thread_id}-hold", f"{thread_id}-slow", f"{thread_id}-fine"
    gate.hold(hold)
    gate.hold(slow)
    with TurnIdClient(threaded_server.target) as client, ThreadPoolExecutor(3) as pool:
        first = pool.submit(client.user_input, hold)
        assert gate.arrived[hold].wait(WAIT)
        late = pool.submit(client.user_input, slow, timeout=0.5, request_id="mine")
        assert gate.arrived[slow].wait(WAIT)  # sent after MAX_HOLD, though `first` is stuck
        with pytest.raises(DeadlineExceeded) as caught:
            late.result(WAIT)
        assert caught.value.request_id == "mine"
        # Other threads' writes are not held up by the two stuck calls.
        assert client.user_input(fine, timeout=WAIT).thread_id == fine
        assert not first.done()
        gate.release(hold)
        gate.release(slow)
        first.result(WAIT)
        again = client.user_input(slow, request_id="mine")
        assert again.request_id == "mine" and again.sequence == 1


def test_sync_falls_back_to_unary_for_good_on_unimplemented(
    threaded_fake: FakeServer, thread_id: str
) -> None:
    counter = SyncCounter()
    with TurnIdClient(threaded_fake.target, interceptors=[counter]) as client:
        queue = watch_queue(client)
        hold = threading.Event()
        original = client._coalescer._stub.AllocateTurnId  # type: ignore[union-attr]

        class Held:
            """The first unary call waits until enough writes queued for an AllocateMany."""

            def __init__(self) -> None:
                self.first = True

            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                if self.first:
                    self.first = False
                    hold.set()
                    queue.wait_for(FOLLOW_MIN)
                return original(*args, **kwargs)

            def future(self, *args: Any, **kwargs: Any) -> Any:
                return original.future(*args, **kwargs)

        client._coalescer._stub = _StubWith(client._coalescer._stub, AllocateTurnId=Held())  # type: ignore[union-attr]
        outcomes = run_threads(
            [
                lambda i=i: client.user_input(f"{thread_id}-{i}", request_id=f"r-{i}")
                for i in range(N)
            ]
        )
        assert hold.is_set()
        assert [o.request_id for o in outcomes] == [f"r-{i}" for i in range(N)]
        # More than one may leave before UNIMPLEMENTED is back (a second call early, a write
        # held past MAX_HOLD in a call of its own on a slow machine); each write still ends up
        # unary exactly once.
        many = counter.methods["AllocateMany"]
        assert counter.methods == {"AllocateTurnId": N, "AllocateMany": many} and many >= 1
        assert client._coalescer is not None and client._coalescer.unimplemented
        run_threads([lambda i=i: client.user_input(f"{thread_id}-{i}") for i in range(8)])
        assert counter.methods == {"AllocateTurnId": N + 8, "AllocateMany": many}


class _StubWith:
    def __init__(self, stub: Any, **overrides: Any) -> None:
        self._stub = stub
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        return self._overrides.get(name) or getattr(self._stub, name)


def test_sync_coalesce_false_sends_every_write_unary(
    threaded_server: TurnIdServer, thread_id: str
) -> None:
    counter = SyncCounter()
    with TurnIdClient(threaded_server.target, interceptors=[counter], coalesce=False) as client:
        assert client._coalescer is None
        run_threads([lambda i=i: client.user_input(f"{thread_id}-{i}") for i in range(N)])
    assert counter.methods == {"AllocateTurnId": N}


def test_sync_request_id_retries_return_the_original_turns(
    threaded_server: TurnIdServer, thread_id: str
) -> None:
    with TurnIdClient(threaded_server.target) as client:
        calls = [
            lambda i=i: client.allocate(
                f"{thread_id}-{i % 3}", TurnKind(1 + i % 3), request_id=f"s-{i}"
            )
            for i in range(N)
        ]
        first = run_threads(calls)
        again = run_threads(calls)
    assert all(isinstance(t, Turn) for t in first)
    assert again == first
