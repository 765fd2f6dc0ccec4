"""The client's unary methods, written once for `TurnIdClient` and `AsyncTurnIdClient`.

Each function here is one public method: it takes the method's arguments and returns a
`CallPlan` (the RPC, its request, the request_id every attempt carries, how to decode the
response). `sync.blocking` and `aio.awaitable` turn a function into a method of their client,
which runs the plan through its retry loop (blocking, or awaitable) and returns the decoded
result. The signature and docstring seen on the clients are the ones written here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health_pb2

from turnid.client._core import CallPlan, new_request_id, thread_from_proto, turn_from_proto
from turnid.client._turn import Thread, Turn, TurnKind
from turnid.v1 import turnid_pb2

#: The list of one page: its turns and the token of the next page ("" after the last).
Page = tuple[list[Turn], str]


def _kind_number(kind: TurnKind | int) -> Any:
    # An int, not a name: an unknown number reaches the service, which refuses it (INVALID_KIND).
    return int(kind)


def _condition(request: Any, expected_last_sequence: int | None) -> Any:
    # proto3 `optional`: unset unless given, so 0 ("the thread has no turns") stays meaningful.
    if expected_last_sequence is not None:
        request.expected_last_sequence = expected_last_sequence
    return request


def _one_turn(response: Any) -> Turn:
    return turn_from_proto(response.turn)


def _turns(response: Any) -> list[Turn]:
    return [turn_from_proto(turn) for turn in response.turns]


# An AllocateMany result's repeated Turn (see _coalesce).
def _first_turn(turns: Any) -> Turn:
    return turn_from_proto(turns[0])


def _turn_list(turns: Any) -> list[Turn]:
    return [turn_from_proto(turn) for turn in turns]


def present_as_method(method: Any, plan: Callable[..., Any]) -> None:
    """Make help() and inspect show `method` as `(self, <plan's parameters>) -> <its result>`."""
    signature = inspect.signature(plan)
    result = str(signature.return_annotation).removeprefix("CallPlan[").removesuffix("]")
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    method.__signature__ = signature.replace(
        parameters=[self_parameter, *signature.parameters.values()], return_annotation=result
    )


# -- writes ----------------------------------------------------------------------------------


def allocate(
    thread_id: str,
    kind: TurnKind,
    *,
    request_id: str | None = None,
    expected_last_sequence: int | None = None,
    timeout: float | None = None,
) -> CallPlan[Turn]:
    """Mint one new turn of `kind` in the thread.

    `request_id` is the idempotency key every attempt carries (default: a new UUIDv7 made once
    for this call); a failed call's error carries it as `.request_id`, so passing it back
    repeats the same step. With `expected_last_sequence`, the turn is written only if the
    thread's last sequence is still that (0: no turns yet); otherwise `FailedPrecondition`
    (THREAD_ADVANCED) with `.last_sequence`. `timeout`: seconds for the call, retries included.
    """
    request_id = request_id or new_request_id()
    request = _condition(
        turnid_pb2.AllocateTurnIdRequest(
            thread_id=thread_id,
            kind=_kind_number(kind),
            request_id=request_id,
        ),
        expected_last_sequence,
    )
    return CallPlan(
        "AllocateTurnId",
        request,
        _one_turn,
        request_id,
        timeout,
        item="allocate",
        decode_turns=_first_turn,
    )


def realtime_delegation(
    thread_id: str,
    *,
    request_id: str | None = None,
    expected_last_sequence: int | None = None,
    timeout: float | None = None,
) -> CallPlan[Turn]:
    """A REALTIME_DELEGATION turn (a UUIDv7 id). Arguments as in `allocate`."""
    return allocate(
        thread_id,
        TurnKind.REALTIME_DELEGATION,
        request_id=request_id,
        expected_last_sequence=expected_last_sequence,
        timeout=timeout,
    )


def auto_compaction(
    thread_id: str,
    *,
    request_id: str | None = None,
    expected_last_sequence: int | None = None,
    timeout: float | None = None,
) -> CallPlan[Turn]:
    """An AUTO_COMPACTION turn (`auto-compact-N`, N counted by the thread). As `allocate`."""
    return allocate(
        thread_id,
        TurnKind.AUTO_COMPACTION,
        request_id=request_id,
        expected_last_sequence=expected_last_sequence,
        timeout=timeout,
    )


def user_input(
    thread_id: str,
    *,
    request_id: str | None = None,
    expected_last_sequence: int | None = None,
    timeout: float | None = None,
) -> CallPlan[Turn]:
    """A USER_INPUT turn (a UUIDv7 id). Arguments as in `allocate`."""
    return allocate(
        thread_id,
        TurnKind.USER_INPUT,
        request_id=request_id,
        expected_last_sequence=expected_last_sequence,
        timeout=timeout,
    )


def allocate_batch(
    thread_id: str,
    kind: TurnKind,
    count: int,
    *,
    request_id: str | None = None,
    expected_last_sequence: int | None = None,
    timeout: float | None = None,
) -> CallPlan[list[Turn]]:
    """`count` (1..1000) turns of one kind with consecutive sequences, all or nothing.

    `request_id`, `expected_last_sequence` and `timeout` as in `allocate` (one key and one
    condition for the whole batch).
    """
    request_id = request_id or new_request_id()
    request = _condition(
        turnid_pb2.BatchAllocateTurnIdsRequest(
            thread_id=thread_id,
            kind=_kind_number(kind),
            count=count,
            request_id=request_id,
        ),
        expected_last_sequence,
    )
    return CallPlan(
        "BatchAllocateTurnIds",
        request,
        _turns,
        request_id,
        timeout,
        item="batch_allocate",
        decode_turns=_turn_list,
    )


def claim(
    thread_id: str,
    turn_id: str,
    kind: TurnKind,
    *,
    request_id: str | None = None,
    expected_last_sequence: int | None = None,
    timeout: float | None = None,
) -> CallPlan[Turn]:
    """Register an id minted elsewhere; `Conflict` (TURN_ID_TAKEN) if the thread has it.

    `request_id`, `expected_last_sequence` and `timeout` as in `allocate`.
    """
    request_id = request_id or new_request_id()
    request = _condition(
        turnid_pb2.ClaimTurnIdRequest(
            thread_id=thread_id,
            turn_id=turn_id,
            kind=_kind_number(kind),
            request_id=request_id,
        ),
        expected_last_sequence,
    )
    return CallPlan(
        "ClaimTurnId",
        request,
        _one_turn,
        request_id,
        timeout,
        item="claim",
        decode_turns=_first_turn,
    )


# -- reads -----------------------------------------------------------------------------------


def get(thread_id: str, turn_id: str, *, timeout: float | None = None) -> CallPlan[Turn]:
    """One turn; `NotFound` (TURN_NOT_FOUND) if the thread has no such turn."""
    request = turnid_pb2.GetTurnRequest(thread_id=thread_id, turn_id=turn_id)
    return CallPlan("GetTurn", request, _one_turn, timeout=timeout)


def _thread(response: Any) -> Thread:
    return thread_from_proto(response.thread)


def get_thread(thread_id: str, *, timeout: float | None = None) -> CallPlan[Thread]:
    """Where the thread stands: last sequence, next compaction index, last turn, times.

    `NotFound` (THREAD_NOT_FOUND) for a thread with no turns. Use `last_sequence` as the
    `expected_last_sequence` of a conditional write ("only if nobody wrote since I looked").
    """
    request = turnid_pb2.GetThreadRequest(thread_id=thread_id)
    return CallPlan("GetThread", request, _thread, timeout=timeout)


def _page(response: Any) -> Page:
    return [turn_from_proto(turn) for turn in response.turns], response.next_page_token


def list_page(
    thread_id: str, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
) -> CallPlan[Page]:
    """One page of the thread's turns, in sequence order, and the next page's token."""
    request = turnid_pb2.ListTurnsRequest(
        thread_id=thread_id, page_size=page_size, page_token=page_token
    )
    return CallPlan("ListTurns", request, _page, timeout=timeout)


def _health_status(response: Any) -> str:
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return name


def check_health(service: str = "", *, timeout: float | None = None) -> CallPlan[str]:
    """The server's `grpc.health.v1` status for `service` ("": the whole server).

    "SERVING", "NOT_SERVING" (e.g. while draining) or "UNKNOWN"; `NotFound` for a service
    the server does not know (it knows "" and "turnid.v1.TurnIdService").
    """
    request = health_pb2.HealthCheckRequest(service=service)
    return CallPlan("Check", request, _health_status, timeout=timeout, stub="health")
