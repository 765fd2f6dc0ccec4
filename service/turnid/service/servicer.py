"""The gRPC transport: protos in, domain calls, protos out; errors -> google.rpc.Status.

Nothing here decides anything: validation and rules live in the domain. One handler wrapper
(`_unary`, `_server_stream`) does what every RPC shares: parsing the request (bytes that do
not decode are MALFORMED_REQUEST, not gRPC's bare UNKNOWN), refusing calls once shutdown has
begun (UNAVAILABLE/SHUTTING_DOWN, before any work, so the client retries elsewhere), mapping
errors (a TurnIdError to its status; anything else to INTERNAL/INTERNAL_ERROR with a
correlation id that the log line carries too, and nothing internal in the message:
invariant 7), and telling the call observers (access log, metrics) how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, cast

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from turnid.service.domain import (
    Allocation,
    ErrorCategory,
    Replayed,
    ThreadInfo,
    Turn,
    TurnIdError,
    TurnRun,
    TurnService,
    WatchUpdate,
    WriteRequest,
    validation,
)
from turnid.service.domain.errors import internal_error, invalid_field, shutting_down
from turnid.v1 import turnid_pb2

try:
    from turnid.service.auth import current_namespace
except ImportError:  # pragma: no cover - auth.py lands with issue 10
    current_namespace = contextvars.ContextVar("turnid_namespace", default="")

log = logging.getLogger("turnid.servicer")
#: Set by `_write` when the store answered a replay; read by the unary wrapper.
_replayed: contextvars.ContextVar[bool] = contextvars.ContextVar("turnid_replayed", default=False)

ERROR_DOMAIN = "turnid"

_CODES = {
    ErrorCategory.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    ErrorCategory.NOT_FOUND: code_pb2.NOT_FOUND,
    ErrorCategory.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    ErrorCategory.UNAVAILABLE: code_pb2.UNAVAILABLE,
    ErrorCategory.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    ErrorCategory.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    ErrorCategory.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    ErrorCategory.INTERNAL: code_pb2.INTERNAL,
}


def turn_to_proto(turn: Turn, new: Callable[..., Any] = turnid_pb2.Turn) -> turnid_pb2.Turn:
    """The proto of a turn; `new` may be a repeated field's `add`, which builds it in place."""
    message: turnid_pb2.Turn = fill_turn(new(), turn)
    return message


def fill_turn(message: Any, turn: Turn) -> Any:
    """Set a Turn message's fields from `turn` (in place: a response's `turn`, or a repeated
    field's `add()`); field by field is about twice as fast as keywords with a dict for the
    Timestamp, and a response built around its own Turn would copy it."""
    message.thread_id = turn.thread_id
    message.turn_id = turn.turn_id
    message.kind = turn.kind
    message.sequence = turn.sequence
    seconds, micros = divmod(turn.create_time_us, 1_000_000)
    stamp = message.create_time
    stamp.seconds = seconds
    stamp.nanos = micros * 1000
    message.request_id = turn.request_id
    message.claimed = turn.claimed
    return message


def _timestamp(micros: int) -> dict[str, int]:
    seconds, rest = divmod(micros, 1_000_000)
    return {"seconds": seconds, "nanos": rest * 1000}


def thread_to_proto(info: ThreadInfo) -> turnid_pb2.Thread:
    return turnid_pb2.Thread(
        thread_id=info.thread_id,
        last_sequence=info.state.last_sequence,
        next_compaction_index=info.state.next_compaction,
        last_turn=turn_to_proto(info.last_turn),
        create_time=_timestamp(info.state.create_time_us),
        update_time=_timestamp(info.state.update_time_us),
    )


def add_turns(field: Any, turns: Iterable[Turn]) -> None:
    """Append turns to a repeated Turn field, each built in place.

    A turn that differs from the one before only in turn_id and sequence (the turns of one
    allocation: a batch's thousand) copies the message before it, one call into upb, and sets
    those two; filling it is eight. 1,000 turns: ~380 against ~800 µs here, and a list of
    unrelated turns pays ~5% for the comparison. An allocation's TurnRun needs no comparison:
    every turn after its first is a copy (and no Turn is made for them).
    """
    add = field.add
    if isinstance(turns, TurnRun):  # an allocation's answer: one Turn made, for the first
        ids = turns.turn_ids
        if ids:
            first = fill_turn(add(), turns[0])
            sequence = turns.first_sequence
            for turn_id in ids[1:]:
                sequence += 1
                message = add()
                message.CopyFrom(first)
                message.turn_id = turn_id
                message.sequence = sequence
        return
    last: Turn | None = None
    previous: Any = None
    for turn in turns:
        message = add()
        if (
            last is not None
            and turn.request_id == last.request_id
            and turn.thread_id == last.thread_id
            and turn.create_time_us == last.create_time_us
            and turn.kind == last.kind
            and turn.claimed == last.claimed
        ):
            message.CopyFrom(previous)
            message.turn_id = turn.turn_id
            message.sequence = turn.sequence
        else:
            fill_turn(message, turn)
        last, previous = turn, message


