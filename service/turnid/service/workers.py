"""`turnid serve --workers N`: N service processes sharing one port, so the service uses every core.

Each worker is a full `turnid serve` (its own event loop, gRPC server and store connection) bound
with SO_REUSEPORT; the kernel spreads incoming connections over them. They must share a store
that several processes may write: SQLite (one file, serialized by its write lock) or PostgreSQL.
`memory:` is refused, since separate memories would hand out the same ids twice.

The parent only supervises: it starts the workers, reports `serving on HOST:PORT` once all of
them are, and on SIGTERM or SIGINT passes SIGTERM on to every worker, waits for their graceful
stop and exits 0. If a worker dies on its own, the parent stops the others and exits 1, so that
whatever supervises the parent (systemd, Kubernetes) restarts the whole group.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
from multiprocessing.connection import Connection, wait
from types import FrameType

from turnid.service.config import ServerConfig, redact_url

log = logging.getLogger("turnid.workers")


def check_workers(database: str, workers: int) -> None:
    """Refuse worker counts and stores that cannot work (ValueError with the reason)."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, not {workers}")
    if workers > 1 and database == "memory:":
        raise ValueError(
            "--workers > 1 needs a shared store (sqlite:///... or postgresql://...): each worker "
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


def _worker(config: ServerConfig, migrate: bool, log_level: str, ready: Connection) -> None:
    """One worker process: `turnid serve` on the shared port; sends its port when serving."""
    import asyncio

    from turnid.service.server import serve
    from turnid.service.stores import open_store

    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s",
    )
    try:
        asyncio.run(
            serve(
                config,
                open_store(config.database, migrate=migrate),
                on_serving=lambda server: ready.send(server.port),
            )
        )
    except (OSError, ValueError, RuntimeError) as error:
        print(f"turnid serve (worker {os.getpid()}): {error}", file=sys.stderr)
        sys.exit(1)


def serve_workers(
    config: ServerConfig, workers: int, *, migrate: bool = True, log_level: str = "INFO"
) -> int:
    """Run `workers` worker processes until SIGTERM/SIGINT; the exit status for `turnid serve`."""
    check_workers(config.database, workers)
    reserved, listen = _reserve_port(config.listen)
    worker_config = dataclasses.replace(config, listen=listen, reuse_port=True)

    # Signals only set a flag; the wakeup fd interrupts the wait below.
    wakeup_read, wakeup_write = socket.socketpair()
    wakeup_write.setblocking(False)
    stop_signal: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_signal.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous_fd = signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
    # spawn, not fork: gRPC's threads and polling do not survive a fork.
    context = multiprocessing.get_context("spawn")
    processes: list[multiprocessing.process.BaseProcess] = []
    try:
        readies = []
        for _ in range(workers):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker, args=(worker_config, migrate, log_level, send), name="turnid-worker"
            )
            process.start()
            send.close()
            processes.append(process)
            readies.append(receive)
        status = _supervise(processes, readies, wakeup_read, stop_signal, listen, config)
    finally:
        failed = _stop(processes, config.grace_seconds + 10.0)
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
                return 1  # a worker could not start; it said why on stderr
            else:
                assert isinstance(ready, Connection)
                try:
                    ready.recv()
                except EOFError:  # exited before serving
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
    """SIGTERM every live worker and wait; 1 if any failed or had to be killed, else 0."""
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
        elif process.exitcode != 0:
            failed = 1
    return failed
