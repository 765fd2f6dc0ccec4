"""`make bench`: turnid against the ceiling that Python gRPC itself sets, on this machine, now.

Every row is a server in its own subprocess (`turnid serve`, or bench/baseline_server.py: a no-op
grpc.aio TurnIdService with canned responses of the same shape) driven by the same load generator
(bench/loadgen.py, grpc.aio) in separate processes:

- concurrency 1: one call in flight; p50/p99 latency;
- concurrency 32: 32 calls in flight over several connections; throughput, p50/p99 latency and
  the server's CPU time per call (user + system, all worker processes), which is the figure least
  disturbed by whatever else runs on the machine.

Trials are short and interleaved: each of `--trials` rounds runs one trial of every row, and a
row's figures are medians over the rounds. Service rows show their throughput as a ratio to the
baseline row with the same RPC, taken within each round (then the median). Also: in-process minting
(bench/minting.py), resident memory of a SQLite server around 200,000 allocations, and SQLite
commits/s vs allocations/s (the group commit). Prints one markdown table, writes all raw figures
as JSON (default bench/results/bench-<time>.json) and prints its path.

PostgreSQL rows run when TURNID_BENCH_POSTGRES_DSN (or TURNID_TEST_POSTGRES_DSN) is set and the
PostgreSQL store is installed; otherwise they are listed as skipped with the reason.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
_TURNID_SCRIPT = Path(PYTHON).parent / "turnid"
TURNID = [str(_TURNID_SCRIPT)] if _TURNID_SCRIPT.exists() else [PYTHON, "-m", "turnid.service.cli"]
REALTIME, COMPACTION = 1, 2
RSS_ALLOCATIONS = 200_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Scenario:
    name: str
    server: str  # "baseline" or a database URL ("sqlite" gets a fresh temp file)
    rpc: str = "allocate"  # or "batch"
    kind: int = REALTIME
    workers: int = 1
    rss: bool = False  # measure RSS around RSS_ALLOCATIONS allocations after the trials
    skip: str = ""  # why the row is not run


@dataclass
class Result:
    scenario: Scenario
    c1: dict[str, float] = field(default_factory=dict)
    c32: dict[str, float] = field(default_factory=dict)
    c1_trials: list[dict[str, Any]] = field(default_factory=list)
    c32_trials: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# --- servers ----------------------------------------------------------------------------------


class Server:
    """A server subprocess; `target` once it logs `serving on HOST:PORT`."""

    def __init__(self, scenario: Scenario, workdir: Path) -> None:
        self.log_path = workdir / f"{re.sub(r'[^a-z0-9]+', '-', scenario.name.lower())}.log"
        database = scenario.server
        if database == "sqlite":
            database = f"sqlite://{workdir / (self.log_path.stem + '.db')}"
        self.database = database
        if scenario.server == "baseline":
            command = [PYTHON, str(BENCH / "baseline_server.py"), "--listen", "127.0.0.1:0"]
        else:
            command = [*TURNID, "serve", "--listen", "127.0.0.1:0", "--database", database]
            command += ["--grace", "5", "--drain", "0"]
            if scenario.workers > 1:
                command += ["--workers", str(scenario.workers)]
        # --workers N: the parent's line comes once every worker serves.
        self._ready = r"serving on (\S+:\d+)" + (" with" if scenario.workers > 1 else "")
        self._log = self.log_path.open("w+")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self.target = ""

    def wait_serving(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(self._ready, self.log_path.read_text())
            if found:
                self.target = found.group(1)
                return self.target
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not start: {self.log_path.read_text()[-2000:]}")

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
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
        return total

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
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.log_path.read_text()


# --- load generators --------------------------------------------------------------------------


class Load:
    """`processes` loadgen processes, `concurrency` calls in flight between them."""

    def __init__(
        self,
        target: str,
        scenario: Scenario,
        concurrency: int,
        processes: int,
        channels: int,
        tag: str,
    ) -> None:
        self.procs = []
        for index in range(processes):
            share = concurrency // processes + (index < concurrency % processes)
            command = [
                PYTHON,
                str(BENCH / "loadgen.py"),
                "--target",
                target,
                "--rpc",
                scenario.rpc,
                "--kind",
                str(scenario.kind),
                "--concurrency",
                str(share),
                "--channels",
                str(min(channels, share)),
                "--tag",
                f"{tag}-p{index}",
            ]
            self.procs.append(
                subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
                )
            )
        self.warmup_calls = 0

    def wait_ready(self) -> None:
        """After connecting and warming up: how many calls the warm-up made."""
        self.warmup_calls = sum(int(ready["warmup_calls"]) for ready in self._replies(120.0))

    def _replies(self, timeout: float) -> list[dict[str, Any]]:
        replies = []
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            assert proc.stdout is not None
            remaining = deadline - time.monotonic()
            if not select.select([proc.stdout], [], [], max(0.0, remaining))[0]:
                raise RuntimeError("load generator did not answer")
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("load generator exited")
            replies.append(json.loads(line))
        return replies

    def trial(self, **command: float) -> dict[str, Any]:
        """Run one trial in every process at once; merge their figures."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(command) + "\n")
        replies = self._replies(600.0)
        latencies = sorted(lat for reply in replies for lat in reply["latencies_us"])
        calls = sum(reply["calls"] for reply in replies)
        elapsed = max(reply["elapsed"] for reply in replies)
        return {
            "calls": calls,
            "errors": sum(reply["errors"] for reply in replies),
            "elapsed_s": elapsed,
            "calls_per_s": calls / elapsed,
            "p50_ms": _percentile(latencies, 0.50) / 1000,
            "p99_ms": _percentile(latencies, 0.99) / 1000,
        }

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            proc.wait(30)