def error_to_status(error: TurnIdError) -> status_pb2.Status:
    """AIP-193: exactly one ErrorInfo, plus BadRequest when fields are at fault."""
    details = [
        error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=dict(error.metadata)
        )
    ]
    if error.field_violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=violation.field,
                        description=violation.description,
                        reason=error.reason,
                    )
                    for violation in error.field_violations
                ]
            )
        )
    packed = []
    for detail in details:
        wrapper = any_pb2.Any()
        wrapper.Pack(detail)
        packed.append(wrapper)
    return status_pb2.Status(code=_CODES[error.category], message=error.message, details=packed)


async def abort(context: grpc.aio.ServicerContext, error: TurnIdError) -> NoReturn:  # type: ignore[type-arg]
    """End the call with the error's status (raises grpc's AbortError)."""
    await context.abort_with_status(rpc_status.to_status(error_to_status(error)))  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")  # pragma: no cover


# --- what every call shares ---------------------------------------------------------------------


@dataclass(slots=True)
class CallRecord:
    """How one call ended, for the observers (access log, metrics)."""

    method: str
    code: str  # grpc status code name, "OK" on success
    reason: str  # ErrorInfo reason, "" on success
    request_id: str
    namespace: str
    duration_s: float
    correlation_id: str
    # The call's ServicerContext: `peer` reads it only when asked, and only while the observer
    # runs (the call is still alive then; gRPC may crash on a context read after the call).
    context: Any
    kind: int = 0  # the request's TurnKind number (0 for reads)
    count: int = 1  # turns asked for (BatchAllocateTurnIds' count, else 1)
    replayed: bool = False  # a write answered from its request_id's record: nothing written

    @property
    def peer(self) -> str:
        try:
            return str(self.context.peer())
        except Exception:  # the call is over; some transports forget the peer
            return ""


class CallObserver(Protocol):
    def __call__(self, record: CallRecord) -> None: ...


class CallGate:
    """Counts calls in flight and closes the door at shutdown.

    After `begin_shutdown()`, new calls are refused UNAVAILABLE/SHUTTING_DOWN before any work
    and open WatchTurns streams end the same way, so clients resume elsewhere; `wait_idle()`
    waits for the calls already running to finish, before the gRPC server is stopped (which
    would CANCEL them).
    """

    def __init__(self) -> None:
        self.closing = False
        self.inflight = 0
        self.watchers = 0
        self._idle = asyncio.Event()
        self._closed = asyncio.Event()

    def begin_shutdown(self) -> None:
        self.closing = True
        self._closed.set()
        if self.inflight == 0:
            self._idle.set()

    def enter(self) -> None:
        self.inflight += 1

    def exit(self) -> None:
        self.inflight -= 1
        if self.closing and self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109 (a bound, not a cancel)
        """True once no call of ours is running (after begin_shutdown), False on timeout."""
        if self.inflight == 0:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def wait_closed(self) -> None:
        await self._closed.wait()


Behavior = Callable[[Any, str], Awaitable[Any]]
ContextBehavior = Callable[[Any, str, Any], Awaitable[Any]]  # also given the call's context
StreamBehavior = Callable[[Any, str], AsyncIterator[Any]]


def _malformed(method: str, error: DecodeError) -> TurnIdError:
    return TurnIdError(
        ErrorCategory.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
        f"the request is not a valid {method} message: {error}",
        {"method": method},
    )


def _unexpected(method: str, error: BaseException) -> TurnIdError:
    correlation_id = uuid.uuid4().hex
    log.error(
        "unexpected error in %s (correlation id %s)",
        method,
        correlation_id,
        exc_info=error,
        extra={"correlation_id": correlation_id, "method": method},
    )
    return internal_error(correlation_id)


