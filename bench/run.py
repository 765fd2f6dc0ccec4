"""`make bench`: turnid against the ceiling that Python gRPC itself sets, on this machine, now.

Every row is a server in its own subprocess (`turnid serve`, or bench/baseline_server.py: a no-op
grpc.aio TurnIdService with canned responses of the same shape) driven by the same load generator
(bench/loadgen.py) in separate processes:

- concurrency 1: one call in flight; p50/p99 latency;
- concurrency 32: 32 calls in flight over several connections; throughput, p50/p99 latency and
  the server's CPU time per call (user + system, all worker processes), which is the figure least
  disturbed by whatever else runs on the machine.

The load generator drives raw grpc.aio stubs, or (the "client" rows) the real Python client:
one `AsyncTurnIdClient` shared by 32 tasks, or one `TurnIdClient` shared by 32 OS threads, in one
process, calling `allocate()` as an orchestrator does; whatever the client does behind it (unary
calls, or coalescing once it has it) is what those rows measure, and their notes say which (the
load generator counts the RPCs a probe of concurrent allocate() calls sends). Other rows: watch
delivery (allocation acknowledged -> a watcher of the thread has it), allocation with 100 open
watchers (bench/watchers.py) against the same row without, and the SQLite row with
`--metrics-listen` against the same row without. The fsync latency of the temporary directory the
SQLite files live in (4 KiB append + fsync) is sampled between the concurrency-1 rounds, and
the p50 target is stated in it.

Three floors put the SQLite rows in context, measured beside them: the SQL of a group commit in a
plain sqlite3 loop on the store's own file and settings (bench/sqlite_floor.py: a lone allocation,
and a group of 32), the client row on the memory store (the client path with no commit to
wait for), and the no-op server with one 4 KiB append + fsync per AllocateTurnId on its event
loop, beside the SQLite files (what one durable write costs a caller end to end: the c1 targets'
floor).

Trials are short and interleaved: each of `--trials` rounds runs one trial of every row, and a
row's figures are medians over the rounds. Service rows show their throughput as a ratio to the
baseline row with the same RPC, taken within each round (then the median). Also: in-process minting
(bench/minting.py), resident memory of a SQLite server around 200,000 allocations, and SQLite
commits/s vs allocations/s (the group commit). Prints one markdown table and the targets, writes
all raw figures as JSON (default bench/results/bench-<time>.json) and prints its path. `--curve`
adds calls/s and p99 against concurrency 1-128 for the baseline, unary SQLite and the async
client, plotted to bench/results/curve-<time>.svg when matplotlib is installed (the `bench` extra).

A row whose server, watchers or load generator does not start is listed as skipped, with the
reason. PostgreSQL rows run when TURNID_BENCH_POSTGRES_DSN (or TURNID_TEST_POSTGRES_DSN) is set and
the PostgreSQL store is installed; otherwise they are listed as skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postgres_schema import postgres_schema

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
_TURNID_SCRIPT = Path(PYTHON).parent / "turnid"
TURNID = [str(_TURNID_SCRIPT)] if _TURNID_SCRIPT.exists() else [PYTHON, "-m", "turnid.service.cli"]
REALTIME, COMPACTION = 1, 2
RSS_ALLOCATIONS = 200_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
FSYNC_BLOCK = 4096
BASELINE = "baseline (no-op grpc.aio)"
# The no-op that first appends 4 KiB and fsyncs it, on its event loop, for every AllocateTurnId:
# what one durable write costs a caller end to end on this machine (the c1 targets' floor).
DURABLE_NOOP = "no-op + 4 KiB append + fsync per call"
BASELINE_BATCH = "baseline batch 1000 (no-op grpc.aio)"
SQLITE_REALTIME = "AllocateTurnId realtime, SQLite"
CLIENT_ASYNC_SQLITE = "client AsyncTurnIdClient, SQLite"
CLIENT_ASYNC_MEMORY = "client AsyncTurnIdClient, memory:"
CLIENT_SYNC_SQLITE = "client TurnIdClient, threads, SQLite"
PG_REALTIME = "AllocateTurnId realtime, PostgreSQL"
# The rows of --curve: calls/s and p99 against concurrency.
CURVE_ROWS = (BASELINE, SQLITE_REALTIME, CLIENT_ASYNC_SQLITE)
CLIENT_MODES = ("client-async", "client-sync")


@dataclass
class Scenario:
    name: str
    # "baseline", "baseline+fsync" (DURABLE_NOOP) or a database URL ("sqlite" gets a fresh
    # temp file)
    server: str
    rpc: str = "allocate"  # or "batch"
    kind: int = REALTIME
    workers: int = 1
    mode: str = "stub"  # loadgen --mode: stub, watch, client-async, client-sync
    watchers: int = 0  # WatchTurns streams held open (bench/watchers.py), the row's threads first
    metrics: bool = False  # serve with --metrics-listen 127.0.0.1:0
    compare: str = ""  # a row the notes compare this one with (the same but for one thing)
    rss: bool = False  # measure RSS around RSS_ALLOCATIONS allocations after the trials
    # More `turnid serve` processes on the row's database (PostgreSQL: the same schema) that
    # nobody calls or watches; their CPU per allocation of the row is in the notes.
    idle_replicas: int = 0
    skip: str = ""  # why the row is not run


@dataclass
class Result:
    scenario: Scenario
    c1: dict[str, float] = field(default_factory=dict)
    c32: dict[str, float] = field(default_factory=dict)
    c1_trials: list[dict[str, Any]] = field(default_factory=list)
    c32_trials: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _one_line(text: object, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --- servers ----------------------------------------------------------------------------------


class Server:
    """A server subprocess; `target` once it logs `serving on HOST:PORT`."""

    def __init__(self, scenario: Scenario, workdir: Path) -> None:
        self.log_path = workdir / f"{_slug(scenario.name)}.log"
        database = scenario.server
        if database == "sqlite":
            database = f"sqlite://{workdir / (self.log_path.stem + '.db')}"
        # A PostgreSQL row's server gets a schema of its own, dropped when it stops.
        self.postgres: tuple[str, str] | None = None
        if database.startswith("postgres"):
            schema = f"turnid_bench_{os.getpid()}_{_slug(scenario.name).replace('-', '_')}"
            try:
                database, self.postgres = postgres_schema(database, schema), (database, schema)
            except Exception as error:  # the server will say why it cannot use the database
                print(f"… no schema of its own: {_one_line(error)}", file=sys.stderr)
        self.database = database
        if scenario.server.startswith("baseline"):
            command = [PYTHON, str(BENCH / "baseline_server.py"), "--listen", "127.0.0.1:0"]
            if scenario.server == "baseline+fsync":  # beside the SQLite rows' files
                command += ["--fsync-dir", str(workdir)]
        else:
            command = [*TURNID, "serve", "--listen", "127.0.0.1:0", "--database", database]
            command += ["--grace", "5", "--drain", "0"]
            if scenario.workers > 1:
                command += ["--workers", str(scenario.workers)]
            if scenario.metrics:
                command += ["--metrics-listen", "127.0.0.1:0"]
        # --workers N: the parent's line comes once every worker serves.
        self._ready = r"serving on (\S+:\d+)" + (" with" if scenario.workers > 1 else "")
        self._log = self.log_path.open("w+")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self.target = ""
        self.replicas: list[subprocess.Popen[bytes]] = []
        self.replica_logs: list[Path] = []
        for index in range(scenario.idle_replicas):
            replica_log = workdir / f"{self.log_path.stem}-replica{index + 1}.log"
            self.replica_logs.append(replica_log)
            with replica_log.open("w") as out:  # the child keeps its own descriptor
                self.replicas.append(
                    subprocess.Popen(
                        [*TURNID, "serve", "--listen", "127.0.0.1:0", "--database", database],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

    def wait_serving(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(self._ready, self.log_path.read_text())
            replicas_ready = all("serving on" in log.read_text() for log in self.replica_logs)
            if found and replicas_ready:
                self.target = found.group(1)
                return self.target
            if any(p.poll() is not None for p in (self.process, *self.replicas)):
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not start: {self.log_path.read_text()[-2000:]}")

    def metrics_url(self) -> str | None:
        found = re.search(r"metrics on (http://\S+/metrics)", self.log_path.read_text())
        return found.group(1) if found else None

    def pids(self) -> list[int]:
        """The server process and its children (the workers of `--workers N`)."""
        pids, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(child) for child in children)
        return pids

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.pids())

    def replica_cpu_seconds(self) -> float:
        """The idle replicas' CPU, all together."""
        return _cpu_seconds([replica.pid for replica in self.replicas])

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            found = re.search(r"VmRSS:\s+(\d+) kB", status)
            total += int(found.group(1)) if found else 0
        return total / 1024

    def stop(self) -> str:
        """SIGTERM, wait, and return the server's log."""
        for replica in self.replicas:  # before the schema goes
            replica.terminate()
        for replica in self.replicas:
            try:
                replica.wait(30)
            except subprocess.TimeoutExpired:
                replica.kill()
                replica.wait()
        self.replicas = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self._log.closed:
            self._log.close()
        if self.postgres is not None:
            dsn, schema = self.postgres
            self.postgres = None
            try:
                postgres_schema(dsn, schema, drop=True)
            except Exception as error:  # the figures stand; say what is left behind
                print(f"… could not drop schema {schema}: {_one_line(error)}", file=sys.stderr)
        return self.log_path.read_text()


