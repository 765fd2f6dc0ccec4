"""The gRPC server: TurnIdService plus standard health and reflection, with graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from turnid.service.config import ServerConfig, redact_url
from turnid.service.domain import TurnService
from turnid.service.servicer import TurnIdServicer, add_to_server
from turnid.service.stores import Store, open_store
from turnid.v1 import turnid_pb2

log = logging.getLogger("turnid.server")

SERVICE_NAME = turnid_pb2.DESCRIPTOR.services_by_name["TurnIdService"].full_name


class TurnIdServer:
    """One running service: store, gRPC server, health. Start with `start()`, end with `stop()`.

    Tests and the pytest plugin use this in-process; `turnid serve` wraps it with signals.
    """

    def __init__(self, config: ServerConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store if store is not None else open_store(config.database)
        self.health = HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        if host in ("", "0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        await self.store.open()
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", 1 if self.config.reuse_port else 0)]
        )
        self.servicer = TurnIdServicer(TurnService(self.store))
        add_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            self.port = server.add_insecure_port(self.config.listen)
        except RuntimeError as error:
            await self.store.close()
            raise OSError(f"cannot listen on {self.config.listen}: {error}") from error
        await server.start()
        self._server = server
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        await self.health.set(SERVICE_NAME, serving)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, refuse new calls, let in-flight ones finish within `grace`."""
        if self._server is None:
            return
        server, self._server = self._server, None
        await self.health.enter_graceful_shutdown()
        await server.stop(self.config.grace_seconds if grace is None else grace)
        await self.store.close()


async def serve(
    config: ServerConfig,
    store: Store | None = None,
    *,
    on_serving: Callable[[TurnIdServer], object] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully.

    `on_serving` is called once the server takes calls (`turnid serve --workers` reports it).
    """
    server = TurnIdServer(config, store)
    await server.start()
    log.info("turnid serving on %s (database %s)", server.target, redact_url(config.database))
    if on_serving is not None:
        on_serving(server)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await stop_requested.wait()
    log.info("shutting down: finishing in-flight calls (grace %.1fs)", config.grace_seconds)
    await server.stop()
    log.info("stopped")
