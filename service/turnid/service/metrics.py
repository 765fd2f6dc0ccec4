"""Prometheus metrics: `turnid serve --metrics-listen HOST:PORT` serves them at /metrics.

Wiring (the whole interface; server.py / workers.py call nothing else)::

    # server.py, TurnIdServer.start(), once self.servicer exists (before server.start()):
    self.metrics = None
    if self.config.metrics_listen is not None:
        from turnid.service.metrics import Metrics

        self.metrics = Metrics()
        self.metrics.bind(self.servicer, self.store, authenticator)  # authenticator may be None
        self.metrics.start(self.config.metrics_listen)  # OSError("cannot serve metrics on ...")
    # server.py, TurnIdServer.stop(), after the store is closed:
    if self.metrics is not None:
        self.metrics.close()

    # workers.py, serve_workers(), before the first worker is spawned; keep metrics_listen in
    # the workers' config (they record; the parent serves the sum of every worker):
    workers_metrics = WorkersMetrics.start(config.metrics_listen) if config.metrics_listen else None
    ...  # finally:
    if workers_metrics is not None:
        workers_metrics.close()

`Metrics.start(listen)` serves HTTP in this process, except in a worker under `WorkersMetrics`
(PROMETHEUS_MULTIPROC_DIR is set): there it records into prometheus-client's per-process
files and starts a sampler thread that copies the live gauges into them once a second, and the
parent's one endpoint serves the sum. A bind error is one OSError naming the address.

Families (their names and labels are a contract: dashboards and alerts use them):

- ``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}`` and
  ``grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}`` (histogram): the names,
  labels and code spelling (``OK``, ``InvalidArgument``, ``NotFound``, ... as Go's
  ``codes.Code.String()``) of go-grpc-prometheus, so its dashboards and the usual
  ``GRPCServerErrorsHigh`` alerts work unchanged. Every method x code starts at 0.
- ``turnid_allocations_total{kind,outcome}``: TURNS (a batch of 10 counts 10), ``kind``
  ``realtime_delegation|auto_compaction|user_input|unspecified|unknown``, ``outcome``
  ``allocated`` (new turns), ``claimed`` (ClaimTurnId), ``replayed`` (a retry answered from its
  request_id's record: nothing new was written), ``refused`` (a client error: invalid,
  taken, thread advanced) or ``failed`` (server side:
  unavailable, overloaded, internal, cancelled); refused/failed count the turns asked for.
- ``turnid_group_commit_size`` (histogram, allocations per commit), ``turnid_commit_seconds``
  (histogram): from the store's ``on_commit(allocations, turns, seconds)``.
- ``turnid_writer_queue_depth``, ``turnid_watch_streams``, ``turnid_calls_in_flight``,
  ``turnid_sqlite_wal_bytes``: gauges read from live state at scrape time (a collector), never
  updated per call (the parent of workers sums them, but for the one WAL: its max).
- ``turnid_store_errors_total{reason}``: calls failed STORE_UNAVAILABLE, STORAGE_FULL,
  OVERLOADED or INTERNAL_ERROR.
- ``turnid_auth_refusals_total{reason}``: read from ``Authenticator.refusals`` at scrape time.
- ``process_*`` / ``python_*`` (single process only: they do not add up across workers).

The observer's cost is a dict look-up, a counter and a histogram (two counters for writes):
~1.5 us a call in one process, ~4.5-8 us in a worker (mmap'ed files); see
bench/metrics_overhead.py.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

log = logging.getLogger("turnid.metrics")

__all__ = [
    "MULTIPROC_DIR_ENV",
    "Metrics",
    "MetricsEndpoint",
    "WorkersMetrics",
    "serve_http",
]

MULTIPROC_DIR_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
SERVICE_NAME: Final = "turnid.v1.TurnIdService"

# (method, grpc_type): the service's RPCs, pre-initialized so every series starts at 0.
METHODS: Final = {
    "AllocateTurnId": "unary",
    "BatchAllocateTurnIds": "unary",
    "ClaimTurnId": "unary",
    "GetTurn": "unary",
    "ListTurns": "unary",
    "GetThread": "unary",
    "WatchTurns": "server_stream",
}
_WRITES: Final = frozenset({"AllocateTurnId", "BatchAllocateTurnIds", "ClaimTurnId"})

# grpc.StatusCode names (what CallRecord.code holds) -> Go's codes.Code.String().
GO_CODES: Final = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}
# Codes a client caused (its allocation is "refused"); any other failure is "failed".
_CLIENT_CODES: Final = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
    }
)
KINDS: Final = {0: "unspecified", 1: "realtime_delegation", 2: "auto_compaction", 3: "user_input"}
OUTCOMES: Final = ("allocated", "claimed", "replayed", "refused", "failed")
STORE_ERROR_REASONS: Final = ("STORE_UNAVAILABLE", "STORAGE_FULL", "OVERLOADED", "INTERNAL_ERROR")
AUTH_REASONS: Final = ("MISSING_CREDENTIALS", "INVALID_CREDENTIALS")
MAX_BATCH: Final = 1000

# Seconds. The service answers in ~0.1-5 ms; streams (WatchTurns) land in the top buckets.
LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
COMMIT_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
GROUP_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

SAMPLE_INTERVAL_S: Final = 1.0  # workers: how often live gauges reach the parent's endpoint


def multiprocess_mode() -> bool:
    """Whether prometheus-client records into per-process files (chosen once, at its import,
    from PROMETHEUS_MULTIPROC_DIR: set by WorkersMetrics in the parent before spawning)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def _split(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise OSError(f"cannot serve metrics on {listen!r}: expected HOST:PORT")
    host = host.strip("[]")
    return (host or "0.0.0.0"), int(port)


class MetricsEndpoint:
    """A running /metrics HTTP server (a daemon thread); `port` is the bound port."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_http(listen: str, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve `registry` at http://LISTEN/metrics; OSError "cannot serve metrics on ..." when
    the address cannot be bound (in use, unknown host, no permission)."""
    host, port = _split(listen)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        raise OSError(f"cannot serve metrics on {listen}: {error.strerror or error}") from None
    return MetricsEndpoint(server, thread)


class _LiveCollector(Collector):
    """Gauges and counters read from live state at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()  # no duplicate-name checks against the registry's other families

    def collect(self) -> Iterator[Metric]:
        live = self._metrics.live_values()
        for name, documentation in _LIVE_GAUGES.items():
            family = GaugeMetricFamily(name, documentation)
            family.add_metric([], live[name])
            yield family
        refusals = CounterMetricFamily(
            "turnid_auth_refusals", _AUTH_DOC, labels=["reason"]
        )  # exposed as turnid_auth_refusals_total
        for reason, count in self._metrics.auth_refusals().items():
            refusals.add_metric([reason], count)
        yield refusals


_LIVE_GAUGES: Final = {
    "turnid_writer_queue_depth": "Allocations queued for the store's writer (SQLite group "
    "commit), now.",
    "turnid_watch_streams": "Open WatchTurns streams, now.",
    "turnid_calls_in_flight": "Calls being handled by the servicer, now.",
    "turnid_sqlite_wal_bytes": "Size of the SQLite database's WAL file, now (0 on other stores).",
}
# How the parent of --workers combines each live gauge of the workers: the workers share one
# database file, so its WAL is counted once.
_LIVE_MODES: Final[dict[str, Literal["livemax", "livesum"]]] = {
    "turnid_sqlite_wal_bytes": "livemax"
}
_AUTH_DOC: Final = "Calls refused by authentication, by reason."


def _queue_depth(store: Any) -> int:
    depth = getattr(store, "queue_depth", None)
    if depth is None:
        return 0
    return int(depth() if callable(depth) else depth)


def _wal_bytes(store: Any) -> int:
    size = getattr(store, "wal_bytes", None)
    return int(size()) if callable(size) else 0


class Metrics:
    """turnid's metrics on one registry (a fresh one unless given).

    `observe` is a CallObserver (bind_servicer appends it); the bind_* methods hook the live
    state in; `start(listen)` serves them. In multiprocess mode (a worker under WorkersMetrics)
    live values are copied into per-process files by `sync_live()` instead.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # No `*_created` series: they double the series count and no dashboard reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess = multiprocess_mode()
        own_registry = registry is None
        self.registry = registry if registry is not None else CollectorRegistry()
        self._servicer: Any = None
        self._store: Any = None
        self._authenticator: Any = None
        self._endpoint: MetricsEndpoint | None = None
        self._sampler: threading.Thread | None = None
        self._stop_sampling = threading.Event()
        registry = self.registry
        self.handled = Counter(
            "grpc_server_handled",
            "Calls completed on the server, by method and gRPC status code.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time the server took to handle a call, by method.",
            ["grpc_type", "grpc_service", "grpc_method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.allocations = Counter(
            "turnid_allocations",
            "Turns by kind and outcome (allocated, claimed, replayed, refused, failed).",
            ["kind", "outcome"],
            registry=registry,
        )
        self.group_commit_size = Histogram(
            "turnid_group_commit_size",
            "Allocations per store commit (SQLite group commit; 1 a transaction in PostgreSQL).",
            buckets=GROUP_BUCKETS,
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "turnid_commit_seconds",
            "Time a store commit took (group: BEGIN IMMEDIATE to COMMIT), seconds.",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "turnid_store_errors",
            "Calls that failed in or behind the store, by ErrorInfo reason.",
            ["reason"],
            registry=registry,
        )
        # (method, code) -> handled child; method -> histogram child. Children are looked up
        # once: .labels() costs more than the increment itself.
        self._handled: dict[tuple[str, str], Any] = {}
        self._latency: dict[str, Any] = {}
        self._alloc: dict[tuple[int, str], Any] = {}
        self._errors: dict[str, Any] = {}
        for method in METHODS:
            self._latency_child(method)
            for code in GO_CODES:
                self._handled_child(method, code)
        for kind in KINDS:
            for outcome in OUTCOMES:
                self._alloc_child(kind, outcome)
        for reason in STORE_ERROR_REASONS:
            self._errors[reason] = self.store_errors.labels(reason)
        self._live_gauges: dict[str, Gauge] = {}
        self._refusals: Counter | None = None
        self._refusals_seen: dict[str, float] = {}
        if self.multiprocess:
            # Per-process files; the parent sums them. livesum: a dead worker's gauge goes.
            for name, documentation in _LIVE_GAUGES.items():
                self._live_gauges[name] = Gauge(
                    name,
                    documentation,
                    registry=registry,
                    multiprocess_mode=_LIVE_MODES.get(name, "livesum"),
                )
            self._refusals = Counter(
                "turnid_auth_refusals", _AUTH_DOC, ["reason"], registry=registry
            )
            for reason in AUTH_REASONS:
                self._refusals.labels(reason)
        else:
            registry.register(_LiveCollector(self))
            if own_registry:  # a given registry (the global REGISTRY) may have them already
                ProcessCollector(registry=registry)
                PlatformCollector(registry=registry)
                GCCollector(registry=registry)

    # --- children, made once ----------------------------------------------------------------

    def _handled_child(self, method: str, code: str) -> Any:
        child = self.handled.labels(
            METHODS.get(method, "unary"), SERVICE_NAME, method, GO_CODES.get(code, "Unknown")
        )
        self._handled[(method, code)] = child
        return child

    def _latency_child(self, method: str) -> Any:
        child = self.handling_seconds.labels(METHODS.get(method, "unary"), SERVICE_NAME, method)
        self._latency[method] = child
        return child

    def _alloc_child(self, kind: int, outcome: str) -> Any:
        child = self.allocations.labels(KINDS.get(kind, "unknown"), outcome)
        self._alloc[(kind, outcome)] = child
        return child

    # --- the hot path: one call ended -------------------------------------------------------

    def observe(self, record: Any) -> None:
        """CallObserver: count the call, its latency, its turns and its store error."""
        method = record.method
        code = record.code
        handled = self._handled.get((method, code))
        if handled is None:
            handled = self._handled_child(method, code)
        handled.inc()
        latency = self._latency.get(method)
        if latency is None:
            latency = self._latency_child(method)
        latency.observe(record.duration_s)
        if method in _WRITES:
            self._count_turns(record, method, code)
        if code != "OK":
            errors = self._errors.get(record.reason)
            if errors is not None:
                errors.inc()

    def _count_turns(self, record: Any, method: str, code: str) -> None:
        kind = record.kind
        count = record.count if method == "BatchAllocateTurnIds" else 1
        if not 0 < count <= MAX_BATCH:
            count = 0  # an invalid count asked for nothing that could be granted
        if code == "OK":
            if record.replayed:  # a retry answered from its request_id's record
                outcome = "replayed"
            else:
                outcome = "claimed" if method == "ClaimTurnId" else "allocated"
        elif code in _CLIENT_CODES:
            outcome = "refused"
        else:
            outcome = "failed"
        child = self._alloc.get((kind, outcome))
        if child is None:
            child = self._alloc_child(kind, outcome)
        if count:
            child.inc(count)

    __call__ = observe

    def on_commit(self, allocations: int, turns: int, seconds: float) -> None:
        """The store's on_commit hook: one group (or transaction) committed."""
        self.group_commit_size.observe(allocations)
        self.commit_seconds.observe(seconds)

    # --- hooking in ---------------------------------------------------------------------------

    def bind(self, servicer: Any, store: Any, authenticator: Any = None) -> None:
        """bind_servicer + bind_store + bind_authenticator (None: auth is off)."""
        self.bind_servicer(servicer)
        self.bind_store(store)
        if authenticator is not None:
            self.bind_authenticator(authenticator)

    def bind_servicer(self, servicer: Any) -> None:
        """Observe every call of a TurnIdServicer; read its gate (in flight, watchers)."""
        self._servicer = servicer
        if self.observe not in servicer.observers:
            servicer.observers.append(self.observe)

    def bind_store(self, store: Any) -> None:
        """Take the store's commits (`on_commit`, chained after any hook already set) and
        read its writer queue (`queue_depth`). A store without them (memory:) is skipped."""
        self._store = store
        if not hasattr(store, "on_commit"):
            return
        previous: Callable[[int, int, float], None] | None = store.on_commit
        if previous is None:
            store.on_commit = self.on_commit
            return

        def both(allocations: int, turns: int, seconds: float) -> None:
            previous(allocations, turns, seconds)
            self.on_commit(allocations, turns, seconds)

        store.on_commit = both

    def bind_authenticator(self, authenticator: Any) -> None:
        """Read `Authenticator.refusals` (a Counter by reason) at scrape time."""
        self._authenticator = authenticator

    # --- live state ---------------------------------------------------------------------------

    def live_values(self) -> dict[str, float]:
        gate = getattr(self._servicer, "gate", None)
        return {
            "turnid_writer_queue_depth": float(_queue_depth(self._store)),
            "turnid_watch_streams": float(getattr(gate, "watchers", 0)),
            "turnid_calls_in_flight": float(getattr(gate, "inflight", 0)),
            "turnid_sqlite_wal_bytes": float(_wal_bytes(self._store)),
        }

    def auth_refusals(self) -> dict[str, float]:
        found: Mapping[str, int] = getattr(self._authenticator, "refusals", None) or {}
        counts = dict.fromkeys(AUTH_REASONS, 0.0)
        for _ in range(3):  # the event loop may add a key while another thread copies
            try:
                counts.update({reason: float(n) for reason, n in dict(found).items()})
                break
            except RuntimeError:
                continue
        return counts

    def sync_live(self) -> None:
        """Multiprocess mode: copy the live values into this process's files (the sampler
        does it every SAMPLE_INTERVAL_S; call it to publish at once)."""
        if not self.multiprocess:
            return
        for name, value in self.live_values().items():
            self._live_gauges[name].set(value)
        assert self._refusals is not None
        for reason, count in self.auth_refusals().items():
            delta = count - self._refusals_seen.get(reason, 0.0)
            if delta > 0:
                self._refusals.labels(reason).inc(delta)
                self._refusals_seen[reason] = count

    def _sample(self) -> None:
        while not self._stop_sampling.wait(SAMPLE_INTERVAL_S):
            try:
                self.sync_live()
            except Exception:  # never let the sampler die silently
                log.exception("metrics sampler failed")

    # --- serving ------------------------------------------------------------------------------

    @property
    def port(self) -> int | None:
        """The bound /metrics port (None in a worker, whose parent serves)."""
        return self._endpoint.port if self._endpoint is not None else None

    def start(self, listen: str) -> None:
        """Serve /metrics on LISTEN; in a worker under WorkersMetrics, start the sampler."""
        if self.multiprocess:
            self.sync_live()
            self._sampler = threading.Thread(
                target=self._sample, name="turnid-metrics-sampler", daemon=True
            )
            self._sampler.start()
            return
        self._endpoint = serve_http(listen, self.registry)
        log.info("metrics on http://%s:%d/metrics", _split(listen)[0], self._endpoint.port)

    def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
        if self._sampler is not None:
            self._stop_sampling.set()
            self._sampler.join(5)
            self._sampler = None
            self.sync_live()


class WorkersMetrics:
    """The parent of `turnid serve --workers N`: one /metrics for the sum of all workers.

    `start(listen)` makes (or, when PROMETHEUS_MULTIPROC_DIR is set already, empties) the
    directory of prometheus-client's multiprocess mode, sets PROMETHEUS_MULTIPROC_DIR for the
    workers spawned after it, and serves what their files add up to. `close()` stops serving,
    restores the environment and removes the directory it made.
    """

    def __init__(self, directory: str, owned: bool, endpoint: MetricsEndpoint) -> None:
        self.directory = directory
        self._owned = owned
        self._endpoint = endpoint
        self.port = endpoint.port

    @classmethod
    def start(cls, listen: str) -> WorkersMetrics:
        given = os.environ.get(MULTIPROC_DIR_ENV)
        if given:
            os.makedirs(given, exist_ok=True)
            for stale in glob.glob(os.path.join(given, "*.db")):
                os.remove(stale)  # a previous run's counters would add up with ours
            directory, owned = given, False
        else:
            directory, owned = tempfile.mkdtemp(prefix="turnid-metrics-"), True
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        try:
            endpoint = serve_http(listen, registry)
        except OSError:
            if owned:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        os.environ[MULTIPROC_DIR_ENV] = directory
        log.info("metrics of all workers on http://%s:%d/metrics", _split(listen)[0], endpoint.port)
        return cls(directory, owned, endpoint)

    def worker_exited(self, pid: int) -> None:
        """Drop a dead worker's live gauges (its counters stay in the sums)."""
        mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._endpoint.close()
        if os.environ.get(MULTIPROC_DIR_ENV) == self.directory and self._owned:
            del os.environ[MULTIPROC_DIR_ENV]
        if self._owned:
            shutil.rmtree(self.directory, ignore_errors=True)