def _read_json_line(proc: subprocess.Popen[str], timeout: float, log: Path) -> dict[str, Any]:
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], max(0.0, timeout))[0]:
        raise RuntimeError(f"no answer within {timeout:.0f} s; {_tail(log)}")
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"exited with status {proc.returncode}; {_tail(log)}")
    reply: dict[str, Any] = json.loads(line)
    return reply


def _tail(log: Path) -> str:
    try:
        text = log.read_text().strip()
    except OSError:
        return ""
    text = " ".join(text.split())
    return f"its stderr ends: …{text[-200:]}" if text else "nothing on its stderr"


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None and not proc.stdin.closed:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Watchers:
    """bench/watchers.py: `count` open WatchTurns streams on threads PREFIX-t0 ...."""

    def __init__(self, target: str, prefix: str, count: int, workdir: Path) -> None:
        self.log_path = workdir / f"watchers-{prefix}.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    *(PYTHON, str(BENCH / "watchers.py"), "--target", target),
                    *("--thread-prefix", prefix, "--count", str(count)),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
            )

    def wait_ready(self) -> None:
        _read_json_line(self.proc, 60.0, self.log_path)

    def close(self) -> dict[str, Any]:
        """Close the streams; what they delivered."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
            stats = _read_json_line(self.proc, 30.0, self.log_path)
        except (RuntimeError, OSError, ValueError) as error:
            stats = {"error": _one_line(error)}
        _end(self.proc)
        return stats


# --- load generators --------------------------------------------------------------------------


class Load:
    """`processes` loadgen processes, `concurrency` calls in flight between them.

    The client modes run in one process (one client shared by every task or thread).
    """

    def __init__(
        self,
        target: str,
        scenario: Scenario,
        concurrency: int,
        processes: int,
        channels: int,
        tag: str,
        workdir: Path,
        thread_prefix: str = "",
        client_options: Sequence[str] = (),
    ) -> None:
        if scenario.mode in CLIENT_MODES:
            processes = 1
        self.procs = []
        self.logs = []
        offset = 0
        for index in range(processes):
            share = concurrency // processes + (index < concurrency % processes)
            command = [PYTHON, str(BENCH / "loadgen.py"), "--target", target]
            command += ["--mode", scenario.mode, "--rpc", scenario.rpc]
            command += ["--kind", str(scenario.kind), "--concurrency", str(share)]
            command += ["--channels", str(min(channels, share)), "--tag", f"{tag}-p{index}"]
            if thread_prefix:
                command += ["--thread-prefix", thread_prefix, "--thread-offset", str(offset)]
            if scenario.mode in CLIENT_MODES:
                for option in client_options:
                    command += ["--client-option", option]
            offset += share
            log_path = workdir / f"loadgen-{tag}-{_slug(scenario.name)}-p{index}.log"
            self.logs.append(log_path)
            with log_path.open("w") as log:
                self.procs.append(
                    subprocess.Popen(
                        command,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=log,
                        text=True,
                        bufsize=1,
                    )
                )
        self.warmup_calls = 0
        self.ready: list[dict[str, Any]] = []

    def wait_ready(self) -> None:
        """After connecting and warming up: how many calls the warm-up made."""
        self.ready = self._replies(120.0)
        self.warmup_calls = sum(int(ready["warmup_calls"]) for ready in self.ready)

    def _replies(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [
            _read_json_line(proc, deadline - time.monotonic(), log)
            for proc, log in zip(self.procs, self.logs, strict=True)
        ]

    def trial(self, **command: float) -> dict[str, Any]:
        """Run one trial in every process at once; merge their figures."""
        for proc in self.procs:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # the reply says why
                proc.stdin.write(json.dumps(command) + "\n")
        replies = self._replies(600.0)
        latencies = sorted(lat for reply in replies for lat in reply["latencies_us"])
        calls = sum(reply["calls"] for reply in replies)
        elapsed = max(reply["elapsed"] for reply in replies)
        merged = {
            "calls": calls,
            "errors": sum(reply["errors"] for reply in replies),
            "elapsed_s": elapsed,
            "calls_per_s": calls / elapsed,
            "p50_ms": _percentile(latencies, 0.50) / 1000,
            "p99_ms": _percentile(latencies, 0.99) / 1000,
        }
        if any("watch_us" in reply for reply in replies):
            delays = sorted(d for reply in replies for d in reply.get("watch_us", ()))
            merged["watch_p50_ms"] = _percentile(delays, 0.50) / 1000
            merged["watch_p99_ms"] = _percentile(delays, 0.99) / 1000
        return merged

    def cpu_seconds(self) -> float:
        return _cpu_seconds([proc.pid for proc in self.procs])

    def close(self) -> None:
        for proc in self.procs:
            _end(proc)


def _cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes so far (from /proc; gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return total


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return float(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))])


def _median_of(trials: list[dict[str, Any]]) -> dict[str, float]:
    if not trials:
        return {}
    keys = (
        "calls_per_s",
        "p50_ms",
        "p99_ms",
        "cpu_us_per_call",
        "load_cpu_us_per_call",
        "server_cores",
        "load_cores",
        "watch_p50_ms",
        "watch_p99_ms",
        "idle_replica_cpu_us_per_call",
    )
    summary = {
        key: statistics.median(trial[key] for trial in trials) for key in keys if key in trials[0]
    }
    summary["errors"] = sum(t["errors"] for t in trials)
    summary["calls"] = sum(t["calls"] for t in trials)
    return summary


# --- fsync ------------------------------------------------------------------------------------


def fsync_sample(directory: Path, count: int) -> list[float]:
    """µs per 4 KiB append + fsync() to a file in `directory` (where the SQLite files are)."""
    block = os.urandom(FSYNC_BLOCK)
    fd = os.open(directory / "fsync-probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter_ns()
            os.write(fd, block)
            os.fsync(fd)
            samples.append((time.perf_counter_ns() - started) / 1000)
    finally:
        os.close(fd)
    return samples


def filesystem(path: Path) -> str:
    """The file system `path` is on: "TYPE (DEVICE) at MOUNT POINT"."""
    path = path.resolve()
    best = ("", "?", "?")
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "?"
    for line in mounts:
        device, mount_point, fs_type = [*line.split(), "", "", ""][:3]
        mount_point = mount_point.replace("\\040", " ")
        if path.is_relative_to(mount_point) and len(mount_point) >= len(best[0]):
            best = (mount_point, fs_type, device)
    return f"{best[1]} ({best[2]}) at {best[0]}"


def _fsync_summary(samples: list[float], workdir: Path) -> dict[str, Any]:
    ordered = sorted(samples)
    return {
        "samples": len(ordered),
        "bytes": FSYNC_BLOCK,
        "p50_ms": _percentile(ordered, 0.50) / 1000,
        "p99_ms": _percentile(ordered, 0.99) / 1000,
        "max_ms": (ordered[-1] / 1000) if ordered else float("nan"),
        "directory": str(workdir.parent),
        "filesystem": filesystem(workdir),
    }


# --- all rows, interleaved ----------------------------------------------------------------


_Fail = Callable[["Result", str], None]


class _Run:
    """One bench run: the live rows, their servers and helpers; a row that fails is dropped."""

    def __init__(self, results: list[Result], args: argparse.Namespace, workdir: Path, tag: str):
        self.args, self.workdir, self.tag = args, workdir, tag
        self.live = [r for r in results if not r.scenario.skip]
        self.servers = {id(r): Server(r.scenario, workdir) for r in self.live}
        self.watchers: dict[int, Watchers] = {}
        # Rows with watchers allocate on fixed thread ids, which the watchers open first.
        self.prefixes = {
            id(r): f"{tag}-w{index}" for index, r in enumerate(self.live) if r.scenario.watchers
        }
        self.c1_calls = dict.fromkeys(self.servers, 0)
        self.acknowledged = dict.fromkeys(self.servers, 0)  # allocations, warm-ups included
        self.fsync: list[float] = []

    def drop(self, result: Result, why: object) -> None:
        result.scenario.skip = _one_line(why)
        result.c1_trials.clear()
        result.c32_trials.clear()
        if result in self.live:
            self.live.remove(result)
        print(f"… skipped {result.scenario.name}: {result.scenario.skip}", file=sys.stderr)

    def start(self) -> None:
        for r in list(self.live):
            try:
                self.servers[id(r)].wait_serving()
            except RuntimeError as error:  # e.g. PostgreSQL down: report the row, run the rest
                self.drop(r, error)
        for r in list(self.live):
            if not r.scenario.watchers:
                continue
            watchers = Watchers(
                self.servers[id(r)].target,
                self.prefixes[id(r)],
                r.scenario.watchers,
                self.workdir,
            )
            try:
                watchers.wait_ready()
            except RuntimeError as error:
                watchers.close()
                self.drop(r, f"watchers did not start: {error}")
                continue
            self.watchers[id(r)] = watchers

    def loads(
        self, rows: list[Result], concurrency: int, phase: str, fail: _Fail | None = None
    ) -> dict[int, Load]:
        args = self.args
        fail = fail or self.drop
        loads = {
            id(r): Load(
                self.servers[id(r)].target,
                r.scenario,
                concurrency,
                1 if concurrency == 1 else args.clients,
                args.channels,
                f"{self.tag}-{phase}",
                self.workdir,
                thread_prefix=self.prefixes.get(id(r), ""),
                client_options=args.client_option,
            )
            for r in rows
        }
        for r in list(rows):
            load = loads[id(r)]
            try:
                load.wait_ready()
            except (RuntimeError, ValueError, KeyError) as error:
                load.close()
                del loads[id(r)]
                fail(r, f"load generator ({phase}) failed: {error}")
                continue
            self.acknowledged[id(r)] += load.warmup_calls
            client = next((ready["client"] for ready in load.ready if "client" in ready), None)
            if client is not None:
                r.extra.setdefault("client", {})[phase] = client
        return loads

    def trial(
        self, r: Result, load: Load, fail: _Fail | None = None, **command: float
    ) -> dict[str, Any] | None:
        server = self.servers[id(r)]
        cpu_before, load_before = server.cpu_seconds(), load.cpu_seconds()
        replicas_before = server.replica_cpu_seconds()
        try:
            trial = load.trial(**command)
        except (RuntimeError, ValueError, KeyError) as error:
            (fail or self.drop)(r, f"load generator failed: {error}")
            return None
        # The load processes' CPU too: with server and load on the same cores, how many of the
        # cores each used tells a CPU-bound row from one bound by latency.
        used, load_used = server.cpu_seconds() - cpu_before, load.cpu_seconds() - load_before
        calls, elapsed = max(1, trial["calls"]), max(1e-9, trial["elapsed_s"])
        trial["cpu_us_per_call"] = used / calls * 1e6
        trial["load_cpu_us_per_call"] = load_used / calls * 1e6
        trial["server_cores"] = used / elapsed
        trial["load_cores"] = load_used / elapsed
        if server.replicas:
            idle_used = server.replica_cpu_seconds() - replicas_before
            trial["idle_replica_cpu_us_per_call"] = idle_used / len(server.replicas) / calls * 1e6
        self.acknowledged[id(r)] += trial["calls"]
        return trial

    def phase(self, concurrency: int, seconds: float, phase: str) -> dict[int, Load]:
        """`--trials` interleaved rounds of every live row at `concurrency`."""
        args = self.args
        loads = self.loads(list(self.live), concurrency, phase)
        for key, load in loads.items():
            if concurrency == 1:
                self.c1_calls[key] += load.warmup_calls
        fsync_each = max(1, -(-args.fsyncs // args.trials))
        for _ in range(args.trials):
            for r in list(self.live):
                trial = self.trial(r, loads[id(r)], seconds=seconds)
                if trial is None:
                    loads.pop(id(r)).close()
                    continue
                if concurrency == 1:
                    r.c1_trials.append(trial)
                    self.c1_calls[id(r)] += trial["calls"]
                else:
                    r.c32_trials.append(trial)
            if concurrency == 1:  # between rounds, while the servers are idle
                self.fsync.extend(fsync_sample(self.workdir, fsync_each))
        return loads

    def rss(self, loads: dict[int, Load]) -> None:
        for r in list(self.live):
            if not r.scenario.rss or id(r) not in loads:
                continue
            print(f"… RSS over {RSS_ALLOCATIONS:,} allocations", file=sys.stderr, flush=True)
            server = self.servers[id(r)]
            before = server.rss_mb()
            try:
                done = loads[id(r)].trial(
                    calls=RSS_ALLOCATIONS // self.args.clients, seconds=self.args.rss_seconds
                )
            except RuntimeError as error:
                r.extra["rss"] = {"error": _one_line(error)}
                continue
            r.extra["rss"] = {
                "allocations": done["calls"],
                "errors": done["errors"],
                "seconds": done["elapsed_s"],
                "before_mb": before,
                "after_mb": server.rss_mb(),
            }

    def scrape_metrics(self) -> None:
        for r in self.live:
            if not r.scenario.metrics:
                continue
            url = self.servers[id(r)].metrics_url()
            if url is None:
                r.extra["metrics_scrape"] = {"error": "no 'metrics on http://...' in the log"}
                continue
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    text = response.read().decode()
            except OSError as error:
                r.extra["metrics_scrape"] = {"url": url, "error": _one_line(error)}
                continue
            samples = [line for line in text.splitlines() if line and not line.startswith("#")]
            allocated = sum(
                float(line.rsplit(" ", 1)[1])
                for line in samples
                if line.startswith("grpc_server_handled_total{")
                and 'grpc_method="AllocateTurnId"' in line
            )
            r.extra["metrics_scrape"] = {
                "url": url,
                "samples": len(samples),
                "allocate_calls_counted": allocated,
            }

    def close_watchers(self) -> None:
        for key, watchers in list(self.watchers.items()):
            stats = watchers.close()
            del self.watchers[key]
            result = next((r for r in self.live if id(r) == key), None)
            if result is not None:
                result.extra["watchers"] = {
                    "count": result.scenario.watchers,
                    "acknowledged": self.acknowledged[key],
                    **stats,
                }

    def curve(self) -> dict[str, list[dict[str, Any]]]:
        """calls/s, p50/p99 and server CPU per call of the CURVE_ROWS at each concurrency."""
        args = self.args
        rows = [r for name in CURVE_ROWS for r in self.live if r.scenario.name == name]
        levels = [int(level) for level in args.curve_levels.split(",") if level.strip()]
        curve: dict[str, list[dict[str, Any]]] = {r.scenario.name: [] for r in rows}

        def failed(r: Result, why: str) -> None:  # a point of the curve, not the row
            curve[r.scenario.name].append({"concurrency": level, "error": _one_line(why)})
            print(f"… curve: {r.scenario.name}: {_one_line(why)}", file=sys.stderr)

        for level in levels:
            print(f"… curve: concurrency {level}", file=sys.stderr, flush=True)
            loads = self.loads(rows, level, f"k{level}", failed)
            trials: dict[int, list[dict[str, Any]]] = {key: [] for key in loads}
            for _ in range(args.curve_trials):
                for r in rows:
                    if id(r) not in loads:
                        continue
                    trial = self.trial(r, loads[id(r)], failed, seconds=args.curve_seconds)
                    if trial is None:
                        loads.pop(id(r)).close()
                        continue
                    trials[id(r)].append(trial)
            for load in loads.values():
                load.close()
            for r in rows:
                if trials.get(id(r)):
                    curve[r.scenario.name].append(
                        {"concurrency": level, **_median_of(trials[id(r)])}
                    )
        return curve

    def stop(self) -> dict[int, str]:
        self.close_watchers()
        return {key: server.stop() for key, server in self.servers.items()}


def run_all(
    results: list[Result], args: argparse.Namespace, workdir: Path, tag: str
) -> dict[str, Any]:
    """Every row's server runs for the whole bench; trials go round-robin over the rows.

    Each round runs one trial of every row, so a burst of load from elsewhere on the machine
    hits all rows alike, and each row's ratio to the baseline is taken within a round (then the
    median over rounds). Returns the fsync figures and (with --curve) the curve.
    """
    run = _Run(results, args, workdir, tag)
    extra: dict[str, Any] = {}
    try:
        run.start()
        print("… concurrency 1", file=sys.stderr, flush=True)
        for load in run.phase(1, args.c1_seconds, "c1").values():
            load.close()
        print("… concurrency 32", file=sys.stderr, flush=True)
        loads = run.phase(32, args.c32_seconds, "c32")
        run.close_watchers()
        run.scrape_metrics()
        run.rss(loads)
        for load in loads.values():
            load.close()
        if args.curve:
            extra["curve"] = run.curve()
    finally:
        logs = run.stop()
    extra["fsync"] = _fsync_summary(run.fsync, workdir)

    live = run.live
    for r in live:
        r.c1 = _median_of(r.c1_trials)
        r.c32 = _median_of(r.c32_trials)
        _group_commit(r, logs[id(r)], run.c1_calls[id(r)])
        if re.search(r"Traceback|ERROR", logs[id(r)]):
            r.extra["server_log_tail"] = logs[id(r)][-2000:]
    by_name = {r.scenario.name: r for r in live}
    for r in live:
        base = next(
            (
                b
                for b in live
                if b.scenario.server == "baseline" and b.scenario.rpc == r.scenario.rpc
            ),
            None,
        )
        if base is not None and r.c32_trials and r.c1_trials:
            r.extra["ratio_per_round"] = [
                t["calls_per_s"] / b["calls_per_s"]
                for t, b in zip(r.c32_trials, base.c32_trials, strict=True)
            ]
            r.extra["ratio"] = statistics.median(r.extra["ratio_per_round"])
            r.extra["cpu_ratio"] = base.c32["cpu_us_per_call"] / r.c32["cpu_us_per_call"]
            r.extra["c1_p50_delta_ms"] = statistics.median(
                t["p50_ms"] - b["p50_ms"] for t, b in zip(r.c1_trials, base.c1_trials, strict=True)
            )
        other = by_name.get(r.scenario.compare)
        if other is not None and r.c32_trials:
            pairs = list(zip(r.c32_trials, other.c32_trials, strict=True))
            r.extra["vs"] = {
                "row": other.scenario.name,
                "ratio": statistics.median(t["calls_per_s"] / o["calls_per_s"] for t, o in pairs),
                "cpu_us_delta": statistics.median(
                    t["cpu_us_per_call"] - o["cpu_us_per_call"] for t, o in pairs
                ),
                "cpu_ratio": other.c32["cpu_us_per_call"] / r.c32["cpu_us_per_call"],
            }
    return extra


def _group_commit(result: Result, log: str, c1_calls: int) -> None:
    stats = re.findall(r"(\d+) allocations in (\d+) commits", log)  # one line per worker
    if not stats or not result.c32:
        return
    # Every commit at concurrency 1 holds exactly one allocation, so what remains is the
    # concurrency-32 phase: allocations per commit there is the group-commit size.
    allocations = sum(int(a) for a, _ in stats) - c1_calls
    commits = sum(int(c) for _, c in stats) - c1_calls
    per_commit = allocations / max(1, commits)
    result.extra["group_commit"] = {
        "allocations": allocations,
        "commits": commits,
        "allocations_per_commit": per_commit,
        "allocations_per_s": result.c32["calls_per_s"],
        "commits_per_s": result.c32["calls_per_s"] / per_commit,
    }


# --- the table --------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _client_note(result: Result) -> str:
    client = result.extra.get("client", {})
    info = client.get("c32") or client.get("c1")
    if not info:
        return ""
    who = "32 tasks" if info["class"] == "AsyncTurnIdClient" else "32 OS threads"
    methods = ", ".join(f"{name} {count}" for name, count in info["probe_rpcs"].items())
    note = (
        f"one {info['class']} shared by {who} in one process; coalesced: "
        f"{'yes' if info['coalesced'] else 'no'} ({info['rpcs_per_allocation']:.2f} RPCs per "
        f"allocate() when {info['probe_allocations'] // 3} are in flight: {methods or 'none'})"
    )
    if info.get("options"):
        note += f"; client options {json.dumps(info['options'])}"
    if info.get("attributes"):
        note += f"; client {json.dumps(info['attributes'])}"
    return note


def _notes(result: Result, ids_per_call: int) -> str:
    notes = []
    client = _client_note(result)
    if client:
        notes.append(client)
    if "server_cores" in result.c32:
        notes.append(
            f"cores at c32: server {result.c32['server_cores']:.2f}, load "
            f"{result.c32['load_cores']:.2f} ({result.c32['load_cpu_us_per_call']:,.0f} µs per "
            "call) of " + str(os.cpu_count())
        )
    if "watch_p50_ms" in result.c1 or "watch_p50_ms" in result.c32:
        shown = [
            f"{label} {_ms(figures['watch_p50_ms'])} / {_ms(figures['watch_p99_ms'])}"
            for label, figures in (("c1", result.c1), ("c32", result.c32))
            if "watch_p50_ms" in figures
        ]
        notes.append(
            f"acknowledged → the thread's watcher has it, p50 / p99 ms: {', '.join(shown)} "
            "(negative: the watcher had it first; each slot waits for its watcher)"
        )
    if result.scenario.idle_replicas:
        idle = result.c32.get("idle_replica_cpu_us_per_call")
        notes.append(
            f"{result.scenario.idle_replicas} more replicas on its schema, idle (nobody calls "
            "or watches them): "
            + (f"{idle:,.1f} µs of CPU each per allocation at c32" if idle is not None else "?")
        )
    watchers = result.extra.get("watchers")
    if watchers:
        delivered = watchers.get("turns")
        notes.append(
            f"{watchers['count']} watchers open throughout (c1 and c32), "
            + (
                f"delivered {delivered:,} of {watchers['acknowledged']:,} turns"
                if delivered is not None
                else f"watchers failed: {watchers.get('error', '?')}"
            )
        )
    vs = result.extra.get("vs")
    if vs:
        notes.append(
            f"{vs['ratio']:.2f} x the calls/s of '{vs['row']}' (per round), server CPU "
            f"{vs['cpu_us_delta']:+.1f} µs/call"
        )
    scrape = result.extra.get("metrics_scrape")
    if scrape:
        notes.append(
            f"/metrics: {scrape['samples']:,} samples, "
            f"{scrape['allocate_calls_counted']:,.0f} AllocateTurnId calls counted"
            if "samples" in scrape
            else f"/metrics not scraped: {scrape['error']}"
        )
    if ids_per_call > 1:
        notes.append(f"{result.c32['calls_per_s'] * ids_per_call:,.0f} ids/s")
    group = result.extra.get("group_commit")
    if group:
        notes.append(
            f"{group['commits_per_s']:,.0f} commits/s for {group['allocations_per_s']:,.0f} "
            f"allocations/s ({group['allocations_per_commit']:.1f} per commit)"
        )
    rss = result.extra.get("rss")
    if rss and "error" in rss:
        notes.append(f"RSS run failed: {rss['error']}")
    elif rss:
        notes.append(
            f"RSS {rss['before_mb']:.1f} → {rss['after_mb']:.1f} MB "
            f"({rss['after_mb'] - rss['before_mb']:+.1f}) over {rss['allocations']:,} allocations"
        )
    errors = result.c1.get("errors", 0) + result.c32.get("errors", 0)
    if errors:
        notes.append(f"**{errors:.0f} errors**")
    if "server_log_tail" in result.extra:
        notes.append("**the server logged errors** (see the JSON)")
    return "; ".join(notes)


def table(
    results: list[Result],
    minting: dict[str, Any],
    fsync: dict[str, Any],
    floor: dict[str, Any] | None = None,
    sqlite_floor: dict[str, Any] | None = None,
) -> str:
    lines = [
        "| row | calls/s c32 | x baseline | x baseline CPU | p50 / p99 c1 (ms) "
        "| p50 / p99 c32 (ms) | server CPU µs/call | notes |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
        f"| fsync: {fsync['bytes'] // 1024} KiB append + fsync | | | "
        f"| {_ms(fsync['p50_ms'])} / {_ms(fsync['p99_ms'])} | | "
        f"| {fsync['samples']} fsyncs between the c1 rounds, in the SQLite rows' temp dir "
        f"({fsync['directory']}: {fsync['filesystem']}); max {_ms(fsync['max_ms'])} ms |",
    ]
    for result in results:
        scenario = result.scenario
        if scenario.skip:
            lines.append(f"| {scenario.name} | - | - | - | - | - | - | skipped: {scenario.skip} |")
            continue
        ratio, cpu_ratio = result.extra.get("ratio"), result.extra.get("cpu_ratio")
        ids_per_call = 1000 if scenario.rpc == "batch" else 1
        lines.append(
            f"| {scenario.name} | {result.c32['calls_per_s']:,.0f} "
            f"| {'-' if ratio is None else f'{ratio:.2f}'} "
            f"| {'-' if cpu_ratio is None else f'{cpu_ratio:.2f}'} "
            f"| {_ms(result.c1['p50_ms'])} / {_ms(result.c1['p99_ms'])} "
            f"| {_ms(result.c32['p50_ms'])} / {_ms(result.c32['p99_ms'])} "
            f"| {result.c32['cpu_us_per_call']:,.0f} | {_notes(result, ids_per_call)} |"
        )
    if sqlite_floor is not None:
        lone, group = sqlite_floor["lone"], sqlite_floor["group"]
        lines.append(
            f"| floor: the SQL of a SQLite group commit, no service | | | "
            f"| {_ms(lone['wall_us'] / 1000)} | | {lone['cpu_us']:,.0f} "
            f"| a plain sqlite3 loop on the store's file and settings (bench/sqlite_floor.py), "
            f"beside the SQLite rows' files: BEGIN IMMEDIATE, prefetch, 3 multi-row inserts, "
            f"COMMIT; a lone allocation {lone['wall_us']:,.0f} µs wall, {lone['cpu_us']:,.0f} "
            f"µs CPU; a group of {group['allocations']} on {group['allocations']} threads "
            f"{group['wall_us']:,.0f} µs wall, {group['cpu_us'] / group['allocations']:,.0f} "
            f"µs CPU per allocation |"
        )
    if floor is not None:
        lines.append(
            f"| floor: answering {floor['turns']:,} fresh turns, no store | | | | | "
            f"| {_floor_us(floor):,.0f} | in-process CPU µs per response beyond the no-op batch's "
            f"canned one: building it from the allocation's TurnRun "
            f"{floor['build_and_serialize_us']:,.0f} (serializing the canned one "
            f"{floor['serialize_canned_us']:,.0f}), minting its ids {floor['mint_us']:,.0f} |"
        )
    for name, figures in minting.items():
        lines.append(
            f"| minting: {name} | {figures['ids_per_s']:,.0f} ids/s | | | | | "
            f"| {figures['ns_per_id']:.0f} ns/id; last id {figures['ahead_of_clock_ms']:,} ms "
            f"ahead of the clock after {figures['ids']:,} ids; strictly increasing: "
            f"{'yes' if figures['strictly_increasing'] else 'NO'} |"
        )
    return "\n".join(lines)


# --- the targets ------------------------------------------------------------------------------


def _floor_us(floor: dict[str, Any]) -> float:
    """Server CPU per call that a fresh 1000-turn answer costs over the no-op's canned one."""
    return float(floor["build_and_serialize_us"] - floor["serialize_canned_us"] + floor["mint_us"])


