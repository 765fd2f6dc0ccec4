"""What the sync and asyncio clients share: options, retry policy, requests, proto -> Turn."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import grpc
import uuid_utils

from turnid.client._turn import Turn, TurnKind
from turnid.client.errors import DeadlineExceeded, TurnIdError, Unavailable, error_from_rpc
from turnid.v1 import turnid_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
#: Seconds a logical call may take, retries included, when neither the call nor the client
#: says otherwise.
DEFAULT_TIMEOUT = 10.0
USER_AGENT = "turnid-python-client/0.1"

#: Channel options the client sets unless the caller's `channel_options` name them. gRPC's own
#: reconnect backoff grows to 120 s; ours stays short so that a reconnect inside a call's
#: deadline is possible at all.
DEFAULT_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.primary_user_agent": USER_AGENT,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2000,
}

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How UNAVAILABLE is retried: exponential backoff with jitter, inside the call's deadline.

    The n-th retry waits `min(max_backoff, initial_backoff * multiplier ** (n - 1))`, scaled by a
    random factor in `[1 - jitter, 1 + jitter]`. Retrying stops when the next attempt would
    start after the deadline, or after `max_attempts` attempts (None: no limit but the deadline).
    Only UNAVAILABLE is retried (AIP-194); every attempt of a call carries the same request_id.
    """

    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within 0..1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        factor = 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return base * factor

    def allows(self, attempts: int) -> bool:
        return self.max_attempts is None or attempts < self.max_attempts


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """Passed to `on_retry` each time a call is about to be retried."""

    method: str  # the RPC, e.g. "AllocateTurnId"
    attempt: int  # the attempt that failed, 1-based
    error: TurnIdError  # why it failed (an Unavailable)
    delay: float  # seconds until the next attempt
    request_id: str  # the request_id every attempt carries ("" for reads)


OnRetry = Callable[[RetryEvent], object]


class RetryLoop:
    """The retry decisions of one logical call, shared by the sync and asyncio clients.

    One deadline covers the whole call; only UNAVAILABLE is retried, with the policy's backoff,
    and only while the next attempt can still start before the deadline. The caller runs:
    `timeout=loop.next_attempt()` for each attempt and, when it fails, `loop.retry_after(error)`
    (which raises the typed error if the call is over) before sleeping `event.delay`.
    """

    def __init__(self, method: str, policy: RetryPolicy, timeout: float, request_id: str) -> None:
        self.method = method
        self.policy = policy
        self.request_id = request_id
        self.deadline = time.monotonic() + timeout
        self.attempt = 0
        self._last: tuple[TurnIdError, BaseException] | None = None

    def next_attempt(self) -> float:
        """Seconds the next attempt may take; raises when the deadline has passed."""
        self.attempt += 1
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            if self._last is not None:
                raise self._last[0] from self._last[1]
            raise DeadlineExceeded(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.method}: deadline exceeded"
            )
        return remaining

    def retry_after(self, rpc_error: grpc.RpcError) -> RetryEvent:
        """The retry to make after a failed attempt; raises its typed error if none."""
        error = error_from_rpc(rpc_error)
        if not isinstance(error, Unavailable) or not self.policy.allows(self.attempt):
            raise error from rpc_error
        delay = self.policy.delay(self.attempt)
        if time.monotonic() + delay >= self.deadline:
            raise error from rpc_error
        self._last = (error, rpc_error)
        return RetryEvent(self.method, self.attempt, error, delay, self.request_id)


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """Where and how to connect. TLS is used when `tls` is true or any certificate is given."""

    target: str = DEFAULT_TARGET
    timeout: float = DEFAULT_TIMEOUT
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    channel_options: ChannelOptions = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("give private_key and certificate_chain together")

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(
            value is not None
            for value in (self.root_certificates, self.private_key, self.certificate_chain)
        )

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def grpc_options(self) -> list[tuple[str, Any]]:
        merged = dict(DEFAULT_CHANNEL_OPTIONS)
        merged.update(dict(self.channel_options))
        return list(merged.items())

    def metadata(self) -> tuple[tuple[str, str], ...]:
        # A bearer token travels as call metadata, so it works on plaintext channels too (gRPC
        # refuses call credentials there); with TLS it is protected like any other header.
        if self.token:
            return (("authorization", f"Bearer {self.token}"),)
        return ()


def new_request_id() -> str:
    """A fresh request_id: a UUIDv7 in canonical text, made once per logical call."""
    return str(uuid_utils.uuid7())


def turn_from_proto(proto: Any) -> Turn:
    return Turn(
        thread_id=proto.thread_id,
        turn_id=proto.turn_id,
        kind=TurnKind(proto.kind),
        sequence=proto.sequence,
        create_time=proto.create_time.ToDatetime(tzinfo=UTC),
        request_id=proto.request_id,
        claimed=proto.claimed,
    )


def _kind_number(kind: TurnKind | int) -> Any:
    # An int, not a name: an unknown number reaches the service, which refuses it (INVALID_KIND).
    return int(kind)


def allocate_request(thread_id: str, kind: TurnKind, request_id: str) -> Any:
    return turnid_pb2.AllocateTurnIdRequest(
        thread_id=thread_id, kind=_kind_number(kind), request_id=request_id
    )


def batch_request(thread_id: str, kind: TurnKind, count: int, request_id: str) -> Any:
    return turnid_pb2.BatchAllocateTurnIdsRequest(
        thread_id=thread_id, kind=_kind_number(kind), count=count, request_id=request_id
    )


def claim_request(thread_id: str, turn_id: str, kind: TurnKind, request_id: str) -> Any:
    return turnid_pb2.ClaimTurnIdRequest(
        thread_id=thread_id, turn_id=turn_id, kind=_kind_number(kind), request_id=request_id
    )


def get_request(thread_id: str, turn_id: str) -> Any:
    return turnid_pb2.GetTurnRequest(thread_id=thread_id, turn_id=turn_id)


def list_request(thread_id: str, page_size: int, page_token: str) -> Any:
    return turnid_pb2.ListTurnsRequest(
        thread_id=thread_id, page_size=page_size, page_token=page_token
    )
