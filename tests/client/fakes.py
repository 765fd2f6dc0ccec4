"""A small in-process fake of `TurnIdService` for client tests, and a loop thread to run it on.

The fake keeps one dict of threads in memory, replays known request_ids, honours
`expected_last_sequence`, streams `WatchTurns` (replay, then live), and can be told to fail
the next attempts of a method with any status (AIP-193: one ErrorInfo, domain "turnid").
Every wait it offers is an event, never a pause.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import grpc
import grpc.aio
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from turnid.v1 import turnid_pb2, turnid_pb2_grpc

_T = TypeVar("_T")
WAIT = 30.0  # seconds: only a bound on waiting for events, never a pause


@dataclass
class Failure:
    code: grpc.StatusCode
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    message: str = "injected"


def status_for(failure: Failure) -> grpc.Status:
    details = []
    if failure.reason:
        info = error_details_pb2.ErrorInfo(
            reason=failure.reason, domain="turnid", metadata=failure.metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        details.append(packed)
    status = status_pb2.Status(code=failure.code.value[0], message=failure.message, details=details)
    return rpc_status.to_status(status)


class FakeTurnId(turnid_pb2_grpc.TurnIdServiceServicer):  # type: ignore[misc]
    """The fake service. State survives `stop()`/`start()` of the servers that carry it."""

    def __init__(self) -> None:
        self.turns: dict[str, list[Any]] = defaultdict(list)
        self.by_request: dict[tuple[str, str], list[Any]] = {}
        self.attempts: list[tuple[str, Any]] = []  # (method, request) of every call
        self.failures: dict[str, list[Failure]] = defaultdict(list)
        self.changed = asyncio.Condition()
        self.watch_started = asyncio.Event()
        self.watchers = 0
        self.page_gate: asyncio.Event | None = None  # ListTurns pages after the first wait on it
        self.hang: dict[str, asyncio.Event] = {}  # method -> set when a call of it hangs
        self.hang_cancelled: dict[str, asyncio.Event] = {}
        self.lost: dict[str, asyncio.Event] = {}  # method -> set when its answer was lost

    # -- test controls (call on the servicer's loop) -------------------------------------------

    def fail_next(self, method: str, *failures: Failure) -> None:
        self.failures[method].extend(failures)

    def hang_next(self, method: str) -> asyncio.Event:
        """The next call of `method` never answers; the event is set when it arrives."""
        self.hang[method] = asyncio.Event()
        self.hang_cancelled[method] = asyncio.Event()
        return self.hang[method]

    def lose_next_answer(self, method: str) -> asyncio.Event:
        """The next write of `method` commits, then never answers (the response is lost)."""
        self.lost[method] = asyncio.Event()
        return self.lost[method]

    def attempts_of(self, method: str) -> list[Any]:
        return [request for name, request in self.attempts if name == method]

    async def append(self, thread_id: str, kind: int, count: int = 1, request_id: str = "") -> Any:
        async with self.changed:
            turns = self._mint(thread_id, kind, count, request_id, claimed_id=None)
            self.changed.notify_all()
        return turns

    # -- helpers --------------------------------------------------------------------------------

    def _mint(
        self, thread_id: str, kind: int, count: int, request_id: str, claimed_id: str | None
    ) -> list[Any]:
        history = self.turns[thread_id]
        made = []
        for _ in range(count):
            stamp = timestamp_pb2.Timestamp()
            stamp.GetCurrentTime()
            compactions = sum(1 for t in history if t.kind == 2)
            turn_id = claimed_id or (
                f"auto-compact-{compactions}" if kind == 2 else str(uuid.uuid4())
            )
            turn = turnid_pb2.Turn(
                thread_id=thread_id,
                turn_id=turn_id,
                kind=kind,
                sequence=len(history) + 1,
                create_time=stamp,
                request_id=request_id,
                claimed=claimed_id is not None,
            )
            history.append(turn)
            made.append(turn)
        if request_id:
            self.by_request[(thread_id, request_id)] = made
        return made

    async def _enter(self, method: str, request: Any, context: Any) -> None:
        self.attempts.append((method, request))
        if self.failures[method]:
            await context.abort_with_status(status_for(self.failures[method].pop(0)))
        hang = self.hang.pop(method, None)
        if hang is not None:
            hang.set()
            try:
                await asyncio.Event().wait()
            finally:
                self.hang_cancelled[method].set()

    async def _write(
        self, method: str, request: Any, context: Any, count: int, claimed: str | None
    ) -> Any:
        turns = await self._commit(request, context, count, claimed)
        lost = self.lost.pop(method, None)
        if lost is not None:
            lost.set()
            await asyncio.Event().wait()  # until the client gives up and the call is cancelled
        return turns

    async def _commit(self, request: Any, context: Any, count: int, claimed: str | None) -> Any:
        known = self.by_request.get((request.thread_id, request.request_id))
        if request.request_id and known is not None:
            return known
        last = len(self.turns[request.thread_id])
        if request.HasField("expected_last_sequence") and request.expected_last_sequence != last:
            failure = Failure(
                grpc.StatusCode.FAILED_PRECONDITION,
                "THREAD_ADVANCED",
                {"thread_id": request.thread_id, "last_sequence": str(last)},
                "the thread has moved on",
            )
            await context.abort_with_status(status_for(failure))
        async with self.changed:
            turns = self._mint(request.thread_id, request.kind, count, request.request_id, claimed)
            self.changed.notify_all()
        return turns

    # -- the RPCs -------------------------------------------------------------------------------

    async def AllocateTurnId(self, request, context):  # type: ignore[no-untyped-def]
        await self._enter("AllocateTurnId", request, context)
        (turn,) = await self._write("AllocateTurnId", request, context, 1, None)
        return turnid_pb2.AllocateTurnIdResponse(turn=turn)

    async def BatchAllocateTurnIds(self, request, context):  # type: ignore[no-untyped-def]
        await self._enter("BatchAllocateTurnIds", request, context)
        turns = await self._write("BatchAllocateTurnIds", request, context, request.count, None)
        return turnid_pb2.BatchAllocateTurnIdsResponse(turns=turns)

    async def ClaimTurnId(self, request, context):  # type: ignore[no-untyped-def]
        await self._enter("ClaimTurnId", request, context)
        (turn,) = await self._write("ClaimTurnId", request, context, 1, request.turn_id)
        return turnid_pb2.ClaimTurnIdResponse(turn=turn)

    async def GetTurn(self, request, context):  # type: ignore[no-untyped-def]
        await self._enter("GetTurn", request, context)
        for turn in self.turns.get(request.thread_id, []):
            if turn.turn_id == request.turn_id:
                return turnid_pb2.GetTurnResponse(turn=turn)
        await context.abort_with_status(
            status_for(Failure(grpc.StatusCode.NOT_FOUND, "TURN_NOT_FOUND"))
        )

    async def GetThread(self, request, context):  # type: ignore[no-untyped-def]
        await self._enter("GetThread", request, context)
        history = self.turns.get(request.thread_id)
        if not history:
            failure = Failure(
                grpc.StatusCode.NOT_FOUND, "THREAD_NOT_FOUND", {"thread_id": request.thread_id}
            )
            await context.abort_with_status(status_for(failure))
        thread = turnid_pb2.Thread(
            thread_id=request.thread_id,
            last_sequence=len(history),
            next_compaction_index=sum(1 for t in history if t.kind == 2),
            last_turn=history[-1],
            create_time=history[0].create_time,
            update_time=history[-1].create_time,
        )
        return turnid_pb2.GetThreadResponse(thread=thread)

    async def ListTurns(self, request, context):  # type: ignore[no-untyped-def]
        await self._enter("ListTurns", request, context)
        start = int(request.page_token or "0")
        if start and self.page_gate is not None:
            await self.page_gate.wait()
        size = request.page_size or 100
        history = self.turns.get(request.thread_id, [])
        page = history[start : start + size]
        more = start + size < len(history)
        return turnid_pb2.ListTurnsResponse(
            turns=page, next_page_token=str(start + size) if more else ""
        )

    async def WatchTurns(self, request, context) -> AsyncIterator[Any]:  # type: ignore[no-untyped-def]
        await self._enter("WatchTurns", request, context)
        if request.after_sequence < 0:
            failure = Failure(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SEQUENCE")
            await context.abort_with_status(status_for(failure))
        sent = request.after_sequence
        history = self.turns[request.thread_id]
        self.watchers += 1
        self.watch_started.set()
        try:
            batch = history[sent:]  # taken before the yield: appends may come during it
            sent = max(sent, len(history))
            yield turnid_pb2.WatchTurnsResponse(turns=batch, caught_up=True)
            while True:
                async with self.changed:
                    await self.changed.wait_for(lambda sent=sent: len(history) > sent)
                batch = history[sent:]
                sent = len(history)
                yield turnid_pb2.WatchTurnsResponse(turns=batch, caught_up=True)
        finally:
            self.watchers -= 1


class FakeServer:
    """A grpc.aio server carrying a `FakeTurnId` (and the standard health service)."""

    def __init__(self, fake: FakeTurnId | None = None) -> None:
        self.fake = fake or FakeTurnId()
        self.port = 0
        self.server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FakeServer:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        turnid_pb2_grpc.add_TurnIdServiceServicer_to_server(self.fake, server)
        health_servicer = _Health()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert port, "could not bind"
        self.port = port
        await server.start()
        self.server = server
        return self

    async def stop(self, grace: float | None = 0) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.stop(grace)


class _Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    serving: ClassVar[dict[str, int]] = {
        "": health_pb2.HealthCheckResponse.SERVING,
        "turnid.v1.TurnIdService": health_pb2.HealthCheckResponse.SERVING,
        "sick": health_pb2.HealthCheckResponse.NOT_SERVING,
    }

    async def Check(self, request, context):  # type: ignore[no-untyped-def]
        if request.service not in self.serving:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=self.serving[request.service])


class LoopThread:
    """An event loop in a background thread, for servers that a blocking client calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(WAIT)

    def call(self, function: Any, *args: Any) -> Any:
        async def run() -> Any:
            return function(*args)

        return self.run(run())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()