def _admit(gate: CallGate, method: str, parse: Callable[[bytes], Any], raw: bytes) -> Any:
    """What every call does first: refused while shutting down, then its request parsed."""
    if gate.closing:
        raise shutting_down()
    try:
        return parse(raw)
    except DecodeError as error:
        raise _malformed(method, error) from error


def _mapped(method: str, error: Exception) -> TurnIdError:
    """The error a call ends with: a TurnIdError as it is, anything else INTERNAL_ERROR."""
    return error if isinstance(error, TurnIdError) else _unexpected(method, error)


class _Call:
    """The bookkeeping of one call: gate, outcome and observers."""

    __slots__ = (
        "code",
        "correlation_id",
        "count",
        "kind",
        "reason",
        "replayed",
        "request_id",
        "started",
    )

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.code = "OK"
        self.reason = ""
        self.request_id = ""
        self.correlation_id = ""
        self.kind = 0
        self.count = 1
        self.replayed = False

    def failed(self, error: TurnIdError) -> None:
        self.code = error.category.value
        self.reason = error.reason
        self.correlation_id = error.metadata.get("correlation_id", "") if error.metadata else ""


class TurnIdServicer:
    """turnid.v1.TurnIdService on a TurnService. `gate` and `observers` are the server's."""

    def __init__(self, turns: TurnService, observers: Sequence[CallObserver] = ()) -> None:
        self._turns = turns
        self.gate = CallGate()
        self.observers = list(observers)

    # --- the RPCs: proto -> domain -> proto ---------------------------------------------------

    async def _write(self, which: str, request: Any, namespace: str) -> Sequence[Turn]:
        """The domain call of a unary write RPC (`which`: its AllocateMany item field name;
        AllocateMany's items go to TurnService.allocate_many together). A replay is told to
        the call's wrapper (`_replayed`), for the observers."""
        turns = await self._turns.write(
            self._turns.allocation(_write_request(which, request, namespace))
        )
        if isinstance(turns, Replayed):
            _replayed.set(True)
        return turns

    async def AllocateTurnId(self, request: Any, namespace: str) -> Any:
        turn = (await self._write("allocate", request, namespace))[0]  # its only one
        response = turnid_pb2.AllocateTurnIdResponse()
        fill_turn(response.turn, turn)
        return response

    async def BatchAllocateTurnIds(self, request: Any, namespace: str) -> Any:
        turns = await self._write("batch_allocate", request, namespace)
        response = turnid_pb2.BatchAllocateTurnIdsResponse()
        add_turns(response.turns, turns)
        return response

    async def ClaimTurnId(self, request: Any, namespace: str) -> Any:
        turn = (await self._write("claim", request, namespace))[0]
        response = turnid_pb2.ClaimTurnIdResponse()
        fill_turn(response.turn, turn)
        return response

    async def GetTurn(self, request: Any, namespace: str) -> Any:
        turn = await self._turns.get(request.thread_id, request.turn_id, namespace=namespace)
        response = turnid_pb2.GetTurnResponse()
        fill_turn(response.turn, turn)
        return response

    async def ListTurns(self, request: Any, namespace: str) -> Any:
        page = await self._turns.list(
            request.thread_id, request.page_size, request.page_token, namespace=namespace
        )
        response = turnid_pb2.ListTurnsResponse(next_page_token=page.next_page_token)
        add_turns(response.turns, page.turns)
        return response

    async def GetThread(self, request: Any, namespace: str) -> Any:
        info = await self._turns.get_thread(request.thread_id, namespace=namespace)
        return turnid_pb2.GetThreadResponse(thread=thread_to_proto(info))

    async def WatchTurns(self, request: Any, namespace: str) -> AsyncIterator[Any]:
        updates = await self._turns.watch(
            request.thread_id, request.after_sequence, namespace=namespace
        )
        closed = asyncio.ensure_future(self.gate.wait_closed())
        following: asyncio.Future[WatchUpdate] | None = None
        try:
            while True:
                following = asyncio.ensure_future(anext(updates))
                await asyncio.wait((following, closed), return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    raise shutting_down()
                update = following.result()
                following = None
                response = turnid_pb2.WatchTurnsResponse(caught_up=update.caught_up)
                add_turns(response.turns, update.turns)
                # Waits for gRPC flow control: a slow reader holds one message, no more.
                yield response
        finally:
            closed.cancel()
            if following is not None and not following.done():
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await following
            await updates.aclose()

    async def AllocateMany(self, request: Any, namespace: str, context: Any = None) -> Any:
        """Many independent allocations in one call: the items go to the TurnService together
        (so the store takes them as one group commit, with no task per item), each answered
        with its turns or its own status; the observers hear of each item as of its unary
        call."""
        items = request.items
        _check_many(items)
        calls: list[tuple[_Call, str]] = []
        outcomes: list[Sequence[Turn] | Exception] = []
        allocations: list[Allocation] = []
        waiting: list[int] = []  # the items whose allocation went to the store
        for index, item in enumerate(items):
            call = _Call()
            which = item.WhichOneof("request")
            method = _MANY_METHODS.get(which or "", "AllocateMany")
            calls.append((call, method))
            try:
                if which is None:
                    raise invalid_field(
                        "INVALID_ITEM", "items", "an AllocateMany item must hold one request"
                    )
                sub = getattr(item, which)
                call.request_id = sub.request_id
                call.kind = sub.kind
                if which == "batch_allocate":
                    call.count = sub.count
                allocations.append(self._turns.allocation(_write_request(which, sub, namespace)))
            except TurnIdError as refused:  # bad input: known before anything is stored
                call.failed(refused)
                outcomes.append(refused)
                continue
            waiting.append(index)
            outcomes.append([])  # the store's answer goes here
        try:
            if allocations:
                try:
                    answers = await self._turns.allocate_many(allocations)
                except Exception as failed:  # the whole step failed: so did each of its items
                    answers = [failed] * len(allocations)
                for index, answer in zip(waiting, answers, strict=True):
                    outcomes[index] = answer
                waiting = []
            response = turnid_pb2.AllocateManyResponse()
            for (call, method), outcome in zip(calls, outcomes, strict=True):
                result = response.results.add()
                if not isinstance(outcome, Exception):
                    add_turns(result.turns, outcome)
                    call.replayed = isinstance(outcome, Replayed)
                    continue
                error = (
                    outcome if isinstance(outcome, TurnIdError) else _unexpected(method, outcome)
                )
                call.failed(error)
                status = error_to_status(error)
                result.status.code = status.code
                result.status.message = status.message
                result.status.details.extend(status.details)
            return response
        except asyncio.CancelledError:
            for index in waiting:  # those refused already keep their outcome
                calls[index][0].code = "CANCELLED"
            raise
        finally:
            if self.observers:
                for call, method in calls:  # each item's peer is the call's
                    self._notify(call, method, namespace, context)

    def _notify(self, call: _Call, method: str, namespace: str, context: Any) -> None:
        """Tell the observers how a call (or an AllocateMany item) ended."""
        record = CallRecord(
            method,
            call.code,
            call.reason,
            call.request_id,
            namespace,
            time.perf_counter() - call.started,
            call.correlation_id,
            context,
            call.kind,
            call.count,
            call.replayed,
        )
        for observer in self.observers:
            try:
                observer(record)
            except Exception:  # an observer must never fail the call
                log.exception("call observer failed")

    # --- the wrapper every RPC runs in --------------------------------------------------------

    def _finish(self, call: _Call, method: str, namespace: str, context: Any) -> None:
        self.gate.exit()
        if self.observers:
            self._notify(call, method, namespace, context)

    def unary(
        self, method: str, behavior: Behavior, parse: Callable[[bytes], Any]
    ) -> Callable[[bytes, Any], Awaitable[Any]]:
        gate = self.gate
        # Which of the fields the observers see the request has (getattr with a default costs
        # an AttributeError, ~1 µs, on a message without the field).
        fields = _request_fields(parse)
        has_request_id = fields is None or "request_id" in fields
        has_kind = fields is None or "kind" in fields
        has_count = fields is None or "count" in fields
        # AllocateMany reports each item to the observers, with the call's peer.
        with_context: ContextBehavior | None = None
        if "context" in inspect.signature(behavior).parameters:
            with_context = cast(ContextBehavior, behavior)

        async def handle(raw: bytes, context: Any) -> Any:
            call = _Call()
            gate.enter()
            namespace = current_namespace.get()
            try:
                request = _admit(gate, method, parse, raw)
                if has_request_id:
                    call.request_id = getattr(request, "request_id", "")
                if has_kind:
                    call.kind = getattr(request, "kind", 0)
                if has_count:
                    call.count = getattr(request, "count", 1)
                if with_context is not None:
                    return await with_context(request, namespace, context)
                _replayed.set(False)  # each call's task has its own context; tests share one
                response = await behavior(request, namespace)
                call.replayed = _replayed.get()
                return response
            except (grpc.aio.AbortError, asyncio.CancelledError):
                call.code = "CANCELLED"
                raise
            except Exception as error:
                mapped = _mapped(method, error)
                call.failed(mapped)
                await abort(context, mapped)
            finally:
                self._finish(call, method, namespace, context)

        return handle

    def server_stream(
        self, method: str, behavior: StreamBehavior, parse: Callable[[bytes], Any]
    ) -> Callable[[bytes, Any], AsyncIterator[Any]]:
        gate = self.gate

        async def handle(raw: bytes, context: Any) -> AsyncIterator[Any]:
            call = _Call()
            gate.enter()
            gate.watchers += 1
            namespace = current_namespace.get()
            try:
                request = _admit(gate, method, parse, raw)
                async for response in behavior(request, namespace):
                    yield response
            except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
                call.code = "CANCELLED"
                raise
            except Exception as error:
                mapped = _mapped(method, error)
                call.failed(mapped)
                await abort(context, mapped)
            finally:
                gate.watchers -= 1
                self._finish(call, method, namespace, context)

        return handle


#: AllocateMany's limits (documented in the proto): items per call, and turns asked for.
MAX_MANY_ITEMS = 1000
MAX_MANY_TURNS = 10_000
_MANY_METHODS = {
    "allocate": "AllocateTurnId",
    "batch_allocate": "BatchAllocateTurnIds",
    "claim": "ClaimTurnId",
}


def _check_many(items: Any) -> None:
    """TOO_MANY_ITEMS beyond the limits; an invalid count asks for nothing (its item fails)."""
    turns = 0
    for item in items:
        if item.HasField("batch_allocate"):
            count = item.batch_allocate.count
            turns += count if 0 < count <= validation.MAX_BATCH else 0
        else:
            turns += 1
    if len(items) > MAX_MANY_ITEMS or turns > MAX_MANY_TURNS:
        message = (
            f"an AllocateMany call holds at most {MAX_MANY_ITEMS} items and "
            f"{MAX_MANY_TURNS} turns; this one holds {len(items)} items, {turns} turns"
        )
        raise invalid_field(
            "TOO_MANY_ITEMS",
            "items",
            message,
            items=str(len(items)),
            turns=str(turns),
            max_items=str(MAX_MANY_ITEMS),
            max_turns=str(MAX_MANY_TURNS),
        )


def _request_fields(parse: Callable[[bytes], Any]) -> frozenset[str] | None:
    """The field names of the message that `parse` (a message class's FromString) makes, or
    None when that cannot be told."""
    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    fields = getattr(descriptor, "fields_by_name", None)
    return None if fields is None else frozenset(fields)


def _write_request(which: str, request: Any, namespace: str) -> WriteRequest:
    """The domain's WriteRequest for an AllocateMany item (`which`: its oneof field)."""
    return WriteRequest(
        request.thread_id,
        request.kind,
        request.count if which == "batch_allocate" else 1,
        request.request_id,
        namespace,
        _expected(request),
        request.turn_id if which == "claim" else None,
    )


def _expected(request: Any) -> int | None:
    return request.expected_last_sequence if request.HasField("expected_last_sequence") else None


SERVICE = turnid_pb2.DESCRIPTOR.services_by_name["TurnIdService"]


def add_to_server(servicer: TurnIdServicer, server: grpc.aio.Server) -> None:
    """Register the servicer like the generated add_TurnIdServiceServicer_to_server, except that
    requests are parsed (and errors mapped) in the servicer's wrapper: a message that does not
    decode (bytes that are not protobuf, invalid UTF-8 in a string field) is then
    INVALID_ARGUMENT / MALFORMED_REQUEST with an ErrorInfo, where gRPC's own deserializer
    would answer a bare UNKNOWN."""
    handlers = {}
    for method in SERVICE.methods:
        parse = getattr(turnid_pb2, method.input_type.name).FromString
        serialize = getattr(turnid_pb2, method.output_type.name).SerializeToString
        behavior = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                servicer.server_stream(method.name, behavior, parse),
                response_serializer=serialize,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                servicer.unary(method.name, behavior, parse),
                response_serializer=serialize,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)  # type: ignore[attr-defined]
