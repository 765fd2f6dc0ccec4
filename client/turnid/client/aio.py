"""`AsyncTurnIdClient`: the asyncio client, the same surface as `TurnIdClient`."""

# `timeout=` is the gRPC deadline of a logical call (retries included), as in the sync client;
# asyncio.timeout() around a call would cancel it instead of bounding its retries.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from turnid.client import _core
from turnid.client._core import ChannelOptions, ConnectOptions, OnRetry, RetryLoop, RetryPolicy
from turnid.client._turn import Turn, TurnKind
from turnid.v1 import turnid_pb2_grpc


class AsyncTurnIdClient:
    """An asyncio client for `turnid.v1.TurnIdService`; `await client.close()` or `async with`.

    It may be built outside a running loop: the channel opens on the first call, on that call's
    loop, and the client then belongs to that loop. Retries and request_ids work as in
    `TurnIdClient`. `on_retry` may be a plain function or a coroutine function.
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
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
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
        self._interceptors = list(interceptors)
        self._metadata = self.options.metadata()
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def target(self) -> str:
        return self.options.target

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the client belongs to: None until its first call."""
        return self._loop

    # -- writes ------------------------------------------------------------------------------

    async def allocate(
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
        response = await self._call("AllocateTurnId", request, timeout, request_id)
        return _core.turn_from_proto(response.turn)

    async def realtime_delegation(
        self, thread_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> Turn:
        """A REALTIME_DELEGATION turn (a UUIDv7 id)."""
        return await self.allocate(
            thread_id, TurnKind.REALTIME_DELEGATION, request_id=request_id, timeout=timeout
        )

    async def auto_compaction(
        self, thread_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> Turn:
        """An AUTO_COMPACTION turn (`auto-compact-N`, N counted by the thread)."""
        return await self.allocate(
            thread_id, TurnKind.AUTO_COMPACTION, request_id=request_id, timeout=timeout
        )

    async def user_input(
        self, thread_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> Turn:
        """A USER_INPUT turn (a UUIDv7 id)."""
        return await self.allocate(
            thread_id, TurnKind.USER_INPUT, request_id=request_id, timeout=timeout
        )

    async def allocate_batch(
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
        response = await self._call("BatchAllocateTurnIds", request, timeout, request_id)
        return [_core.turn_from_proto(turn) for turn in response.turns]

    async def claim(
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
        response = await self._call("ClaimTurnId", request, timeout, request_id)
        return _core.turn_from_proto(response.turn)

    # -- reads -------------------------------------------------------------------------------

    async def get(self, thread_id: str, turn_id: str, *, timeout: float | None = None) -> Turn:
        """One turn; `NotFound` (TURN_NOT_FOUND) if the thread has no such turn."""
        request = _core.get_request(thread_id, turn_id)
        response = await self._call("GetTurn", request, timeout, "")
        return _core.turn_from_proto(response.turn)

    async def list_turns(
        self, thread_id: str, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[Turn]:
        """Every turn of the thread in sequence order, a page at a time: `async for`.

        `page_size` 0 lets the service choose (100); `timeout` applies to each page.
        """
        token = ""
        while True:
            request = _core.list_request(thread_id, page_size, token)
            response = await self._call("ListTurns", request, timeout, "")
            for turn in response.turns:
                yield _core.turn_from_proto(turn)
            token = response.next_page_token
            if not token:
                return

    # -- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(None)

    async def __aenter__(self) -> AsyncTurnIdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- the channel and the retry loop ------------------------------------------------------

    def _ready_stub(self) -> Any:
        if self._closed:
            raise RuntimeError("the AsyncTurnIdClient is closed")
        loop = asyncio.get_running_loop()
        if self._channel is None:
            credentials = self.options.credentials()
            grpc_options = self.options.grpc_options()
            interceptors = self._interceptors or None
            self._channel = (
                grpc.aio.secure_channel(
                    self.target, credentials, grpc_options, interceptors=interceptors
                )
                if credentials is not None
                else grpc.aio.insecure_channel(self.target, grpc_options, interceptors=interceptors)
            )
            self._stub = turnid_pb2_grpc.TurnIdServiceStub(self._channel)
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("an AsyncTurnIdClient belongs to the event loop it first ran on")
        return self._stub

    async def _call(self, method: str, request: Any, timeout: float | None, request_id: str) -> Any:
        rpc = getattr(self._ready_stub(), method)
        retries = RetryLoop(
            method,
            self.options.retry,
            self.options.timeout if timeout is None else timeout,
            request_id,
        )
        while True:
            try:
                return await rpc(request, timeout=retries.next_attempt(), metadata=self._metadata)
            except grpc.RpcError as rpc_error:
                retry = retries.retry_after(rpc_error)
            if self._on_retry is not None:
                outcome = self._on_retry(retry)
                if inspect.isawaitable(outcome):
                    await outcome
            await asyncio.sleep(retry.delay)
