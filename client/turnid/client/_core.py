"""What the sync and asyncio clients share: options, retry policy, call plans, proto -> values."""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import grpc
import uuid_utils

from turnid.client._turn import Thread, Turn, TurnKind
from turnid.client.errors import Cancelled, DeadlineExceeded, TurnIdError, error_from_rpc

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
    """How transient failures are retried: exponential backoff with jitter, inside the deadline.

    The n-th retry waits `min(max_backoff, initial_backoff * multiplier ** (n - 1))`, scaled by a
    random factor in `[1 - jitter, 1 + jitter]`. Retrying stops when the next attempt would
    start after the deadline, or after `max_attempts` attempts (None: no limit but the deadline).
    Retried: UNAVAILABLE (AIP-194; also a draining server's SHUTTING_DOWN), RESOURCE_EXHAUSTED
    (OVERLOADED) and a CANCELLED that the server (not this client) caused. Every attempt of a
    call carries the same request_id, so a retried write never mints a second turn. A watch
    uses the same backoff to reconnect, with no deadline; `max_attempts` then counts failed
    reconnects in a row.
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

#: Status codes worth another attempt with the same request_id.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)

# What gRPC says when this side cancelled a call (cancel(), or the channel closed under it).
_LOCAL_CANCEL_DETAILS = frozenset({"Locally cancelled by application!", "Channel closed!"})


def cancelled_locally(rpc_error: grpc.RpcError) -> bool:
    """True when a CANCELLED status came from this process, not from the server."""
    code = getattr(rpc_error, "code", None)
    details = getattr(rpc_error, "details", None)
    if not callable(code) or code() is not grpc.StatusCode.CANCELLED:
        return False
    return callable(details) and details() in _LOCAL_CANCEL_DETAILS


def retryable(error: TurnIdError) -> bool:
    return error.code in RETRYABLE_CODES


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """Passed to `on_retry` each time a call is about to be retried (or a watch reconnects)."""

    method: str  # the RPC, e.g. "AllocateTurnId"
    attempt: int  # the attempt that failed, 1-based
    error: TurnIdError  # why it failed (Unavailable, ResourceExhausted or Cancelled)
    delay: float  # seconds until the next attempt
    request_id: str  # the request_id every attempt carries ("" for reads)


OnRetry = Callable[[RetryEvent], object]


class RetryLoop:
    """The retry decisions of one logical call, shared by the sync and asyncio clients.

    One deadline covers the whole call; UNAVAILABLE, RESOURCE_EXHAUSTED and a server's
    CANCELLED are retried with the policy's backoff, only while the next attempt can still
    start before the deadline. Every error it raises carries the call's request_id. The caller
    runs `timeout=loop.next_attempt()` for each attempt and, when it fails,
    `loop.retry_after(error, local=...)` (which raises the typed error if the call is over)
    before sleeping `event.delay`.
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
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{self.method}: deadline exceeded",
                request_id=self.request_id,
            )
        return remaining

    def retry_after(self, rpc_error: grpc.RpcError, *, local: bool = False) -> RetryEvent:
        """The retry to make after a failed attempt; raises its typed error if none.

        `local`: the caller knows that this side ended the attempt (the client was closed);
        such a failure is never retried.
        """
        error = error_from_rpc(rpc_error, self.request_id)
        local = local or cancelled_locally(rpc_error)
        if local or not retryable(error) or not self.policy.allows(self.attempt):
            raise error from rpc_error
        delay = self.policy.delay(self.attempt)
        if time.monotonic() + delay >= self.deadline:
            raise error from rpc_error
        self._last = (error, rpc_error)
        return RetryEvent(self.method, self.attempt, error, delay, self.request_id)

    def closed(self) -> Cancelled:
        """The error for a call whose client was closed while it waited to retry."""
        return Cancelled(
            grpc.StatusCode.CANCELLED,
            f"{self.method}: the client was closed",
            request_id=self.request_id,
        )


