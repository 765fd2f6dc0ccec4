"""The gRPC transport: protos in, domain calls, protos out; TurnIdError -> google.rpc.Status.

Nothing here decides anything: validation and rules live in the domain.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from turnid.service.domain import ErrorCategory, Turn, TurnIdError, TurnService
from turnid.v1 import turnid_pb2, turnid_pb2_grpc

ERROR_DOMAIN = "turnid"

_CODES = {
    ErrorCategory.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    ErrorCategory.NOT_FOUND: code_pb2.NOT_FOUND,
    ErrorCategory.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    ErrorCategory.UNAVAILABLE: code_pb2.UNAVAILABLE,
    ErrorCategory.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
}


def turn_to_proto(turn: Turn, new: Callable[..., Any] = turnid_pb2.Turn) -> turnid_pb2.Turn:
    """The proto of a turn; `new` may be a repeated field's `add`, which builds it in place."""
    seconds, micros = divmod(turn.create_time_us, 1_000_000)
    return new(  # type: ignore[no-any-return]
        thread_id=turn.thread_id,
        turn_id=turn.turn_id,
        kind=turn.kind,
        sequence=turn.sequence,
        create_time={"seconds": seconds, "nanos": micros * 1000},
        request_id=turn.request_id,
        claimed=turn.claimed,
    )


def add_turns(field: Any, turns: Iterable[Turn]) -> None:
    """Append turns to a repeated Turn field (in place: no copy per turn)."""
    for turn in turns:
        turn_to_proto(turn, field.add)


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


async def _abort(context: grpc.aio.ServicerContext, error: TurnIdError) -> NoReturn:  # type: ignore[type-arg]
    await context.abort_with_status(rpc_status.to_status(error_to_status(error)))  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")  # pragma: no cover


class TurnIdServicer(turnid_pb2_grpc.TurnIdServiceServicer):  # type: ignore[misc]
    def __init__(self, turns: TurnService) -> None:
        self._turns = turns

    async def AllocateTurnId(self, request, context):  # type: ignore[no-untyped-def]
        try:
            turn = await self._turns.allocate(request.thread_id, request.kind, request.request_id)
            return turnid_pb2.AllocateTurnIdResponse(turn=turn_to_proto(turn))
        except TurnIdError as error:
            await _abort(context, error)

    async def BatchAllocateTurnIds(self, request, context):  # type: ignore[no-untyped-def]
        try:
            turns = await self._turns.allocate_batch(
                request.thread_id, request.kind, request.count, request.request_id
            )
            response = turnid_pb2.BatchAllocateTurnIdsResponse()
            add_turns(response.turns, turns)
            return response
        except TurnIdError as error:
            await _abort(context, error)

    async def ClaimTurnId(self, request, context):  # type: ignore[no-untyped-def]
        try:
            turn = await self._turns.claim(
                request.thread_id, request.turn_id, request.kind, request.request_id
            )
            return turnid_pb2.ClaimTurnIdResponse(turn=turn_to_proto(turn))
        except TurnIdError as error:
            await _abort(context, error)

    async def GetTurn(self, request, context):  # type: ignore[no-untyped-def]
        try:
            turn = await self._turns.get(request.thread_id, request.turn_id)
            return turnid_pb2.GetTurnResponse(turn=turn_to_proto(turn))
        except TurnIdError as error:
            await _abort(context, error)

    async def ListTurns(self, request, context):  # type: ignore[no-untyped-def]
        try:
            page = await self._turns.list(request.thread_id, request.page_size, request.page_token)
            response = turnid_pb2.ListTurnsResponse(next_page_token=page.next_page_token)
            add_turns(response.turns, page.turns)
            return response
        except TurnIdError as error:
            await _abort(context, error)


SERVICE = turnid_pb2.DESCRIPTOR.services_by_name["TurnIdService"]


def _parsing(
    handler: Callable[[Any, Any], Awaitable[Any]], parse: Callable[[bytes], Any], method: str
) -> Callable[[bytes, Any], Awaitable[Any]]:
    async def handle(raw: bytes, context: Any) -> Any:
        try:
            request = parse(raw)
        except DecodeError as error:
            await _abort(
                context,
                TurnIdError(
                    ErrorCategory.INVALID_ARGUMENT,
                    "MALFORMED_REQUEST",
                    f"the request is not a valid {method} message: {error}",
                    {"method": method},
                ),
            )
        return await handler(request, context)

    return handle


def add_to_server(servicer: TurnIdServicer, server: grpc.aio.Server) -> None:
    """Register the servicer like the generated add_TurnIdServiceServicer_to_server, except that
    requests are parsed here: a message that does not decode (bytes that are not protobuf,
    invalid UTF-8 in a string field) is then INVALID_ARGUMENT / MALFORMED_REQUEST with an
    ErrorInfo, where gRPC's own deserializer would answer a bare UNKNOWN."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            _parsing(
                getattr(servicer, method.name),
                getattr(turnid_pb2, method.input_type.name).FromString,
                method.name,
            ),
            response_serializer=getattr(turnid_pb2, method.output_type.name).SerializeToString,
        )
        for method in SERVICE.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)  # type: ignore[attr-defined]
