"""`TurnIdClient`: the blocking client."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from turnid.client import _core
from turnid.client._core import ChannelOptions, ConnectOptions, OnRetry, RetryLoop, RetryPolicy
from turnid.client._turn import Turn, TurnKind
from turnid.v1 import turnid_pb2_grpc


class TurnIdClient:
    """A blocking client for `turnid.v1.TurnIdService`. Thread-safe; close it (or use `with`).

    Every write gets a `request_id` (a UUIDv7) made once per call and sent on every attempt, and
    UNAVAILABLE is retried with backoff within the call's `timeout`: a reconnect can never mint
    a second turn for one logical step. Pass your own `request_id` to extend that across
    processes (e.g. one derived from your orchestrator's step id).
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
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor[Any, Any]] = (),
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
        )
        self._on_retry = on_retry
        credentials = self.options.credentials()
        grpc_options = self.options.grpc_options()
        channel = (
            grpc.secure_channel(target, credentials, grpc_options)
            if credentials is not None
            else grpc.insecure_channel(target, grpc_options)
        )
        self._raw_channel = channel
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._stub = turnid_pb2_grpc.TurnIdServiceStub(channel)
        self._metadata = self.options.metadata()
        self._closed = False

    @property
    def target(self) -> str:
        return self.options.target

    # -- writes ------------------------------------------------------------------------------

    def allocate(
        self,
        thread_id: str,
        kind: TurnKind,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Turn:
        """Mint one new turn of `kind` in the thread."""
        request_id = request_id or _core.new_request_id()
        request = _core.allocate_request(thread_id, kind, request_id)
        response = self._call("AllocateTurnId", request, timeout, request_id)
        return _core.turn_from_proto(response.turn)

    def realtime_delegation(
        self, thread_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> Turn:
        """A REALTIME_DELEGATION turn (a UUIDv7 id)."""
        return self.allocate(
            thread_id, TurnKind.REALTIME_DELEGATION, request_id=request_id, timeout=timeout
        )

    def auto_compaction(
        self, thread_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> Turn:
        """An AUTO_COMPACTION turn (`auto-compact-N`, N counted by the thread)."""
        return self.allocate(
            thread_id, TurnKind.AUTO_COMPACTION, request_id=request_id, timeout=timeout
        )

    def user_input(
        self, thread_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> Turn:
        """A USER_INPUT turn (a UUIDv7 id)."""
        return self.allocate(thread_id, TurnKind.USER_INPUT, request_id=request_id, timeout=timeout)

    def allocate_batch(
        self,
        thread_id: str,
        kind: TurnKind,
        count: int,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> list[Turn]:
        """`count` (1..1000) turns of one kind with consecutive sequences, all or nothing."""
        request_id = request_id or _core.new_request_id()
        request = _core.batch_request(thread_id, kind, count, request_id)
        response = self._call("BatchAllocateTurnIds", request, timeout, request_id)
        return [_core.turn_from_proto(turn) for turn in response.turns]

    def claim(
        self,
        thread_id: str,
        turn_id: str,
        kind: TurnKind,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Turn:
        """Register an id minted elsewhere; `Conflict` (TURN_ID_TAKEN) if the thread has it."""
        request_id = request_id or _core.new_request_id()
        request = _core.claim_request(thread_id, turn_id, kind, request_id)
        response = self._call("ClaimTurnId", request, timeout, request_id)
        return _core.turn_from_proto(response.turn)

    # -- reads -------------------------------------------------------------------------------

    def get(self, thread_id: str, turn_id: str, *, timeout: float | None = None) -> Turn:
        """One turn; `NotFound` (TURN_NOT_FOUND) if the thread has no such turn."""
        response = self._call("GetTurn", _core.get_request(thread_id, turn_id), timeout, "")
        return _core.turn_from_proto(response.turn)

    def list_turns(
        self, thread_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[Turn]:
        """Every turn of the thread in sequence order, fetched a page at a time as you iterate.

        `page_size` 0 lets the service choose (100); `timeout` applies to each page.
        """
        token = ""
        while True:
            request = _core.list_request(thread_id, page_size, token)
            response = self._call("ListTurns", request, timeout, "")
            for turn in response.turns:
                yield _core.turn_from_proto(turn)
            token = response.next_page_token
            if not token:
                return

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._raw_channel.close()

    def __enter__(self) -> TurnIdClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the retry loop ----------------------------------------------------------------------

    def _call(self, method: str, request: Any, timeout: float | None, request_id: str) -> Any:
        if self._closed:
            raise RuntimeError("the TurnIdClient is closed")
        rpc = getattr(self._stub, method)
        retries = RetryLoop(
            method,
            self.options.retry,
            self.options.timeout if timeout is None else timeout,
            request_id,
        )
        while True:
            try:
                return rpc(request, timeout=retries.next_attempt(), metadata=self._metadata)
            except grpc.RpcError as rpc_error:
                retry = retries.retry_after(rpc_error)
            if self._on_retry is not None:
                self._on_retry(retry)
            time.sleep(retry.delay)
