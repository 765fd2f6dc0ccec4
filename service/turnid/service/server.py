"""The gRPC server: TurnIdService plus standard health and reflection, with graceful stop.

Shutdown (`serve`, on SIGTERM or SIGINT), so that no call that reached the server ends
CANCELLED:

1. health says NOT_SERVING for every service at once, and calls are still served for
   `drain_seconds`, while load balancers take this replica out of rotation;
2. the servicer's gate closes: new calls are refused UNAVAILABLE/SHUTTING_DOWN before any work
   (clients retry them elsewhere) and open WatchTurns streams end the same way;
3. the calls already running get `grace_seconds` to finish (`gate.wait_idle`);
4. only then is the gRPC server stopped (gRPC cancels the calls it has received but not yet
   handed to us, grpc/grpc#41785, so this comes last and finds next to none), the store is
   closed, and `turnid serve` exits 0.

A second SIGTERM/SIGINT at any point exits at once with status 128 + the signal's number.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from turnid.service import logs
from turnid.service.config import ConfigError, ServerConfig, redact_url, store_options
from turnid.service.domain import TurnService
from turnid.service.servicer import CallObserver, TurnIdServicer, add_to_server
from turnid.service.stores import Store, open_store
from turnid.v1 import turnid_pb2

log = logging.getLogger("turnid.server")

SERVICE_NAME = turnid_pb2.DESCRIPTOR.services_by_name["TurnIdService"].full_name
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """gRPC core channel arguments for the limits in `config` (grpc_types.h names)."""

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    options: list[tuple[str, Any]] = [
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", ms(config.keepalive_time_seconds)),
        ("grpc.keepalive_timeout_ms", ms(config.keepalive_timeout_seconds)),
        ("grpc.keepalive_permit_without_calls", 1 if config.keepalive_permit_without_calls else 0),
        (
            "grpc.http2.min_recv_ping_interval_without_data_ms",
            ms(config.keepalive_min_ping_interval_seconds),
        ),
        ("grpc.http2.max_ping_strikes", config.max_ping_strikes),
    ]
    if config.max_connection_age_seconds > 0:
        options.append(("grpc.max_connection_age_ms", ms(config.max_connection_age_seconds)))
        options.append(
            ("grpc.max_connection_age_grace_ms", ms(config.max_connection_age_grace_seconds))
        )
    return options


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or "" / 0.0.0.0 / :: (every interface)


@dataclass
class Security:
    """What `--tls-*` and `--auth-tokens` make: server credentials (None: plaintext) and the
    authenticator (None: authentication off). Built before the server starts, so that a bad
    file is a clear error naming the setting."""

    credentials: grpc.ServerCredentials | None = None
    authenticator: Any = None  # turnid.service.auth.Authenticator

    @classmethod
    def from_config(cls, config: ServerConfig) -> Security:
        security = cls()
        if config.tls_cert is not None and config.tls_key is not None:
            from turnid.service.auth import server_credentials

            try:
                security.credentials = server_credentials(
                    config.tls_cert, config.tls_key, config.tls_client_ca
                )
            except ValueError as error:
                raise ConfigError("tls_cert", str(error)) from None
        if config.auth_tokens is not None or config.tls_client_ca is not None:
            from turnid.service.auth import Authenticator

            try:
                security.authenticator = Authenticator(
                    config.auth_tokens, client_cert_namespaces=config.tls_client_ca is not None
                )
            except ValueError as error:
                raise ConfigError("auth_tokens", str(error)) from None
        return security

    @property
    def auth_enabled(self) -> bool:
        return self.authenticator is not None and bool(self.authenticator.enabled)

    def describe(self, config: ServerConfig) -> str:
        transport = "plaintext"
        if self.credentials is not None:
            transport = "mTLS" if config.tls_client_ca is not None else "TLS"
        if not self.auth_enabled:
            auth = "authentication off"
        elif config.auth_tokens is not None:
            auth = "bearer tokens"
        else:
            auth = "client certificate namespaces"
        return f"{transport}, {auth}"


class TurnIdServer:
    """One running service: store, gRPC server, health. Start with `start()`, end with `stop()`.

    Tests and the pytest plugin use this in-process; `turnid serve` wraps it with signals
    (`serve`). `observers` see every finished call (the access log is always one);
    `interceptors` run after authentication.
    """

    def __init__(
        self,
        config: ServerConfig,
        store: Store | None = None,
        *,
        security: Security | None = None,
        observers: Sequence[CallObserver] = (),
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
    ) -> None:
        self.config = config
        self.store = (
            store
            if store is not None
            else open_store(config.database, options=store_options(config))
        )
        self.security = security if security is not None else Security.from_config(config)
        self.health = HealthServicer()
        self.servicer = TurnIdServicer(TurnService(self.store), [logs.log_call, *observers])
        self.port = 0
        self._interceptors = list(interceptors)
        self._server: grpc.aio.Server | None = None
        self._store_open = False
        self.metrics: Any = None  # turnid.service.metrics.Metrics with --metrics-listen

    @property
    def gate(self) -> Any:
        return self.servicer.gate

    @property
    def target(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        if host in ("", "0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Open the store, bind, serve. Cancelling it (a stop signal during start-up) undoes
        what it had done."""
        try:
            await self.store.open()
            self._store_open = True
            interceptors = list(self._interceptors)
            if self.security.authenticator is not None:
                auth = self.security.authenticator.interceptor()
                if auth is not None:
                    interceptors.insert(0, auth)
            server = grpc.aio.server(
                interceptors=interceptors or None,
                options=server_options(self.config),
                maximum_concurrent_rpcs=self.config.max_concurrent_rpcs or None,
            )
            add_to_server(self.servicer, server)
            self._start_metrics()
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
                if self.security.credentials is not None:
                    self.port = server.add_secure_port(
                        self.config.listen, self.security.credentials
                    )
                else:
                    self.port = server.add_insecure_port(self.config.listen)
            except RuntimeError as error:
                raise OSError(f"cannot listen on {self.config.listen}: {error}") from error
            self._server = server
            await server.start()
            serving = health_pb2.HealthCheckResponse.SERVING
            await self.health.set("", serving)
            await self.health.set(SERVICE_NAME, serving)
        except BaseException:
            await self._abort_start()
            raise

    def _start_metrics(self) -> None:
        if self.config.metrics_listen is None:
            return
        from turnid.service.metrics import Metrics

        self.metrics = Metrics()
        self.metrics.bind(self.servicer, self.store, self.security.authenticator)
        self.metrics.start(self.config.metrics_listen)  # OSError naming the address

    def _close_metrics(self) -> None:
        metrics, self.metrics = self.metrics, None
        if metrics is not None:
            metrics.close()

    async def _abort_start(self) -> None:
        with contextlib.suppress(Exception):
            self._close_metrics()
        server, self._server = self._server, None
        with contextlib.suppress(Exception):
            if server is not None:
                await server.stop(0)
        if self._store_open:
            self._store_open = False
            with contextlib.suppress(Exception):
                await self.store.close()

    async def enter_drain(self) -> None:
        """Health NOT_SERVING for every service, for good; calls are still served."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls (UNAVAILABLE/SHUTTING_DOWN), let the running ones
        finish within `grace` (default: the config's), then stop gRPC and close the store."""
        if self._server is None:
            return
        grace = self.config.grace_seconds if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.health.enter_graceful_shutdown()
        gate = self.gate
        gate.begin_shutdown()
        if not await gate.wait_idle(grace):
            log.warning(
                "%d call(s) still running after the %.1fs grace period: cancelling them",
                gate.inflight,
                grace,
            )
        server, self._server = self._server, None
        # What is left are calls refused by the gate since (they end in microseconds): give
        # them a moment rather than cancel them, unless there is no grace at all.
        await server.stop(max(deadline - loop.time(), 1.0) if grace > 0 else 0)
        self._store_open = False
        await self.store.close()
        self._close_metrics()


