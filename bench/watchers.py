"""Open watchers for bench/run.py: `count` WatchTurns streams on fixed thread ids, held open.

    python bench/watchers.py --target HOST:PORT --thread-prefix P --count 100

watches threads `P-t0` ... `P-t99` (the load generator's `--thread-prefix P` slots allocate on
the first of them) from sequence 0 over raw grpc.aio stubs, prints `{"ready": true}` once every
stream has sent its first message (caught up), counts the turns they deliver, and on EOF of
stdin prints `{"turns": n, "errors": e, "streams_ended": k}` and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import grpc

from turnid.v1 import turnid_pb2, turnid_pb2_grpc


async def _main(args: argparse.Namespace) -> None:
    stats = {"turns": 0, "errors": 0, "streams_ended": 0}
    channels = [grpc.aio.insecure_channel(args.target) for _ in range(args.channels)]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 10)
    stubs = [turnid_pb2_grpc.TurnIdServiceStub(channel) for channel in channels]
    loop = asyncio.get_running_loop()
    started = [loop.create_future() for _ in range(args.count)]

    async def watch(index: int) -> None:
        call = stubs[index % len(stubs)].WatchTurns(
            turnid_pb2.WatchTurnsRequest(
                thread_id=f"{args.thread_prefix}-t{index}", after_sequence=0
            )
        )
        try:
            async for response in call:
                stats["turns"] += len(response.turns)
                if not started[index].done():
                    started[index].set_result(None)
            stats["streams_ended"] += 1
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                stats["errors"] += 1
                print(f"watchers: {error.code()}: {error.details()}", file=sys.stderr)
                if not started[index].done():
                    started[index].set_exception(error)

    tasks = [loop.create_task(watch(i)) for i in range(args.count)]
    await asyncio.wait_for(asyncio.gather(*started), 30)
    print(json.dumps({"ready": True}), flush=True)
    while await loop.run_in_executor(None, sys.stdin.readline):
        pass
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close(None)
    print(json.dumps(stats), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--thread-prefix", required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--channels", type=int, default=1)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
