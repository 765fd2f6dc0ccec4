"""What metrics cost a call: `python bench/metrics_overhead.py [--rounds 7]`.

Rows (medians over rounds, in-process, one CPU-bound Python thread):

- `observe()`: the metrics observer's own cost per call (a CallRecord built once, observed N
  times; the loop's cost, measured with a no-op observer, is subtracted), for an OK
  AllocateTurnId, an OK batch and a failed call; once with the in-memory registry (one process)
  and once in a subprocess in prometheus-client's multiprocess mode (`--workers N`: values
  live in mmap'ed files);
- round trip: sequential AllocateTurnId calls over a real gRPC channel against an in-process
  `TurnIdServer` (memory: store), with and without the metrics observer, rounds interleaved;
  the difference is what a call pays end to end (building the CallRecord included).

Prints one markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

N_OBSERVE = 100_000
N_CALLS = 1_000


def _record(method: str, code: str, reason: str = "", count: int = 1) -> Any:
    from turnid.service.servicer import CallRecord

    return CallRecord(method, code, reason, "rid", "", 0.0007, "", None, kind=1, count=count)


def observer_ns(rounds: int) -> dict[str, float]:
    """Median ns per observe() call, net of the loop, for three kinds of call."""
    from turnid.service.metrics import Metrics

    metrics = Metrics()
    cases = {
        "OK AllocateTurnId": _record("AllocateTurnId", "OK"),
        "OK BatchAllocateTurnIds": _record("BatchAllocateTurnIds", "OK", count=10),
        "NOT_FOUND GetTurn": _record("GetTurn", "NOT_FOUND", "TURN_NOT_FOUND"),
        "UNAVAILABLE AllocateTurnId": _record("AllocateTurnId", "UNAVAILABLE", "STORE_UNAVAILABLE"),
    }

    def noop(record: Any) -> None:
        pass

    def run(observer: Any, record: Any) -> float:
        started = time.perf_counter_ns()
        for _ in range(N_OBSERVE):
            observer(record)
        return (time.perf_counter_ns() - started) / N_OBSERVE

    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, record in cases.items():
            base = run(noop, record)
            results[name].append(run(metrics.observe, record) - base)
    return {name: statistics.median(values) for name, values in results.items()}


async def round_trip_us(rounds: int) -> tuple[float, float]:
    """Median µs per sequential AllocateTurnId, without and with the metrics observer."""
    import grpc

    from turnid.service.config import ServerConfig
    from turnid.service.metrics import Metrics
    from turnid.service.server import TurnIdServer
    from turnid.v1 import turnid_pb2 as pb
    from turnid.v1 import turnid_pb2_grpc as pb_grpc

    server = TurnIdServer(ServerConfig(listen="127.0.0.1:0", database="memory:"))
    await server.start()
    metrics = Metrics()
    metrics.bind(server.servicer, server.store)
    servicer = server.servicer
    without: list[float] = []
    with_metrics: list[float] = []
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TurnIdServiceStub(channel)
            request = pb.AllocateTurnIdRequest(
                thread_id="bench", kind=pb.TURN_KIND_REALTIME_DELEGATION
            )
            for _ in range(200):  # warm up the channel and the code paths
                await stub.AllocateTurnId(request)

            async def run() -> float:
                started = time.perf_counter()
                for _ in range(N_CALLS):
                    await stub.AllocateTurnId(request)
                return (time.perf_counter() - started) / N_CALLS * 1e6

            for index in range(rounds * 2):
                on = index % 2 == 1
                servicer.observers[:] = [metrics.observe] if on else []
                (with_metrics if on else without).append(await run())
    finally:
        await server.stop()
    return statistics.median(without), statistics.median(with_metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--observer-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.observer_only:  # the multiprocess-mode child: JSON on stdout
        print(json.dumps(observer_ns(args.rounds)))
        return

    single = observer_ns(args.rounds)
    with tempfile.TemporaryDirectory(prefix="turnid-bench-metrics-") as directory:
        child = subprocess.run(
            [sys.executable, __file__, "--observer-only", "--rounds", str(args.rounds)],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory},
            capture_output=True,
            text=True,
            check=True,
        )
    multi = json.loads(child.stdout)
    without, with_metrics = asyncio.run(round_trip_us(args.rounds))

    print(f"metrics overhead: medians of {args.rounds} rounds, Python {sys.version.split()[0]}\n")
    print("| measurement | one process | `--workers` (multiprocess files) |")
    print("|---|---:|---:|")
    for name in single:
        print(f"| observe(), {name} | {single[name] / 1000:.2f} µs | {multi[name] / 1000:.2f} µs |")
    print()
    print("| AllocateTurnId round trip (memory:, sequential) | µs per call |")
    print("|---|---:|")
    print(f"| without metrics | {without:.1f} |")
    print(f"| with metrics | {with_metrics:.1f} |")
    print(f"| difference | {with_metrics - without:+.1f} |")


if __name__ == "__main__":
    main()
