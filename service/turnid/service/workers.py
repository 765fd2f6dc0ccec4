"""`turnid serve --workers N`: N service processes sharing one port, so the service uses every core.

Each worker is a full `turnid serve` (its own event loop, gRPC server and store connection) bound
with SO_REUSEPORT; the kernel spreads incoming connections over them. They must share a store
that several processes may write: SQLite (one file, serialized by its write lock) or PostgreSQL.
`memory:` is refused, since separate memories would hand out the same ids twice.

The parent only supervises: it starts the workers, reports `serving on HOST:PORT` once all of
them are, and on SIGTERM or SIGINT passes SIGTERM on to every worker (each drains and stops as
a single `turnid serve` does), waits for them and exits 0; SIGHUP is passed on too (tokens
reload); a second SIGTERM/SIGINT kills the workers and exits at once (128 + signal). If a
worker dies on its own, the parent stops the others and exits 1, so that whatever supervises
the parent (systemd, Kubernetes) restarts the whole group.

Workers die with the parent even when it is SIGKILLed: on Linux each worker asks the kernel
for SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), then stops gracefully.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
from multiprocessing.connection import Connection, wait
from types import FrameType
from typing import Any, Protocol

from turnid.service.config import ServerConfig, redact_url, store_options

log = logging.getLogger("turnid.workers")


class StopSignalsLike(Protocol):
    received: list[int]


def check_workers(database: str, workers: int) -> None:
    """Refuse worker counts and stores that cannot work (ValueError with the reason)."""
    if workers < 1:
        raise ValueError(f"must be at least 1, not {workers}")
    if workers > 1 and database == "memory:":
        raise ValueError(
            "more than 1 needs a shared store (sqlite:///... or postgresql://...): each worker "
            "would have its own memory: store and hand out the same turn ids twice"
        )


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Bind (but do not listen on) the address with SO_REUSEPORT; returns it and HOST:PORT.

    This refuses a port that another program already listens on (the workers would otherwise
    join its SO_REUSEPORT group or fail one by one), turns port 0 into one concrete port that
    every worker then binds, and keeps the port ours while the workers run.
    """
    host, port = _split(listen)
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    probe = socket.socket(family, kind, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)  # without SO_REUSEPORT: fails if anyone else has the port
        address = probe.getsockname()
    except OSError as error:
        raise OSError(f"cannot listen on {listen}: {error}") from error
    finally:
        probe.close()
    reserved = socket.socket(family, kind, proto)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind(address)
    shown_host = f"[{host}]" if ":" in host else host
    return reserved, f"{shown_host}:{address[1]}"


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel send this worker SIGTERM when the parent dies, even by SIGKILL
    (prctl PR_SET_PDEATHSIG), so no worker outlives its supervisor holding the port and the
    store. The worker then stops gracefully like on any SIGTERM. Elsewhere this is a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _worker(config: ServerConfig, parent_pid: int, ready: Connection) -> None:
    """One worker process: `turnid serve` on the shared port; sends its port when serving."""
    from turnid.service import logs
    from turnid.service.server import StopSignals

    signals = StopSignals.install()  # before anything slow: a SIGTERM now ends start-up
    _die_with_parent(parent_pid)

    import asyncio

    from turnid.service.server import serve
    from turnid.service.stores import open_store

    logs.configure(config.log_level, config.log_format, tag_pid=True)
    try:
        asyncio.run(
            serve(
                config,
                open_store(config.database, migrate=config.migrate, options=store_options(config)),
                on_serving=lambda server: ready.send(server.port),
                signals=signals,
            )
        )
    except (OSError, ValueError, RuntimeError) as error:
        print(f"turnid serve (worker {os.getpid()}): {error}", file=sys.stderr)
        sys.exit(1)


