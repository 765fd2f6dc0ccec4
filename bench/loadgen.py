"""One load-generator process: `concurrency` calls in flight, by one of four modes.

- `stub` (default): raw grpc.aio stubs over `channels` connections;
- `watch`: the same, and every slot also watches its own thread (WatchTurns, raw stub): after
  each acknowledged allocation it waits until its watcher has the turn, and reports how long
  after the acknowledgement that was (`watch_us`; negative when the watcher got it first);
- `client-async`: the real Python client, one `AsyncTurnIdClient` shared by `concurrency` tasks;
- `client-sync`: the real Python client, one `TurnIdClient` shared by `concurrency` OS threads.

The client modes call `client.allocate()` exactly as an orchestrator does, so whatever the client
does behind it (unary calls today, coalescing once it lands) is what gets measured. Before the
warm-up they probe, with a second client of the same options carrying a counting interceptor,
how many RPCs `concurrency` concurrent allocate() calls take (`client` in the ready line).

Driven by bench/run.py over stdin/stdout, one JSON object per line, so that several processes can
start each trial at the same moment and stay connected (and warm) between trials:

    -> (start)                      <- {"ready": true, "warmup_calls": n, ...}   after warming up
    -> {"seconds": 2.0}             <- {"calls", "errors", "elapsed", "latencies_us", ...}
    -> {"calls": 100000}            <- the same, after this many calls instead of a time
    -> (EOF)                        exits

Every call allocates a new turn: each in-flight slot has its own conversation thread and sends a
fresh request_id, a UUIDv7 as the client library makes (so the store sees the keys an
orchestrator's calls bring: time-ordered). Baseline and service are driven by the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import grpc
import uuid_utils

from turnid.v1 import turnid_pb2, turnid_pb2_grpc

WATCH_TIMEOUT = 10.0  # seconds a slot waits for its watcher before it counts an error


def _thread_id(args: argparse.Namespace, prefix: str, index: int) -> str:
    if args.thread_prefix:  # fixed names, so that another process can watch them
        return f"{args.thread_prefix}-t{args.thread_offset + index}"
    return f"{prefix}-t{index}"


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    """`--client-option KEY=VALUE`: constructor keywords (VALUE as JSON, else a string)."""
    options: dict[str, Any] = {}
    for item in args.client_option:
        key, _, text = item.partition("=")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def _describe_client(client: object) -> dict[str, Any]:
    """Public attributes of the client whose names mention coalescing or batching."""
    found: dict[str, Any] = {}
    for name in dir(client):
        if name.startswith("_") or not any(w in name.lower() for w in ("coalesc", "batch")):
            continue
        try:
            value = getattr(client, name)
        except Exception:  # a property that cannot be read here
            continue
        if isinstance(value, bool | int | float | str | type(None)):
            found[name] = value
    return found


# --- a counting interceptor: how many RPCs the client sends for N allocate() calls -------------


# The stubs' interceptor classes are generic, gRPC's are not (no subscripts at runtime).
class _AioCounter(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    def __init__(self) -> None:
        self.methods: dict[str, int] = {}

    def _count(self, details: Any) -> None:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        name = method.rsplit("/", 1)[-1]
        self.methods[name] = self.methods.get(name, 0) + 1

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self._count(details)
        return await continuation(details, request)

    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self._count(details)
        return await continuation(details, request)

    async def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        self._count(details)
        return await continuation(details, request_iterator)

    async def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        self._count(details)
        return await continuation(details, request_iterator)


class _SyncCounter(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    def __init__(self) -> None:
        self.methods: dict[str, int] = {}
        self._lock = threading.Lock()

    def _count(self, details: Any) -> None:
        name = details.method.rsplit("/", 1)[-1]
        with self._lock:
            self.methods[name] = self.methods.get(name, 0) + 1

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self._count(details)
        return continuation(details, request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self._count(details)
        return continuation(details, request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        self._count(details)
        return continuation(details, request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        self._count(details)
        return continuation(details, request_iterator)


def _probe_report(methods: dict[str, int], allocations: int, errors: int) -> dict[str, Any]:
    rpcs = sum(count for name, count in methods.items() if name != "Check")
    return {
        "probe_allocations": allocations,
        "probe_errors": errors,
        "probe_rpcs": methods,
        "rpcs_per_allocation": rpcs / max(1, allocations),
        "coalesced": rpcs < allocations,
    }


# --- the asyncio modes ------------------------------------------------------------------------


async def _main(args: argparse.Namespace) -> None:
    prefix = f"{args.tag}-{os.getpid()}"
    watch_delays: list[int] = []  # watch mode: acknowledgement -> watcher, µs, this trial
    ready: dict[str, Any] = {"ready": True}
    channels: list[grpc.aio.Channel] = []
    client: Any = None
    watchers: list[_SlotWatcher] = []
    if args.mode == "client-async":
        from turnid.client import AsyncTurnIdClient, TurnKind

        options = _client_options(args)
        probe_counter = _AioCounter()
        async with AsyncTurnIdClient(
            args.target, interceptors=[cast(grpc.aio.ClientInterceptor, probe_counter)], **options
        ) as probe_client:
            errors = 0
            rounds = 3
            for round_ in range(rounds):
                outcomes = await asyncio.gather(
                    *(
                        probe_client.allocate(
                            f"{prefix}-probe-{i}",
                            TurnKind(args.kind),
                            request_id=f"{prefix}-probe-{round_}-{i}",
                        )
                        for i in range(args.concurrency)
                    ),
                    return_exceptions=True,
                )
                errors += sum(isinstance(o, BaseException) for o in outcomes)
        client = AsyncTurnIdClient(args.target, **options)
        ready["client"] = {
            "class": "AsyncTurnIdClient",
            "options": options,
            "attributes": _describe_client(client),
            **_probe_report(probe_counter.methods, rounds * args.concurrency, errors),
        }
        kind = TurnKind(args.kind)

        async def call(index: int, thread_id: str, request_id: str) -> None:
            await client.allocate(thread_id, kind, request_id=request_id)

    else:
        # A local subchannel pool gives every channel its own TCP connection, so that connections
        # spread over `turnid serve --workers N` processes (SO_REUSEPORT balances per connection).
        grpc_options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [
            grpc.aio.insecure_channel(args.target, options=grpc_options)
            for _ in range(args.channels)
        ]
        stubs = [turnid_pb2_grpc.TurnIdServiceStub(channel) for channel in channels]
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)

        async def call(index: int, thread_id: str, request_id: str) -> None:
            stub = stubs[index % len(stubs)]
            if args.rpc == "batch":
                await stub.BatchAllocateTurnIds(
                    turnid_pb2.BatchAllocateTurnIdsRequest(
                        thread_id=thread_id, kind=args.kind, count=args.count, request_id=request_id
                    )
                )
            elif args.mode == "watch":
                response = await stub.AllocateTurnId(
                    turnid_pb2.AllocateTurnIdRequest(
                        thread_id=thread_id, kind=args.kind, request_id=request_id
                    )
                )
                acked = time.perf_counter_ns()
                seen = await watchers[index].arrival(response.turn.sequence)
                watch_delays.append((seen - acked) // 1000)
            else:
                await stub.AllocateTurnId(
                    turnid_pb2.AllocateTurnIdRequest(
                        thread_id=thread_id, kind=args.kind, request_id=request_id
                    )
                )

        if args.mode == "watch":
            watchers = [
                _SlotWatcher(stubs[i % len(stubs)], _thread_id(args, prefix, i))
                for i in range(args.concurrency)
            ]
            await asyncio.wait_for(asyncio.gather(*(w.started for w in watchers)), 30)

    async def slot(
        index: int, stop_at: float, quota: list[int], stats: dict[str, int], latencies: list[int]
    ) -> None:
        thread_id = _thread_id(args, prefix, index)
        while quota[0] > 0 and time.perf_counter() < stop_at:
            quota[0] -= 1
            request_id = str(uuid_utils.uuid7())
            started = time.perf_counter_ns()
            try:
                await call(index, thread_id, request_id)
            except Exception as error:  # RPC errors, client errors, a watcher's timeout
                stats["errors"] += 1
                if stats["errors"] == 1:
                    print(f"loadgen: {type(error).__name__}: {error}", file=sys.stderr)
                continue
            latencies.append((time.perf_counter_ns() - started) // 1000)
            stats["calls"] += 1

    async def run(seconds: float, calls: int) -> dict[str, object]:
        latencies: list[int] = []
        watch_delays.clear()
        stats = {"calls": 0, "errors": 0}
        quota = [calls]  # calls left to start, shared by the slots
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(
            *(slot(i, stop_at, quota, stats, latencies) for i in range(args.concurrency))
        )
        elapsed = time.perf_counter() - started
        result: dict[str, object] = {**stats, "elapsed": elapsed, "latencies_us": latencies}
        if args.mode == "watch":
            result["watch_us"] = list(watch_delays)
        return result

    warmup = await run(args.warmup, 1 << 62)
    ready["warmup_calls"] = warmup["calls"]
    print(json.dumps(ready), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        result = await run(command.get("seconds", 1e9), command.get("calls", 1 << 62))
        print(json.dumps(result), flush=True)
    for watcher in watchers:
        watcher.close()
    if client is not None:
        await client.close()
    for channel in channels:
        await channel.close(None)


class _SlotWatcher:
    """One slot's WatchTurns stream: when each sequence arrived (perf_counter_ns)."""

    def __init__(self, stub: Any, thread_id: str) -> None:
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[None] = loop.create_future()
        self._arrived: dict[int, int] = {}
        self._waiting: tuple[int, asyncio.Future[int]] | None = None
        self._call = stub.WatchTurns(
            turnid_pb2.WatchTurnsRequest(thread_id=thread_id, after_sequence=0)
        )
        self._task = loop.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self._call:
                now = time.perf_counter_ns()
                for turn in response.turns:
                    self._arrived[turn.sequence] = now
                if not self.started.done():
                    self.started.set_result(None)
                waiting = self._waiting
                if waiting is not None and waiting[0] in self._arrived and not waiting[1].done():
                    waiting[1].set_result(self._arrived.pop(waiting[0]))
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                print(f"loadgen: watch: {error.code()}: {error.details()}", file=sys.stderr)
                for future in (self.started, self._waiting and self._waiting[1]):
                    if future and not future.done():
                        future.set_exception(error)

    async def arrival(self, sequence: int) -> int:
        if sequence in self._arrived:
            return self._arrived.pop(sequence)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting = (sequence, future)
        try:
            return await asyncio.wait_for(future, WATCH_TIMEOUT)
        finally:
            self._waiting = None
            # Older sequences (a slot's earlier errors) need not be kept.
            for old in [s for s in self._arrived if s < sequence]:
                del self._arrived[old]

    def close(self) -> None:
        self._call.cancel()
        self._task.cancel()


