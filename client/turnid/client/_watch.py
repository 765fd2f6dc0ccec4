"""What the sync and asyncio watches share: where a watch stands and when it reconnects."""

from __future__ import annotations

from typing import Any

import grpc

from turnid.client._core import (
    RETRYABLE_CODES,
    RetryEvent,
    RetryPolicy,
    cancelled_locally,
    turn_from_proto,
)
from turnid.client._turn import Turn
from turnid.client.errors import TurnIdError, Unavailable, error_from_rpc
from turnid.v1 import turnid_pb2

METHOD = "WatchTurns"

# A watch has no deadline, so a stream that breaks for any of these reasons is resumed. A
# transport failure that gRPC reports as INTERNAL or DEADLINE_EXCEEDED (no ErrorInfo: not the
# service's own verdict) counts too; the service's INTERNAL_ERROR does not.
_TRANSPORT_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED})


class StreamGap(Exception):
    """A stream skipped a sequence (never expected): drop it and resume from the cursor.

    `delivered` holds the message's turns before the gap, which are still to be delivered.
    """

    def __init__(self, delivered: list[Turn]) -> None:
        super().__init__(f"{len(delivered)} turns before a gap")
        self.delivered = delivered


class WatchCursor:
    """The state of one watch, with no I/O: the last sequence delivered, whether the watch has
    caught up, and the reconnect decisions.

    The driver opens a stream with `request()`, passes each message to `accept()` (which
    drops anything already delivered and says whether this message completed the catch-up),
    and when the stream breaks asks `retry_after()` for the reconnect (or the error to raise).
    Because every stream asks for `sequence > last_sequence`, a resumed watch neither repeats
    nor skips a turn.
    """

    def __init__(self, thread_id: str, after_sequence: int, policy: RetryPolicy) -> None:
        self.thread_id = thread_id
        self.last_sequence = after_sequence
        self.caught_up = False
        self.policy = policy
        self.failures = 0  # failed streams in a row

    def request(self) -> Any:
        return turnid_pb2.WatchTurnsRequest(
            thread_id=self.thread_id, after_sequence=self.last_sequence
        )

    def accept(self, response: Any) -> tuple[list[Turn], bool]:
        """The message's new turns in order, and True if it made the watch caught up.

        Raises `StreamGap` if a turn is missing (the turns before it are still delivered: the
        cursor moves past them first).
        """
        self.failures = 0
        fresh: list[Turn] = []
        for proto in response.turns:
            if proto.sequence <= self.last_sequence:
                continue  # already delivered (a replay overlapping a resume)
            if proto.sequence != self.last_sequence + 1:
                raise StreamGap(fresh)
            fresh.append(turn_from_proto(proto))
            self.last_sequence = proto.sequence
        newly = bool(response.caught_up) and not self.caught_up
        self.caught_up = self.caught_up or bool(response.caught_up)
        return fresh, newly

    def _reconnect(self, error: TurnIdError) -> RetryEvent:
        self.failures += 1
        if not self.policy.allows(self.failures):
            raise error
        delay = self.policy.delay(self.failures)
        return RetryEvent(METHOD, self.failures, error, delay, "")

    def retry_after(self, rpc_error: grpc.RpcError) -> RetryEvent:
        """The reconnect after a broken stream; raises the typed error when it is final."""
        error = error_from_rpc(rpc_error)
        resumable = error.code in RETRYABLE_CODES or (
            error.code in _TRANSPORT_CODES and not error.reason
        )
        if not resumable or cancelled_locally(rpc_error):
            raise error from rpc_error
        return self._reconnect(error)

    def retry_after_end(self) -> RetryEvent:
        """The reconnect after a stream the server ended without an error (resume anyway)."""
        return self._reconnect(
            Unavailable(grpc.StatusCode.UNAVAILABLE, f"{METHOD}: the server ended the stream")
        )

    def retry_after_gap(self) -> RetryEvent:
        return self._reconnect(
            Unavailable(
                grpc.StatusCode.UNAVAILABLE,
                f"{METHOD}: the stream skipped past sequence {self.last_sequence + 1}",
            )
        )
