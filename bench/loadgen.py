"""One load-generator process: grpc.aio, `concurrency` calls in flight over `channels` connections.

Driven by bench/run.py over stdin/stdout, one JSON object per line, so that several processes can
start each trial at the same moment and stay connected (and warm) between trials:

    -> (start)                      <- {"ready": true, "warmup_calls": n}   after warming up
    -> {"seconds": 2.0}             <- {"calls", "errors", "elapsed", "latencies_us"}
    -> {"calls": 100000}            <- the same, after this many calls instead of a time
    -> (EOF)                        exits

Every call allocates a new turn: each in-flight slot has its own conversation thread and sends a
fresh request_id, as an orchestrator does. Baseline and service are driven by the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import grpc

from turnid.v1 import turnid_pb2, turnid_pb2_grpc


async def _main(args: argparse.Namespace) -> None:
    # A local subchannel pool gives every channel its own TCP connection, so that connections
    # spread over `turnid serve --workers N` processes (SO_REUSEPORT balances per connection).
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(args.target, options=options) for _ in range(args.channels)
    ]
    stubs = [turnid_pb2_grpc.TurnIdServiceStub(channel) for channel in channels]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 10)
    prefix = f"{args.tag}-{os.getpid()}"
    counters = [0] * args.concurrency

    async def slot(
        index: int, stop_at: float, quota: list[int], stats: dict[str, int], latencies: list[int]
    ) -> None:
        stub = stubs[index % len(stubs)]
        thread_id = f"{prefix}-t{index}"
        while quota[0] > 0 and time.perf_counter() < stop_at:
            quota[0] -= 1
            n = counters[index] = counters[index] + 1
            request_id = f"{prefix}-{index}-{n}"
            started = time.perf_counter_ns()
            try:
                if args.rpc == "batch":
                    await stub.BatchAllocateTurnIds(
                        turnid_pb2.BatchAllocateTurnIdsRequest(
                            thread_id=thread_id,
                            kind=args.kind,
                            count=args.count,
                            request_id=request_id,
                        )
                    )
                else:
                    await stub.AllocateTurnId(
                        turnid_pb2.AllocateTurnIdRequest(
                            thread_id=thread_id, kind=args.kind, request_id=request_id
                        )
                    )
            except grpc.aio.AioRpcError as error:
                stats["errors"] += 1
                if stats["errors"] == 1:
                    print(f"loadgen: {error.code()}: {error.details()}", file=sys.stderr)
                continue
            latencies.append((time.perf_counter_ns() - started) // 1000)
            stats["calls"] += 1

    async def run(seconds: float, calls: int) -> dict[str, object]:
        latencies: list[int] = []
        stats = {"calls": 0, "errors": 0}
        quota = [calls]  # calls left to start, shared by the slots
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(
            *(slot(i, stop_at, quota, stats, latencies) for i in range(args.concurrency))
        )
        elapsed = time.perf_counter() - started
        return {**stats, "elapsed": elapsed, "latencies_us": latencies}

    warmup = await run(args.warmup, 1 << 62)
    print(json.dumps({"ready": True, "warmup_calls": warmup["calls"]}), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        result = await run(command.get("seconds", 1e9), command.get("calls", 1 << 62))
        print(json.dumps(result), flush=True)
    for channel in channels:
        await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="turnid bench load generator (one process)")
    parser.add_argument("--target", required=True)
    parser.add_argument("--rpc", choices=("allocate", "batch"), default="allocate")
    parser.add_argument("--kind", type=int, default=1, help="TurnKind number")
    parser.add_argument("--count", type=int, default=1000, help="ids per batch call")
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight")
    parser.add_argument("--channels", type=int, default=1, help="TCP connections")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of load before ready")
    parser.add_argument("--tag", default="bench", help="thread id prefix")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