# --- the threaded mode: TurnIdClient from OS threads ------------------------------------------


def _sync_main(args: argparse.Namespace) -> None:
    from turnid.client import TurnIdClient, TurnIdError, TurnKind

    prefix = f"{args.tag}-{os.getpid()}"
    options = _client_options(args)
    kind = TurnKind(args.kind)

    def concurrently(work: Callable[[int], None]) -> None:
        threads = [
            threading.Thread(target=work, args=(i,), daemon=True) for i in range(args.concurrency)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    probe_counter = _SyncCounter()
    probe_errors = [0]
    rounds = 3
    with TurnIdClient(args.target, interceptors=[probe_counter], **options) as probe_client:
        for round_ in range(rounds):
            barrier = threading.Barrier(args.concurrency)

            def probe(index: int, round_: int = round_, barrier: Any = barrier) -> None:
                barrier.wait()
                try:
                    probe_client.allocate(
                        f"{prefix}-probe-{index}",
                        kind,
                        request_id=f"{prefix}-probe-{round_}-{index}",
                    )
                except TurnIdError:
                    probe_errors[0] += 1

            concurrently(probe)
    client = TurnIdClient(args.target, **options)
    ready: dict[str, Any] = {
        "ready": True,
        "client": {
            "class": "TurnIdClient",
            "options": options,
            "attributes": _describe_client(client),
            **_probe_report(probe_counter.methods, rounds * args.concurrency, probe_errors[0]),
        },
    }
    lock = threading.Lock()

    def run(seconds: float, calls: int) -> dict[str, Any]:
        quota = [calls]
        per_thread: list[tuple[list[int], int]] = [([], 0)] * args.concurrency
        started = time.perf_counter()
        stop_at = started + seconds

        def slot(index: int) -> None:
            thread_id = _thread_id(args, prefix, index)
            latencies: list[int] = []
            errors = 0
            while time.perf_counter() < stop_at:
                with lock:
                    if quota[0] <= 0:
                        break
                    quota[0] -= 1
                t0 = time.perf_counter_ns()
                try:
                    client.allocate(thread_id, kind, request_id=str(uuid_utils.uuid7()))
                except TurnIdError as error:
                    errors += 1
                    if errors == 1:
                        print(f"loadgen: {type(error).__name__}: {error}", file=sys.stderr)
                    continue
                latencies.append((time.perf_counter_ns() - t0) // 1000)
            per_thread[index] = (latencies, errors)

        concurrently(slot)
        elapsed = time.perf_counter() - started
        latencies = [lat for lats, _ in per_thread for lat in lats]
        return {
            "calls": len(latencies),
            "errors": sum(errors for _, errors in per_thread),
            "elapsed": elapsed,
            "latencies_us": latencies,
        }

    ready["warmup_calls"] = run(args.warmup, 1 << 62)["calls"]
    print(json.dumps(ready), flush=True)
    while line := sys.stdin.readline():
        command = json.loads(line)
        print(
            json.dumps(run(command.get("seconds", 1e9), command.get("calls", 1 << 62))), flush=True
        )
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="turnid bench load generator (one process)")
    parser.add_argument("--target", required=True)
    parser.add_argument(
        "--mode", choices=("stub", "watch", "client-async", "client-sync"), default="stub"
    )
    parser.add_argument("--rpc", choices=("allocate", "batch"), default="allocate")
    parser.add_argument("--kind", type=int, default=1, help="TurnKind number")
    parser.add_argument("--count", type=int, default=1000, help="ids per batch call")
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight")
    parser.add_argument("--channels", type=int, default=1, help="TCP connections (stub modes)")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of load before ready")
    parser.add_argument("--tag", default="bench", help="thread and request id prefix")
    parser.add_argument(
        "--thread-prefix", default="", help="fixed thread ids PREFIX-t<offset+slot> (watchable)"
    )
    parser.add_argument("--thread-offset", type=int, default=0)
    parser.add_argument(
        "--client-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="client modes: a constructor keyword (VALUE parsed as JSON, else a string)",
    )
    args = parser.parse_args()
    if args.mode == "client-sync":
        _sync_main(args)
    else:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
