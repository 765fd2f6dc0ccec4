"""A/B harness for unary AllocateTurnId on SQLite FULL (issue 13), against the no-op baseline.

    python bench/profile_unary.py --variant A=/path/to/old/checkout --variant B=. [--kind 2]
    python bench/profile_unary.py --rpc batch ...   (BatchAllocateTurnIds of 1,000 instead)
    python bench/profile_unary.py --mode client-async ...   (through the Python client instead)

Each variant is a source tree (its `service/` and `client/` go first on PYTHONPATH) whose
`turnid serve` runs on a fresh SQLite file (with `--postgres DSN`: in a fresh schema of that
PostgreSQL database, dropped at the end); the no-op baseline (bench/baseline_server.py) runs
alongside. Every server is driven by bench/loadgen.py. Rounds are interleaved (one trial of every
server per round), and each round reports, per server, the server's CPU per call (user + sys
of the server process, from /proc) at c=1 and c=32, p50 at c=1 and calls/s at c=32, plus the
ratios to the baseline of the same round. The fsync latency of the file system under the
database is measured between rounds (4 KiB pwrite + fsync, median), for the c=1 target:
p50 <= baseline + 1.25 x fsync + 0.1 ms.

`--strace` instead runs a c=1 trial per variant under `strace -f -c -e fsync,fdatasync,pwrite64`
and prints the syscall counts per call.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from postgres_schema import postgres_schema

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(
        self,
        name: str,
        tree: str | None,
        workdir: Path,
        strace: Path | None,
        postgres: str | None = None,
    ) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        self.postgres = postgres if tree is not None else None
        self.schema = f"turnid_profile_{os.getpid()}_{re.sub(r'[^a-z0-9]', '_', name.lower())}"
        env = dict(os.environ)
        if tree is None:
            command = [PYTHON, str(BENCH / "baseline_server.py"), "--listen", "127.0.0.1:0"]
        else:
            root = Path(tree).resolve()
            env["PYTHONPATH"] = f"{root / 'service'}:{root / 'client'}"
            database = f"sqlite://{workdir / (name + '.db')}"
            if postgres is not None:
                database = postgres_schema(postgres, self.schema)
            command = [PYTHON, "-m", "turnid.service.cli", "serve", "--listen", "127.0.0.1:0"]
            command += ["--database", database, "--grace", "5", "--drain", "0"]
        if strace is not None:
            command = ["strace", "-f", "-c", "-o", str(strace), *command]
        self._out = self.log.open("w+")
        self.process = subprocess.Popen(
            command, stdout=self._out, stderr=subprocess.STDOUT, env=env
        )
        try:
            self.target = self._wait()
        except BaseException:  # a server that did not start leaves no schema behind
            self.process.kill()
            self.process.wait(30)
            self._out.close()
            if self.postgres is not None:
                postgres_schema(self.postgres, self.schema, drop=True)
            raise

    def _wait(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = re.search(r"serving on (\S+:\d+)", self.log.read_text())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start: {self.log.read_text()[-2000:]}")

    def cpu(self) -> float:
        pid = self.process.pid
        # Under strace the server is strace's child.
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        total = 0.0
        for p in [pid, *map(int, children)]:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        return total

    def group_commits(self) -> tuple[int, int] | None:
        """(allocations, commits) of the server's life, from its log line at close."""
        found = re.search(
            r"sqlite store closed: (\d+) allocations in (\d+) commits", self.log.read_text()
        )
        return (int(found.group(1)), int(found.group(2))) if found else None

    def stop(self) -> None:
        pid = self.process.pid
        # Under strace, stop the server (strace's child); strace then exits with it.
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            os.kill(int(child), 15)
        self.process.terminate()
        self.process.wait(30)
        self._out.close()
        if self.postgres is not None:
            postgres_schema(self.postgres, self.schema, drop=True)


class Load:
    def __init__(
        self,
        target: str,
        kind: int,
        concurrency: int,
        processes: int,
        rpc: str = "allocate",
        mode: str = "stub",
    ) -> None:
        self.procs = []
        if mode != "stub":  # as the bench's client rows: one process, one client
            processes = 1
        for index in range(processes):
            share = concurrency // processes + (index < concurrency % processes)
            command = [PYTHON, str(BENCH / "loadgen.py"), "--target", target, "--kind", str(kind)]
            command += ["--concurrency", str(share), "--channels", str(min(4, share))]
            command += ["--rpc", rpc, "--mode", mode]
            command += ["--tag", f"p{index}-{time.monotonic_ns()}"]
            self.procs.append(
                subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
                )
            )
        self.warmup_calls = sum(r.get("warmup_calls", 0) for r in self._replies())

    def _replies(self) -> list[dict[str, Any]]:
        out = []
        for proc in self.procs:
            assert proc.stdout is not None
            if not select.select([proc.stdout], [], [], 120)[0]:
                raise RuntimeError("load generator did not answer")
            out.append(json.loads(proc.stdout.readline()))
        return out

    def trial(self, seconds: float) -> dict[str, Any]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"seconds": seconds}) + "\n")
        replies = self._replies()
        latencies = sorted(lat for r in replies for lat in r["latencies_us"])
        calls = sum(r["calls"] for r in replies)
        return {
            "calls": calls,
            "errors": sum(r["errors"] for r in replies),
            "calls_per_s": calls / max(r["elapsed"] for r in replies),
            "p50_ms": latencies[len(latencies) // 2] / 1000 if latencies else float("nan"),
        }

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            proc.wait(30)


def fsync_ms(directory: Path, repeats: int = 100) -> float:
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        block = os.urandom(4096)
        times = []
        for i in range(repeats):
            os.pwrite(fd, block, (i % 16) * 4096)
            started = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times) * 1000