_T_co = TypeVar("_T_co", covariant=True)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 3x, once per call
class CallPlan(Generic[_T_co]):
    """One logical unary call, built once and run by either client's executor.

    `method` names the RPC on `stub` ("turnid": TurnIdService, "health": grpc.health.v1);
    every attempt sends `request` (and so `request_id`); `decode` turns the response into the
    method's result; `timeout` is the call's deadline in seconds (None: the client's).
    A write that may travel in an AllocateMany call names its `AllocateManyItem` field in
    `item` ("allocate", "batch_allocate", "claim"; "" for the rest) and decodes an item's
    repeated Turn with `decode_turns`.
    """

    method: str
    request: Any
    decode: Callable[[Any], _T_co]
    request_id: str = ""
    timeout: float | None = None
    stub: str = "turnid"
    item: str = ""
    decode_turns: Callable[[Any], _T_co] | None = None


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """Where and how to connect. TLS is used when `tls` is true or any certificate is given.

    A `token` goes out as `authorization: Bearer ...` call metadata. Over a plaintext channel
    that is refused (ValueError, before any connection) unless the target is loopback
    (127.0.0.0/8, ::1, localhost, a unix socket) or `insecure` is true.
    """

    target: str = DEFAULT_TARGET
    timeout: float = DEFAULT_TIMEOUT
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    channel_options: ChannelOptions = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("give private_key and certificate_chain together")
        if (
            self.token
            and not self.uses_tls
            and not self.insecure
            and not is_loopback_target(self.target)
        ):
            raise ValueError(
                f"refusing to send a bearer token in cleartext to {self.target!r}: connect with "
                "TLS (tls=True or certificates), use a loopback target, or pass insecure=True"
            )

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
        # refuses call credentials there); __post_init__ allows that only where it is safe.
        if self.token:
            return (("authorization", f"Bearer {self.token}"),)
        return ()


def _host_is_loopback(host: str) -> bool:
    host = host.strip().rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _host_of(address: str) -> str:
    """The host of `host:port`, `[v6]:port`, `host` or a bare IPv6 address."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    if address.count(":") > 1:  # a bare IPv6 address
        return address
    return address.rsplit(":", 1)[0] if ":" in address else address


def is_loopback_target(target: str) -> bool:
    """True when every address a gRPC target names is on this machine.

    Understands `host:port`, `[::1]:port`, `dns:[//authority/]host:port`, `ipv4:`/`ipv6:`
    address lists and `unix:`/`unix-abstract:` sockets; anything else counts as remote.
    """
    target = target.strip()
    lower = target.lower()
    if lower.startswith(("unix:", "unix-abstract:")):
        return True
    if lower.startswith("dns:"):
        rest = target[4:]
        if rest.startswith("//"):
            rest = rest[2:].partition("/")[2]
        addresses = [rest]
    elif lower.startswith(("ipv4:", "ipv6:")):
        addresses = target[5:].split(",")
    elif "://" in target or not target:
        return False
    else:
        addresses = [target]
    return all(_host_is_loopback(_host_of(address)) for address in addresses)


def new_request_id() -> str:
    """A fresh request_id: a UUIDv7 in canonical text, made once per logical call."""
    return str(uuid_utils.uuid7())


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The seconds of a valid google.protobuf.Timestamp (0001-01-01 .. 9999-12-31, as datetime).
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
_KINDS = {kind.value: kind for kind in TurnKind}


def timestamp_to_datetime(stamp: Any) -> datetime:
    """`stamp.ToDatetime(tzinfo=UTC)`, the same value (microseconds, rounded toward zero),
    without its checks and conversions for a valid stamp (a turn decodes one per turn)."""
    seconds, nanos = stamp.seconds, stamp.nanos
    if 0 <= nanos < 1_000_000_000 and _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)
    result: datetime = stamp.ToDatetime(tzinfo=UTC)  # raises ValueError, as it always did
    return result


def turn_from_proto(proto: Any) -> Turn:
    number = proto.kind
    kind = _KINDS.get(number)
    return Turn(
        proto.thread_id,
        proto.turn_id,
        TurnKind(number) if kind is None else kind,
        proto.sequence,
        timestamp_to_datetime(proto.create_time),
        proto.request_id,
        proto.claimed,
    )


def thread_from_proto(proto: Any) -> Thread:
    return Thread(
        thread_id=proto.thread_id,
        last_sequence=proto.last_sequence,
        next_compaction_index=proto.next_compaction_index,
        last_turn=turn_from_proto(proto.last_turn) if proto.HasField("last_turn") else None,
        create_time=timestamp_to_datetime(proto.create_time),
        update_time=timestamp_to_datetime(proto.update_time),
    )