def serve_workers(config: ServerConfig, *, signals: StopSignalsLike | None = None) -> int:
    """Run `config.workers` worker processes until SIGTERM/SIGINT; the exit status for
    `turnid serve`. `signals.received` holds stop signals that came before (start-up)."""
    check_workers(config.database, config.workers)
    reserved, listen = _reserve_port(config.listen)
    worker_config = dataclasses.replace(config, listen=listen, reuse_port=True)

    # Signals only set a flag; the wakeup fd interrupts the wait below. A second stop signal
    # kills the workers and exits at once.
    wakeup_read, wakeup_write = socket.socketpair()
    wakeup_write.setblocking(False)
    stop_signal: list[int] = []
    processes: list[multiprocessing.process.BaseProcess] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            for process in processes:
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, signal.SIGHUP)
            return
        stop_signal.append(signum)
        if len(stop_signal) > 1:
            for process in processes:
                if process.pid is not None:
                    with contextlib.suppress(OSError):
                        os.kill(process.pid, signal.SIGKILL)
            from turnid.service.server import exit_at_once

            exit_at_once(signum)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    previous_fd = signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
    if signals is not None:  # those that came before our handlers were in place
        stop_signal[:0] = signals.received
    # spawn, not fork: gRPC's threads and polling do not survive a fork.
    context = multiprocessing.get_context("spawn")
    status = 1
    workers_metrics: Any = None
    try:
        if config.metrics_listen is not None:
            # One /metrics in the parent for the sum of the workers (which only record).
            from turnid.service.metrics import WorkersMetrics

            workers_metrics = WorkersMetrics.start(config.metrics_listen)
        readies = []
        for _ in range(config.workers):
            if stop_signal:
                break
            receive, send = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker, args=(worker_config, os.getpid(), send), name="turnid-worker"
            )
            process.start()
            send.close()
            processes.append(process)
            readies.append(receive)
        status = _supervise(processes, readies, wakeup_read, stop_signal, listen, config)
    finally:
        failed = _stop(processes, config.drain_seconds + config.grace_seconds + 10.0)
        if workers_metrics is not None:
            workers_metrics.close()
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        wakeup_read.close()
        wakeup_write.close()
        reserved.close()
    return status or failed


def _supervise(
    processes: list[multiprocessing.process.BaseProcess],
    readies: list[Connection],
    wakeup: socket.socket,
    stop_signal: list[int],
    listen: str,
    config: ServerConfig,
) -> int:
    """Wait until every worker serves, then until a signal (0) or a worker's death (1)."""
    sentinels = {process.sentinel: process for process in processes}
    starting = set(readies)
    while starting and not stop_signal:
        for ready in wait([*starting, *sentinels, wakeup]):
            if ready is wakeup:
                wakeup.recv(64)
            elif ready in sentinels:
                if stop_signal:
                    break
                return 1  # a worker could not start; it said why on stderr
            else:
                assert isinstance(ready, Connection)
                try:
                    ready.recv()
                except EOFError:  # exited before serving
                    if stop_signal:
                        break
                    return 1
                starting.discard(ready)
    if not stop_signal:
        log.info(
            "turnid serving on %s with %d workers (database %s)",
            listen,
            len(processes),
            redact_url(config.database),
        )
    while not stop_signal:
        for ready in wait([*sentinels, wakeup]):
            if ready is wakeup:
                wakeup.recv(64)
            else:
                process = sentinels[ready]  # type: ignore[index]
                log.error(
                    "worker %d exited with status %s; stopping the others",
                    process.pid,
                    process.exitcode,
                )
                return 1
    log.info("signal %d: stopping %d workers", stop_signal[0], len(processes))
    return 0


def _stop(processes: list[multiprocessing.process.BaseProcess], timeout: float) -> int:
    """SIGTERM every live worker and wait; 1 if any failed or had to be killed, else 0.

    A worker that SIGTERM ended before it had installed its handlers (exit status -SIGTERM)
    stopped as asked."""
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    failed = 0
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            log.error("worker %d did not stop within %.0fs; killing it", process.pid, timeout)
            process.kill()
            process.join()
            failed = 1
        elif process.exitcode not in (0, -signal.SIGTERM):
            failed = 1
    return failed
