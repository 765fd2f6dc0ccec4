"""The server's limits, each enforced by gRPC core from the channel arguments ServerConfig makes:
request size, concurrent calls, connection age (GOAWAY), keepalive ping enforcement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from turnid.service.config import ServerConfig
from turnid.service.server import TurnIdServer, is_loopback, server_options
from turnid.v1 import turnid_pb2 as pb
from turnid.v1 import turnid_pb2_grpc as pb_grpc

READY = grpc.ChannelConnectivity.READY


async def running(config: ServerConfig) -> AsyncIterator[TurnIdServer]:
    server = TurnIdServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def memory(**settings: object) -> ServerConfig:
    return ServerConfig(listen="127.0.0.1:0", database="memory:", **settings)  # type: ignore[arg-type]


@pytest.fixture
async def default_server() -> AsyncIterator[TurnIdServer]:
    async for server in running(memory()):
        yield server


async def test_a_request_over_the_size_limit_is_resource_exhausted(
    default_server: TurnIdServer,
) -> None:
    async with grpc.aio.insecure_channel(default_server.target) as channel:
        stub = pb_grpc.TurnIdServiceStub(channel)
        kind = pb.TURN_KIND_USER_INPUT
        # Under the limit, the request reaches the service (which refuses the long thread id)...
        with pytest.raises(grpc.aio.AioRpcError) as under:
            await stub.AllocateTurnId(
                pb.AllocateTurnIdRequest(thread_id="t" * 60_000, kind=kind), timeout=10
            )
        assert under.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # ... over the default 64 KiB, gRPC refuses it before it does.
        with pytest.raises(grpc.aio.AioRpcError) as over:
            await stub.AllocateTurnId(
                pb.AllocateTurnIdRequest(thread_id="t" * 70_000, kind=kind), timeout=10
            )
        assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # An ordinary request is fine.
        response = await stub.AllocateTurnId(
            pb.AllocateTurnIdRequest(thread_id="t", kind=kind), timeout=10
        )
        assert response.turn.sequence == 1


async def test_calls_beyond_max_concurrent_rpcs_are_resource_exhausted() -> None:
    async for server in running(memory(max_concurrent_rpcs=2)):
        async with grpc.aio.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            # Two long-lived calls (health Watch streams) take both slots.
            streams = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
            for stream in streams:
                first = await asyncio.wait_for(stream.read(), 10)
                assert first.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.TurnIdServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetTurn(pb.GetTurnRequest(thread_id="t", turn_id="x"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for stream in streams:
                stream.cancel()


async def wait_until_not_ready(
    channel: grpc.aio.Channel, within: float
) -> grpc.ChannelConnectivity:
    """The channel's next state after READY: the server closed the connection (GOAWAY)."""
    assert channel.get_state() == READY
    async with asyncio.timeout(within):
        await channel.wait_for_state_change(READY)
    return channel.get_state()


async def test_max_connection_age_sends_goaway_and_the_channel_reconnects() -> None:
    config = memory(max_connection_age_seconds=0.5, max_connection_age_grace_seconds=0.5)
    async for server in running(config):
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TurnIdServiceStub(channel)
            request = pb.AllocateTurnIdRequest(thread_id="t", kind=pb.TURN_KIND_USER_INPUT)
            await stub.AllocateTurnId(request, timeout=10)
            assert await wait_until_not_ready(channel, 30) != READY
            # The next call opens a new connection: clients rebalance this way.
            await stub.AllocateTurnId(request, timeout=10)
            assert channel.get_state() == READY


async def test_a_client_that_pings_too_often_gets_goaway() -> None:
    async for server in running(memory()):  # 10 s minimum ping interval, 2 strikes
        options = [
            ("grpc.keepalive_time_ms", 50),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        async with grpc.aio.insecure_channel(server.target, options=options) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert await wait_until_not_ready(channel, 30) != READY


def test_server_options_are_the_documented_grpc_channel_arguments() -> None:
    options = dict(
        server_options(
            memory(
                max_message_bytes=4096,
                keepalive_time_seconds=30,
                keepalive_timeout_seconds=5,
                keepalive_min_ping_interval_seconds=15,
                keepalive_permit_without_calls=False,
                max_ping_strikes=3,
                max_connection_age_seconds=300,
                max_connection_age_grace_seconds=20,
            )
        )
    )
    assert options == {
        "grpc.so_reuseport": 0,
        "grpc.max_receive_message_length": 4096,
        "grpc.keepalive_time_ms": 30_000,
        "grpc.keepalive_timeout_ms": 5_000,
        "grpc.keepalive_permit_without_calls": 0,
        "grpc.http2.min_recv_ping_interval_without_data_ms": 15_000,
        "grpc.http2.max_ping_strikes": 3,
        "grpc.max_connection_age_ms": 300_000,
        "grpc.max_connection_age_grace_ms": 20_000,
    }
    defaults = dict(server_options(memory()))
    assert "grpc.max_connection_age_ms" not in defaults  # off unless asked for
    assert defaults["grpc.max_receive_message_length"] == 64 * 1024


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("127.0.0.2:1", True),
        ("localhost:1", True),
        ("[::1]:1", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("10.1.2.3:1", False),
        ("turnid.internal:1", False),
    ],
)
def test_loopback_addresses(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback
