"""Failed calls arrive as typed errors carrying the status code, ErrorInfo reason and metadata."""

from __future__ import annotations

import grpc
import pytest

from turnid.client import (
    NO_RETRY,
    AsyncTurnIdClient,
    Conflict,
    InvalidArgument,
    NotFound,
    RetryEvent,
    TurnIdClient,
    TurnIdError,
    TurnKind,
    Unavailable,
)
from turnid.testing import TurnIdTestServer


def test_invalid_thread_id(turnid_client: TurnIdClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        turnid_client.user_input("has space")
    error = caught.value
    assert isinstance(error, TurnIdError)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_THREAD_ID"
    assert error.domain == "turnid"
    assert error.metadata["thread_id"] == "has space"
    assert [v.field for v in error.field_violations] == ["thread_id"]
    assert str(error).startswith("INVALID_THREAD_ID: ")


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda c, t: c.allocate(t, TurnKind.UNSPECIFIED), "INVALID_KIND"),
        (lambda c, t: c.allocate(t, 99), "INVALID_KIND"),
        (lambda c, t: c.allocate_batch(t, TurnKind.USER_INPUT, 0), "INVALID_COUNT"),
        (lambda c, t: c.allocate_batch(t, TurnKind.USER_INPUT, 1001), "INVALID_COUNT"),
        (lambda c, t: c.user_input(t, request_id="x" * 129), "INVALID_REQUEST_ID"),
        (lambda c, t: c.claim(t, "auto-compact-9", TurnKind.USER_INPUT), "RESERVED_TURN_ID"),
        (lambda c, t: c.claim(t, "id", TurnKind.AUTO_COMPACTION), "INVALID_KIND"),
        (lambda c, t: c.claim(t, "bad id", TurnKind.USER_INPUT), "INVALID_TURN_ID"),
        (lambda c, t: list(c.list_turns(t, page_size=-1)), "INVALID_PAGE_SIZE"),
    ],
)
def test_invalid_arguments(turnid_client: TurnIdClient, thread_id: str, call, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as caught:
        call(turnid_client, thread_id)
    assert caught.value.reason == reason
    assert list(turnid_client.list_turns(thread_id)) == [], "a refused request writes nothing"


def test_turn_id_taken(turnid_client: TurnIdClient, thread_id: str) -> None:
    turnid_client.claim(thread_id, "rollout-1", TurnKind.USER_INPUT)
    with pytest.raises(Conflict) as caught:
        turnid_client.claim(thread_id, "rollout-1", TurnKind.USER_INPUT)
    assert caught.value.code is grpc.StatusCode.ALREADY_EXISTS
    assert caught.value.reason == "TURN_ID_TAKEN"
    assert caught.value.metadata["turn_id"] == "rollout-1"


def test_request_id_reused(turnid_client: TurnIdClient, thread_id: str) -> None:
    turnid_client.user_input(thread_id, request_id="step-9")
    with pytest.raises(Conflict) as caught:
        turnid_client.auto_compaction(thread_id, request_id="step-9")
    assert caught.value.reason == "REQUEST_ID_REUSED"
    assert caught.value.metadata["request_id"] == "step-9"


def test_not_found(turnid_client: TurnIdClient, thread_id: str) -> None:
    with pytest.raises(NotFound) as caught:
        turnid_client.get(thread_id, "nope")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "TURN_NOT_FOUND"
    assert dict(caught.value.metadata) == {"thread_id": thread_id, "turn_id": "nope"}


async def test_async_errors(turnid_async_client: AsyncTurnIdClient, thread_id: str) -> None:
    with pytest.raises(NotFound) as not_found:
        await turnid_async_client.get(thread_id, "nope")
    assert not_found.value.reason == "TURN_NOT_FOUND"
    with pytest.raises(InvalidArgument) as invalid:
        await turnid_async_client.allocate(thread_id, TurnKind.UNSPECIFIED)
    assert invalid.value.reason == "INVALID_KIND"
    with pytest.raises(InvalidArgument) as bad_token:
        async for _ in turnid_async_client.list_turns(thread_id, page_size=-5):
            pass
    assert bad_token.value.reason == "INVALID_PAGE_SIZE"
    await turnid_async_client.claim(thread_id, "r-1", TurnKind.USER_INPUT)
    with pytest.raises(Conflict) as taken:
        await turnid_async_client.claim(thread_id, "r-1", TurnKind.USER_INPUT)
    assert taken.value.reason == "TURN_ID_TAKEN"


def test_unavailable_without_retries(turnid_server: TurnIdTestServer, thread_id: str) -> None:
    turnid_server.stop()
    retries: list[RetryEvent] = []
    client = TurnIdClient(turnid_server.target, retry=NO_RETRY, on_retry=retries.append)
    with client, pytest.raises(Unavailable) as caught:
        client.user_input(thread_id)
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == ""  # a transport failure carries no ErrorInfo
    assert retries == []


def test_unavailable_after_the_deadline(turnid_server: TurnIdTestServer, thread_id: str) -> None:
    turnid_server.stop()
    retries: list[RetryEvent] = []
    client = TurnIdClient(turnid_server.target, on_retry=retries.append)
    with client, pytest.raises(Unavailable):
        client.user_input(thread_id, timeout=0.3)
    assert retries, "UNAVAILABLE is retried within the deadline"
    assert len({event.request_id for event in retries}) == 1
    assert [event.attempt for event in retries] == list(range(1, len(retries) + 1))


async def test_async_unavailable_after_the_deadline(
    turnid_server: TurnIdTestServer, thread_id: str
) -> None:
    turnid_server.stop()
    retries: list[RetryEvent] = []
    async with AsyncTurnIdClient(turnid_server.target, on_retry=retries.append) as client:
        with pytest.raises(Unavailable):
            await client.auto_compaction(thread_id, timeout=0.3)
    assert retries
    assert len({event.request_id for event in retries}) == 1


def test_every_status_the_service_documents_has_a_typed_error() -> None:
    from turnid.client import (
        Cancelled,
        DeadlineExceeded,
        FailedPrecondition,
        Internal,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        Unauthenticated,
    )
    from turnid.client.errors import error_class

    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
        grpc.StatusCode.ALREADY_EXISTS: Conflict,
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
        grpc.StatusCode.UNAVAILABLE: Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
        grpc.StatusCode.CANCELLED: Cancelled,
        grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
        grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
        grpc.StatusCode.INTERNAL: Internal,
        grpc.StatusCode.UNKNOWN: TurnIdError,
    }
    for code, cls in expected.items():
        assert error_class(code) is cls
        assert issubclass(cls, TurnIdError)
    precondition = FailedPrecondition(
        grpc.StatusCode.FAILED_PRECONDITION, "moved on", metadata={"last_sequence": "7"}
    )
    assert precondition.last_sequence == 7
    assert FailedPrecondition(grpc.StatusCode.FAILED_PRECONDITION, "x").last_sequence == -1
    internal = Internal(grpc.StatusCode.INTERNAL, "x", metadata={"correlation_id": "c-1"})
    assert internal.correlation_id == "c-1"
    assert "request_id='r-1'" in repr(TurnIdError(grpc.StatusCode.UNKNOWN, "x", request_id="r-1"))