class StopSignals:
    """SIGTERM and SIGINT for `turnid serve`, from its first moment.

    The first asks for a graceful stop (`requested`, and the event of `attach()`); a second
    exits the process at once with status 128 + its number (143 for SIGTERM, 130 for
    SIGINT). SIGHUP is ignored until `serve` handles it (reload)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._event: asyncio.Event | None = None
        self._previous: dict[int, Any] = {}

    @classmethod
    def install(cls) -> StopSignals:
        signals = cls()
        for signum in STOP_SIGNALS:
            signals._previous[signum] = signal.signal(signum, signals._on_signal)
        signals._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return signals

    def restore(self) -> None:
        """Put back the handlers that `install` replaced (`turnid serve --print-config`, a
        bad setting, and in-process callers such as tests)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def _on_signal(self, signum: int, frame: FrameType | None = None) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            exit_at_once(signum)
        if self._event is not None:
            self._event.set()

    def attach(self) -> asyncio.Event:
        """Handle the signals on the running loop; the event is set by the first one."""
        loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        if self.received:
            self._event.set()
        return self._event


def exit_at_once(signum: int) -> None:
    """The second stop signal: no more waiting."""
    with contextlib.suppress(Exception):
        sys.stderr.write(f"turnid serve: second signal {signum}: exiting at once\n")
        sys.stderr.flush()
    os._exit(128 + signum)


async def serve(
    config: ServerConfig,
    store: Store | None = None,
    *,
    on_serving: Callable[[TurnIdServer], object] | None = None,
    signals: StopSignals | None = None,
    security: Security | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop gracefully (see the module).

    A stop signal during start-up (say, while the store is still connecting) abandons the
    start and returns normally. `on_serving` is called once the server takes calls (`turnid
    serve --workers` reports it).
    """
    if signals is None:
        signals = StopSignals.install()
    stop = signals.attach()
    loop = asyncio.get_running_loop()
    server = TurnIdServer(config, store, security=security)
    log.info("turnid starting (pid %d, database %s)", os.getpid(), redact_url(config.database))
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        log.info("signal %d during start-up: stopped before serving", signals.received[0])
        return
    stopping.cancel()
    starting.result()  # a start-up error propagates

    description = server.security.describe(config)
    log.info(
        "turnid serving on %s (%s; database %s)",
        server.target,
        description,
        redact_url(config.database),
    )
    plaintext = server.security.credentials is None
    if plaintext and not server.security.auth_enabled and not is_loopback(config.listen):
        log.warning(
            "listening on %s in plaintext with authentication off: anyone who can reach "
            "this address can read and write every thread (use --tls-cert/--tls-key and "
            "--auth-tokens)",
            config.listen,
        )
    authenticator = server.security.authenticator
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, authenticator)
    if on_serving is not None:
        on_serving(server)

    await stop.wait()
    log.info(
        "signal %d: health NOT_SERVING; serving on for %.1fs (drain) before refusing new calls",
        signals.received[0],
        config.drain_seconds,
    )
    await server.enter_drain()
    if config.drain_seconds > 0:
        await asyncio.sleep(config.drain_seconds)  # the drain itself: time for the balancers
    log.info(
        "refusing new calls; %d in flight get up to %.1fs (grace)",
        server.gate.inflight,
        config.grace_seconds,
    )
    await server.stop()
    log.info("stopped")


def _on_sighup(authenticator: Any) -> None:
    if authenticator is None or authenticator.tokens_file is None:
        log.info("SIGHUP: no tokens file to reload")
        return
    authenticator.reload()  # logs what it loaded, or why it kept the old tokens