def _percentile(ordered: Sequence[int], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return float(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))])


def _median_of(trials: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("calls_per_s", "p50_ms", "p99_ms", "cpu_us_per_call")
    summary = {
        key: statistics.median(trial[key] for trial in trials) for key in keys if key in trials[0]
    }
    summary["errors"] = sum(t["errors"] for t in trials)
    summary["calls"] = sum(t["calls"] for t in trials)
    return summary


# --- all rows, interleaved ----------------------------------------------------------------


def run_all(results: list[Result], args: argparse.Namespace, workdir: Path, tag: str) -> None:
    """Every row's server runs for the whole bench; trials go round-robin over the rows.

    Each round runs one trial of every row, so a burst of load from elsewhere on the machine
    hits all rows alike, and each row's ratio to the baseline is taken within a round (then the
    median over rounds).
    """
    live = [r for r in results if not r.scenario.skip]
    servers = {id(r): Server(r.scenario, workdir) for r in live}
    c1_calls = dict.fromkeys(servers, 0)
    try:
        for r in list(live):
            try:
                servers[id(r)].wait_serving()
            except RuntimeError as error:  # e.g. PostgreSQL down: report the row, run the rest
                r.scenario.skip = " ".join(str(error).split())[:300]
                live.remove(r)
                del servers[id(r)], c1_calls[id(r)]

        print("… concurrency 1", file=sys.stderr, flush=True)
        loads = {id(r): Load(servers[id(r)].target, r.scenario, 1, 1, 1, f"{tag}-c1") for r in live}
        for key, load in loads.items():
            load.wait_ready()
            c1_calls[key] += load.warmup_calls
        for _ in range(args.trials):
            for r in live:
                trial = loads[id(r)].trial(seconds=args.c1_seconds)
                r.c1_trials.append(trial)
                c1_calls[id(r)] += trial["calls"]
        for load in loads.values():
            load.close()

        print("… concurrency 32", file=sys.stderr, flush=True)
        loads = {
            id(r): Load(
                servers[id(r)].target, r.scenario, 32, args.clients, args.channels, f"{tag}-c32"
            )
            for r in live
        }
        for load in loads.values():
            load.wait_ready()
        for _ in range(args.trials):
            for r in live:
                server = servers[id(r)]
                cpu_before = server.cpu_seconds()
                trial = loads[id(r)].trial(seconds=args.c32_seconds)
                trial["cpu_us_per_call"] = (
                    (server.cpu_seconds() - cpu_before) / max(1, trial["calls"]) * 1e6
                )
                r.c32_trials.append(trial)

        for r in live:
            if r.scenario.rss:
                print(f"… RSS over {RSS_ALLOCATIONS:,} allocations", file=sys.stderr, flush=True)
                server = servers[id(r)]
                before = server.rss_mb()
                done = loads[id(r)].trial(
                    calls=RSS_ALLOCATIONS // args.clients, seconds=args.rss_seconds
                )
                r.extra["rss"] = {
                    "allocations": done["calls"],
                    "errors": done["errors"],
                    "seconds": done["elapsed_s"],
                    "before_mb": before,
                    "after_mb": server.rss_mb(),
                }
        for load in loads.values():
            load.close()
    finally:
        logs = {key: server.stop() for key, server in servers.items()}

    for r in live:
        r.c1 = _median_of(r.c1_trials)
        r.c32 = _median_of(r.c32_trials)
        _group_commit(r, logs[id(r)], c1_calls[id(r)])
        if re.search(r"Traceback|ERROR", logs[id(r)]):
            r.extra["server_log_tail"] = logs[id(r)][-2000:]
    for r in live:
        base = next(
            (
                b
                for b in live
                if b.scenario.server == "baseline" and b.scenario.rpc == r.scenario.rpc
            ),
            None,
        )
        if base is not None:
            r.extra["ratio_per_round"] = [
                t["calls_per_s"] / b["calls_per_s"]
                for t, b in zip(r.c32_trials, base.c32_trials, strict=True)
            ]
            r.extra["ratio"] = statistics.median(r.extra["ratio_per_round"])
            r.extra["cpu_ratio"] = base.c32["cpu_us_per_call"] / r.c32["cpu_us_per_call"]
            r.extra["c1_p50_delta_ms"] = statistics.median(
                t["p50_ms"] - b["p50_ms"] for t, b in zip(r.c1_trials, base.c1_trials, strict=True)
            )


def _group_commit(result: Result, log: str, c1_calls: int) -> None:
    stats = re.findall(r"(\d+) allocations in (\d+) commits", log)  # one line per worker
    if not stats:
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


def _notes(result: Result, ids_per_call: int) -> str:
    notes = []
    if ids_per_call > 1:
        notes.append(f"{result.c32['calls_per_s'] * ids_per_call:,.0f} ids/s")
    group = result.extra.get("group_commit")
    if group:
        notes.append(
            f"{group['commits_per_s']:,.0f} commits/s for {group['allocations_per_s']:,.0f} "
            f"allocations/s ({group['allocations_per_commit']:.1f} per commit)"
        )
    rss = result.extra.get("rss")
    if rss:
        notes.append(
            f"RSS {rss['before_mb']:.1f} → {rss['after_mb']:.1f} MB "
            f"(+{rss['after_mb'] - rss['before_mb']:.1f}) over {rss['allocations']:,} allocations"
        )
    errors = result.c1.get("errors", 0) + result.c32.get("errors", 0)
    if errors:
        notes.append(f"**{errors:.0f} errors**")
    return "; ".join(notes)


def table(results: list[Result], minting: dict[str, Any]) -> str:
    lines = [
        "| row | calls/s c32 | x baseline | x baseline CPU | p50 / p99 c1 (ms) "
        "| p50 / p99 c32 (ms) | server CPU µs/call | notes |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
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
    for name, figures in minting.items():
        lines.append(
            f"| minting: {name} | {figures['ids_per_s']:,.0f} ids/s | | | | | "
            f"| {figures['ns_per_id']:.0f} ns/id; last id {figures['ahead_of_clock_ms']:,} ms "
            f"ahead of the clock after {figures['ids']:,} ids; strictly increasing: "
            f"{'yes' if figures['strictly_increasing'] else 'NO'} |"
        )
    return "\n".join(lines)


def targets(results: list[Result]) -> list[dict[str, Any]]:
    rows = {r.scenario.name: r for r in results if r.c32}
    checks: list[dict[str, Any]] = []

    def check(what: str, row: str, value: Any, goal: float, shown: str, higher: bool) -> None:
        if row not in rows:
            return
        value = value(rows[row])
        met = value >= goal if higher else value <= goal
        checks.append(
            {"target": what, "value": value, "goal": goal, "met": met, "shown": shown % value}
        )

    for kind, goal in (("realtime", 0.9), ("compaction", 0.8)):
        check(
            f"unary {kind} on SQLite FULL >= {goal} x baseline throughput at c32",
            f"AllocateTurnId {kind}, SQLite",
            lambda r: r.extra["ratio"],
            goal,
            "%.2fx",
            True,
        )
    check(
        "batch allocation on SQLite >= 100,000 ids/s",
        "BatchAllocateTurnIds 1000, SQLite",
        lambda r: r.c32["calls_per_s"] * 1000,
        100_000,
        "%.0f ids/s",
        True,
    )
    for kind in ("realtime", "compaction"):
        check(
            f"p50 at c1 <= baseline + 0.5 ms ({kind}, SQLite)",
            f"AllocateTurnId {kind}, SQLite",
            lambda r: r.extra["c1_p50_delta_ms"],
            0.5,
            "+%.2f ms",
            False,
        )
    for row, result in rows.items():
        rss = result.extra.get("rss")
        if rss and rss["allocations"] >= RSS_ALLOCATIONS:
            check(
                f"RSS growth <= 20 MB over {RSS_ALLOCATIONS:,} allocations",
                row,
                lambda r: r.extra["rss"]["after_mb"] - r.extra["rss"]["before_mb"],
                20.0,
                "+%.1f MB",
                False,
            )
        elif rss:
            checks.append(
                {
                    "target": f"RSS growth <= 20 MB over {RSS_ALLOCATIONS:,} allocations",
                    "met": False,
                    "shown": f"not measured: only {rss['allocations']:,} allocations "
                    f"within --rss-seconds",
                }
            )
    return checks


# --- main -------------------------------------------------------------------------------------


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    rows = [
        Scenario("baseline (no-op grpc.aio)", "baseline"),
        Scenario("AllocateTurnId realtime, memory:", "memory:"),
        Scenario("AllocateTurnId compaction, memory:", "memory:", kind=COMPACTION),
        Scenario("AllocateTurnId realtime, SQLite", "sqlite", rss=not args.no_rss),
        Scenario("AllocateTurnId compaction, SQLite", "sqlite", kind=COMPACTION),
        Scenario(
            f"AllocateTurnId realtime, SQLite, --workers {args.workers}",
            "sqlite",
            workers=args.workers,
        ),
    ]
    dsn = os.environ.get("TURNID_BENCH_POSTGRES_DSN") or os.environ.get("TURNID_TEST_POSTGRES_DSN")
    skip = ""
    if not dsn:
        skip = "set TURNID_BENCH_POSTGRES_DSN to include PostgreSQL"
    elif importlib.util.find_spec("turnid.service.stores.postgres") is None:
        skip = "the PostgreSQL store is not built yet"
    rows += [
        Scenario("AllocateTurnId realtime, PostgreSQL", dsn or "", skip=skip),
        Scenario("AllocateTurnId compaction, PostgreSQL", dsn or "", kind=COMPACTION, skip=skip),
        Scenario("baseline batch 1000 (no-op grpc.aio)", "baseline", rpc="batch"),
        Scenario("BatchAllocateTurnIds 1000, SQLite", "sqlite", rpc="batch"),
        Scenario("BatchAllocateTurnIds 1000, PostgreSQL", dsn or "", rpc="batch", skip=skip),
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="turnid benchmark (make bench)")
    parser.add_argument("--trials", type=int, default=5, help="rounds of trials (median)")
    parser.add_argument("--c1-seconds", type=float, default=0.6, help="length of a c1 trial")
    parser.add_argument("--c32-seconds", type=float, default=1.5, help="length of a c32 trial")
    parser.add_argument(
        "--rss-seconds", type=float, default=120.0, help="time limit of the RSS run"
    )
    parser.add_argument("--clients", type=int, default=1, help="load generator processes")
    parser.add_argument("--channels", type=int, default=4, help="connections per generator")
    parser.add_argument("--workers", type=int, default=2, help="--workers for the scaling row")
    parser.add_argument("--no-rss", action="store_true", help="skip the 200,000-allocation RSS run")
    parser.add_argument("--only", help="regex: run only the rows it matches")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/bench-*.json)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    tag = f"bench{int(time.time())}"
    results = [Result(scenario) for scenario in scenarios(args)]
    with tempfile.TemporaryDirectory(prefix="turnid-bench-") as tmp:
        run_all(results, args, Path(tmp), tag)
        print("… minting", file=sys.stderr, flush=True)
        minting = json.loads(
            subprocess.run(
                [PYTHON, str(BENCH / "minting.py")], check=True, capture_output=True, text=True
            ).stdout
        )
    checks = targets(results)
    out = args.out or BENCH / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = {
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": time.monotonic() - started,
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
        "targets": checks,
    }
    out.write_text(json.dumps(raw, indent=2) + "\n")

    info = raw["machine"]
    print(
        f"turnid bench: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}; "
        f"median of {args.trials} interleaved rounds; c32 = 32 calls in flight from {args.clients} "
        f"load-generator process(es) over {args.channels} connections each\n"
    )
    print(table(results, minting))
    print()
    for check in checks:
        print(f"- {'met' if check['met'] else 'NOT met'}: {check['target']} ({check['shown']})")
    print(f"\nraw figures: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"took {raw['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