def measure(
    server: Server,
    kind: int,
    concurrency: int,
    seconds: float,
    rpc: str = "allocate",
    mode: str = "stub",
) -> dict[str, Any]:
    load = Load(server.target, kind, concurrency, 1 if concurrency == 1 else 2, rpc, mode)
    try:
        before = server.cpu()
        trial = load.trial(seconds)
        trial["cpu_us"] = (server.cpu() - before) / max(1, trial["calls"]) * 1e6
        trial["all_calls"] = trial["calls"] + load.warmup_calls
    finally:
        load.close()
    return trial


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], help="NAME=source tree")
    parser.add_argument("--kind", type=int, default=1, help="TurnKind number (1 realtime)")
    parser.add_argument(
        "--rpc", choices=["allocate", "batch"], default="allocate", help="batch: 1,000 per call"
    )
    parser.add_argument(
        "--mode",
        choices=["stub", "client-async", "client-sync"],
        default="stub",
        help="client-*: through the Python client (one process; the baseline has no client)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--c1-seconds", type=float, default=3.0)
    parser.add_argument("--c32-seconds", type=float, default=4.0)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--strace", action="store_true", help="count syscalls at c=1 instead")
    parser.add_argument(
        "--postgres", metavar="DSN", help="run the variants on PostgreSQL (a schema each)"
    )
    args = parser.parse_args()
    variants: list[tuple[str, str | None]] = [] if args.no_baseline else [("baseline", None)]
    variants += [(name, tree) for name, _, tree in (v.partition("=") for v in args.variant)]
    workdir = Path(tempfile.mkdtemp(prefix="turnid-profile-"))
    try:
        if args.strace:
            for name, tree in variants:
                counts = workdir / f"{name}.strace"
                server = Server(name, tree, workdir, counts)
                trial = measure(server, args.kind, 1, args.c1_seconds)
                server.stop()
                print(f"{name}: {trial['calls']} calls")
                for line in counts.read_text().splitlines():
                    parts = line.split()
                    if len(parts) >= 5 and parts[3].isdigit():
                        calls = int(parts[3])
                        print(f"  {parts[-1]:16} {calls / trial['calls']:6.2f} per call")
            return 0
        servers = {
            name: Server(name, tree, workdir, None, args.postgres) for name, tree in variants
        }
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        # Every call of a server's c=1 trials (and their warm-ups) commits alone: the rest of
        # its commits are the c=32 trials', for allocations per commit at c=32.
        alone = dict.fromkeys(servers, 0)
        fsyncs = []
        for round_ in range(args.rounds):
            fsyncs.append(fsync_ms(workdir))
            for name, server in servers.items():
                tree = dict(variants)[name]
                mode = "stub" if tree is None else args.mode  # the baseline: raw stubs
                c1 = measure(server, args.kind, 1, args.c1_seconds, args.rpc, mode)
                c32 = measure(server, args.kind, 32, args.c32_seconds, args.rpc, mode)
                alone[name] += c1["all_calls"]
                rows[name].append(
                    {
                        "p50_c1": c1["p50_ms"],
                        "cpu_c1": c1["cpu_us"],
                        "cps_c32": c32["calls_per_s"],
                        "cpu_c32": c32["cpu_us"],
                        "errors": c1["errors"] + c32["errors"],
                    }
                )
            print(f"round {round_ + 1}: fsync {fsyncs[-1]:.3f} ms", file=sys.stderr)
            for name in servers:
                r = rows[name][-1]
                print(
                    f"  {name:10} p50c1 {r['p50_c1']:.3f} ms  cpu c1 {r['cpu_c1']:4.0f} us  "
                    f"c32 {r['cps_c32']:6.0f}/s cpu {r['cpu_c32']:4.0f} us  err {r['errors']}",
                    file=sys.stderr,
                )
        per_commit = {}
        for name, server in servers.items():
            server.stop()
            counted = server.group_commits()
            if counted is not None and counted[1] > alone[name]:
                allocations, commits = counted[0] - alone[name], counted[1] - alone[name]
                per_commit[name] = f"{allocations / commits:.1f}"
        fs = statistics.median(fsyncs)
        print(f"\nmedians over {args.rounds} rounds; fsync {fs:.3f} ms (median)")
        print("| server | p50 c1 ms | - baseline | cpu/call c1 µs | calls/s c32 | x base | "
              "cpu/call c32 µs | x base CPU | allocations/commit c32 |")  # fmt: skip
        print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
        base = rows.get("baseline")
        for name, trials in rows.items():
            med = {k: statistics.median(t[k] for t in trials) for k in trials[0]}
            if base:
                dp50 = statistics.median(
                    t["p50_c1"] - b["p50_c1"] for t, b in zip(trials, base, strict=True)
                )
                xt = statistics.median(
                    t["cps_c32"] / b["cps_c32"] for t, b in zip(trials, base, strict=True)
                )
                xc = statistics.median(
                    b["cpu_c32"] / t["cpu_c32"] for t, b in zip(trials, base, strict=True)
                )
            else:
                dp50 = xt = xc = float("nan")
            print(
                f"| {name} | {med['p50_c1']:.3f} | {dp50:+.3f} | {med['cpu_c1']:.0f} | "
                f"{med['cps_c32']:.0f} | {xt:.2f} | {med['cpu_c32']:.0f} | {xc:.2f} | "
                f"{per_commit.get(name, '')} |"
            )
        print(f"c=1 target: p50 <= baseline + {1.25 * fs + 0.1:.3f} ms")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