def targets(
    results: list[Result],
    fsync: dict[str, Any],
    floor: dict[str, Any] | None = None,
    sqlite_floor: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every target whose row this run selected: what was measured, met or not."""
    selected = {r.scenario.name: r for r in results}
    checks: list[dict[str, Any]] = []

    def check(target: str, names: Sequence[str], evaluate: Callable[..., tuple[str, bool]]) -> None:
        rows = [selected.get(name) for name in names]
        if any(r is None for r in rows):  # not selected by --only
            return
        skipped = [r for r in rows if r is not None and (r.scenario.skip or not r.c32)]
        if skipped:
            why = "; ".join(
                f"{r.scenario.name}: {r.scenario.skip or 'no figures'}" for r in skipped
            )
            checks.append({"target": target, "measured": f"not measured ({why})", "met": None})
            return
        try:
            measured, met = evaluate(*rows)
        except KeyError as missing:  # e.g. no baseline row in this run
            measured, met = f"not measured (no {missing.args[0]} in this run)", None
        checks.append({"target": target, "measured": measured, "met": met})

    for kind in ("realtime", "compaction"):
        check(
            f"unary AllocateTurnId {kind} on SQLite at c32 ≥ 0.8 x baseline, in throughput "
            "and in server CPU per call",
            [f"AllocateTurnId {kind}, SQLite"],
            lambda r: (
                f"{r.extra['ratio']:.2f} x throughput, {r.extra['cpu_ratio']:.2f} x CPU",
                r.extra["ratio"] >= 0.8 and r.extra["cpu_ratio"] >= 0.8,
            ),
        )
    check(
        "client AsyncTurnIdClient c32 (32 tasks, one client) ≥ 4 x baseline calls/s, with server "
        "CPU per allocation ≤ 0.25 x baseline's per call",
        [CLIENT_ASYNC_SQLITE],
        lambda r: (
            f"{r.extra['ratio']:.2f} x calls/s, server CPU per allocation "
            f"{1 / r.extra['cpu_ratio']:.2f} x baseline's ({_coalesced(r)})"
            + _without_store(selected.get(CLIENT_ASYNC_MEMORY)),
            r.extra["ratio"] >= 4 and 1 / r.extra["cpu_ratio"] <= 0.25,
        ),
    )
    check(
        "client TurnIdClient from 32 threads (one client) ≥ 2 x baseline calls/s",
        [CLIENT_SYNC_SQLITE],
        lambda r: (f"{r.extra['ratio']:.2f} x ({_coalesced(r)})", r.extra["ratio"] >= 2),
    )
    limit = 1.25 * fsync["p50_ms"] + 0.1
    for name in (
        "AllocateTurnId realtime, SQLite",
        "AllocateTurnId compaction, SQLite",
        CLIENT_ASYNC_SQLITE,
        CLIENT_SYNC_SQLITE,
    ):
        check(
            f"p50 at c1 ≤ baseline p50 + 1.25 x fsync p50 + 0.1 ms ({name})",
            [name],
            lambda r, limit=limit: (
                f"+{r.extra['c1_p50_delta_ms']:.2f} ms (limit +{limit:.2f} ms: fsync p50 "
                f"{fsync['p50_ms']:.2f} ms)"
                + _durable_bound(selected.get(DURABLE_NOOP))
                + _sqlite_bound(sqlite_floor),
                r.extra["c1_p50_delta_ms"] <= limit,
            ),
        )
    check(
        "BatchAllocateTurnIds(1000) on SQLite ≥ 0.6 x the no-op batch's ids/s",
        ["BatchAllocateTurnIds 1000, SQLite", BASELINE_BATCH],
        lambda r, base: (
            f"{r.extra['ratio']:.2f} x ({r.c32['calls_per_s'] * 1000:,.0f} against "
            f"{base.c32['calls_per_s'] * 1000:,.0f} ids/s)" + _batch_bound(base, floor),
            r.extra["ratio"] >= 0.6,
        ),
    )
    for kind in ("realtime", "compaction"):
        check(
            f"unary AllocateTurnId {kind} on PostgreSQL ≥ 0.6 x baseline at c32",
            [f"AllocateTurnId {kind}, PostgreSQL"],
            lambda r: (f"{r.extra['ratio']:.2f} x", r.extra["ratio"] >= 0.6),
        )
    check(
        "client AsyncTurnIdClient on PostgreSQL ≥ 2 x baseline at c32",
        ["client AsyncTurnIdClient, PostgreSQL"],
        lambda r: (f"{r.extra['ratio']:.2f} x ({_coalesced(r)})", r.extra["ratio"] >= 2),
    )
    for row, result in selected.items():
        rss = result.extra.get("rss")
        what = f"RSS growth ≤ 20 MB over {RSS_ALLOCATIONS:,} allocations ({row})"
        if rss and rss.get("allocations", 0) >= RSS_ALLOCATIONS:
            growth = rss["after_mb"] - rss["before_mb"]
            checks.append({"target": what, "measured": f"{growth:+.1f} MB", "met": growth <= 20})
        elif rss:
            checks.append(
                {
                    "target": what,
                    "measured": rss.get("error")
                    or f"not measured: only {rss['allocations']:,} allocations within "
                    "--rss-seconds",
                    "met": None,
                }
            )
    return checks


def _batch_bound(base: Result, floor: dict[str, Any] | None) -> str:
    """What the batch floor allows: the no-op batch's CPU per call over that plus the floor."""
    if floor is None:
        return ""
    noop = base.c32["cpu_us_per_call"]
    bound = noop / (noop + _floor_us(floor))
    return (
        f"; the floor alone (a fresh answer, no store: +{_floor_us(floor):,.0f} µs of CPU "
        f"per call over the no-op's {noop:,.0f}) allows at most {bound:.2f} x"
    )


def _without_store(memory: Result | None) -> str:
    """The same client row on the memory store: the client path where no commit waits."""
    if memory is None or "ratio" not in memory.extra:
        return ""
    return (
        f"; on the memory store, the same client: {memory.extra['ratio']:.2f} x calls/s, "
        f"{1 / memory.extra['cpu_ratio']:.2f} x CPU"
    )


def _durable_bound(durable: Result | None) -> str:
    """What the no-op pays at c1 for one fsync per call (the DURABLE_NOOP row)."""
    if durable is None or "c1_p50_delta_ms" not in durable.extra:
        return ""
    return f"; the no-op with one fsync per call: +{durable.extra['c1_p50_delta_ms']:.2f} ms"


def _sqlite_bound(sqlite_floor: dict[str, Any] | None) -> str:
    """What the SQL of one allocation's transaction takes alone (the SQLite floor row)."""
    if sqlite_floor is None:
        return ""
    lone = sqlite_floor["lone"]
    return (
        f"; its SQL alone in a plain sqlite3 loop: {lone['wall_us'] / 1000:.2f} ms, "
        f"{lone['cpu_us'] / 1000:.2f} ms of it CPU"
    )


def _coalesced(result: Result) -> str:
    info = result.extra.get("client", {}).get("c32")
    if not info:
        return "coalescing unknown"
    return "coalesced" if info["coalesced"] else "not coalesced: one RPC per allocate()"


def targets_table(checks: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | |", "|---|---|---|"]
    for item in checks:
        verdict = {True: "met", False: "**not met**", None: "not measured"}[item["met"]]
        lines.append(f"| {item['target']} | {item['measured']} | {verdict} |")
    return "\n".join(lines)


# --- the curve --------------------------------------------------------------------------------


def curve_table(curve: dict[str, list[dict[str, Any]]]) -> str:
    names = list(curve)
    levels = sorted({p["concurrency"] for points in curve.values() for p in points})
    lines = [
        "| concurrency | " + " | ".join(f"{name}: calls/s, p99 ms" for name in names) + " |",
        "|--:|" + "--:|" * len(names),
    ]
    for level in levels:
        cells = []
        for name in names:
            point = next((p for p in curve[name] if p["concurrency"] == level), None)
            if point is None or "calls_per_s" not in point:
                cells.append("-")
            else:
                cells.append(f"{point['calls_per_s']:,.0f}, {_ms(point['p99_ms'])}")
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(curve: dict[str, list[dict[str, Any]]], path: Path, title: str) -> str:
    """Write the SVG; what happened, in one line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot, figures in JSON"
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    levels: set[int] = set()
    for name, points in curve.items():
        points = [p for p in points if "calls_per_s" in p]
        xs = [p["concurrency"] for p in points]
        levels.update(xs)
        left.plot(xs, [p["calls_per_s"] for p in points], marker="o", label=name)
        right.plot(xs, [p["p99_ms"] for p in points], marker="o", label=name)
    for axes, label in ((left, "calls/s"), (right, "p99 latency (ms)")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(sorted(levels), [str(level) for level in sorted(levels)])
        axes.set_xlabel("calls in flight (concurrency)")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format=path.suffix.lstrip(".") or "svg")
    plt.close(figure)
    return f"curve: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"


# --- main -------------------------------------------------------------------------------------


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    dsn = os.environ.get("TURNID_BENCH_POSTGRES_DSN") or os.environ.get("TURNID_TEST_POSTGRES_DSN")
    skip = ""
    if not dsn:
        skip = "set TURNID_BENCH_POSTGRES_DSN to include PostgreSQL"
    elif importlib.util.find_spec("turnid.service.stores.postgres") is None:
        skip = "the PostgreSQL store is not built yet"
    pg = dsn or ""
    rows = [
        Scenario(BASELINE, "baseline"),
        Scenario(DURABLE_NOOP, "baseline+fsync"),
        Scenario("AllocateTurnId realtime, memory:", "memory:"),
        Scenario("AllocateTurnId compaction, memory:", "memory:", kind=COMPACTION),
        Scenario(SQLITE_REALTIME, "sqlite", rss=not args.no_rss),
        Scenario("AllocateTurnId compaction, SQLite", "sqlite", kind=COMPACTION),
        Scenario(
            "AllocateTurnId realtime, SQLite, --metrics-listen",
            "sqlite",
            metrics=True,
            compare=SQLITE_REALTIME,
        ),
        Scenario(
            f"AllocateTurnId realtime, SQLite, {args.watchers} watchers",
            "sqlite",
            watchers=args.watchers,
            compare=SQLITE_REALTIME,
        ),
        Scenario(
            f"AllocateTurnId realtime, SQLite, --workers {args.workers}",
            "sqlite",
            workers=args.workers,
        ),
        Scenario(CLIENT_ASYNC_MEMORY, "memory:", mode="client-async"),
        Scenario(CLIENT_ASYNC_SQLITE, "sqlite", mode="client-async"),
        Scenario(CLIENT_SYNC_SQLITE, "sqlite", mode="client-sync"),
        Scenario("WatchTurns delivery, SQLite", "sqlite", mode="watch"),
        Scenario(PG_REALTIME, pg, skip=skip),
        Scenario("AllocateTurnId compaction, PostgreSQL", pg, kind=COMPACTION, skip=skip),
        Scenario(
            "AllocateTurnId realtime, PostgreSQL, 2 idle replicas",
            pg,
            idle_replicas=2,
            compare=PG_REALTIME,
            skip=skip,
        ),
        Scenario("client AsyncTurnIdClient, PostgreSQL", pg, mode="client-async", skip=skip),
        Scenario("WatchTurns delivery, PostgreSQL", pg, mode="watch", skip=skip),
        Scenario(BASELINE_BATCH, "baseline", rpc="batch"),
        Scenario("BatchAllocateTurnIds 1000, SQLite", "sqlite", rpc="batch"),
        Scenario("BatchAllocateTurnIds 1000, PostgreSQL", pg, rpc="batch", skip=skip),
    ]
    if args.only:
        rows = [row for row in rows if re.search(args.only, row.name, re.IGNORECASE)]
    return rows


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else ""
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _figures(what: str, script: str, *args: str) -> Any:
    """The JSON object that one of the in-process bench scripts prints."""
    print(f"… {what}", file=sys.stderr, flush=True)
    command = [PYTHON, str(BENCH / script), *args]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="turnid benchmark (make bench)")
    parser.add_argument("--trials", type=int, default=5, help="rounds of trials (median)")
    parser.add_argument("--c1-seconds", type=float, default=0.6, help="length of a c1 trial")
    parser.add_argument("--c32-seconds", type=float, default=1.5, help="length of a c32 trial")
    parser.add_argument(
        "--rss-seconds",
        type=float,
        default=300.0,
        help="time limit of the RSS run (it ends at 200,000 allocations: ~140 s at 1,450/s)",
    )
    parser.add_argument("--clients", type=int, default=1, help="load generator processes")
    parser.add_argument("--channels", type=int, default=4, help="connections per generator")
    parser.add_argument("--workers", type=int, default=2, help="--workers for the scaling row")
    parser.add_argument(
        "--watchers", type=int, default=100, help="open watchers of the watchers row (≥ 32)"
    )
    parser.add_argument(
        "--fsyncs", type=int, default=300, help="4 KiB append + fsync samples, over the rounds"
    )
    parser.add_argument(
        "--client-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword for the client rows' client constructor (VALUE as JSON, else a string), "
        "e.g. to compare a client setting; repeatable",
    )
    parser.add_argument("--no-rss", action="store_true", help="skip the 200,000-allocation RSS run")
    parser.add_argument(
        "--curve",
        action="store_true",
        help="also measure calls/s and p99 at each --curve-levels for the baseline, unary SQLite "
        "and the async client; SVG plot in bench/results/ if matplotlib is installed "
        "(about 2 more minutes)",
    )
    parser.add_argument("--curve-levels", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--curve-trials", type=int, default=3, help="rounds at each level")
    parser.add_argument("--curve-seconds", type=float, default=1.0, help="length of a trial")
    parser.add_argument("--only", help="regex: run only the rows it matches")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/bench-*.json)")
    args = parser.parse_args(argv)
    if args.watchers < 32:
        parser.error("--watchers must be at least 32 (the allocating threads are among them)")

    started = time.monotonic()
    tag = f"bench{int(time.time())}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = [Result(scenario) for scenario in scenarios(args)]
    with tempfile.TemporaryDirectory(prefix="turnid-bench-") as tmp:
        extra = run_all(results, args, Path(tmp), tag)
        minting = _figures("minting", "minting.py")
        sqlite_floor = None
        if any(r.scenario.server == "sqlite" for r in results):
            sqlite_floor = _figures("SQLite floor", "sqlite_floor.py", "--dir", tmp)
        floor = None
        if any(r.scenario.rpc == "batch" for r in results):
            floor = _figures("batch floor", "batch_floor.py")
    fsync = extra["fsync"]
    checks = targets(results, fsync, floor, sqlite_floor)
    out = args.out or BENCH / "results" / f"bench-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = {
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": time.monotonic() - started,
        "fsync": fsync,
        "rows": [
            {
                "name": r.scenario.name,
                "scenario": vars(r.scenario),
                "c1": r.c1,
                "c32": r.c32,
                **r.extra,
            }
            for r in results
        ],
        "minting": minting,
        "batch_floor": floor,
        "sqlite_floor": sqlite_floor,
        "targets": checks,
    }
    if "curve" in extra:
        raw["curve"] = extra["curve"]
    out.write_text(json.dumps(raw, indent=2) + "\n")

    info = raw["machine"]
    heading = (
        f"turnid bench: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}; "
        f"median of {args.trials} interleaved rounds; c32 = 32 calls in flight from {args.clients} "
        f"load-generator process(es) over {args.channels} connections each (client rows: one "
        "process, one client)"
    )
    print(heading + "\n")
    print(table(results, minting, fsync, floor, sqlite_floor))
    print("\n**Targets** (this run):\n")
    print(targets_table(checks))
    if "curve" in extra and not any(extra["curve"].values()):
        print(f"\ncurve: none of its rows ran ({', '.join(CURVE_ROWS)}; see --only)")
    elif "curve" in extra:
        print(f"\n**Concurrency curve** (median of {args.curve_trials} rounds per level):\n")
        print(curve_table(extra["curve"]))
        title = f"turnid: calls/s and p99 against concurrency ({info['nproc']} CPUs, {stamp})"
        print("\n" + plot_curve(extra["curve"], BENCH / "results" / f"curve-{stamp}.svg", title))
    print(f"\nraw figures: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"took {raw['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
