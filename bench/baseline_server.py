"""The bench's ceiling: a grpc.aio TurnIdService that does no work.

It answers AllocateTurnId and BatchAllocateTurnIds with canned responses of the same shape and
size as the real service's (a UUIDv7-length turn id, the request's thread and request ids), so
the difference between this server and `turnid serve` under the same load is the cost of
turnid itself: validation, minting, the store and the proto mapping.

    python bench/baseline_server.py --listen 127.0.0.1:0

Logs `serving on HOST:PORT` like `turnid serve`, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import grpc

from turnid.v1 import turnid_pb2, turnid_pb2_grpc

_CANNED_ID = "0193a8e2-7c4f-7d3e-9a1b-2c3d4e5f6a7b"


def _turn(kind: int, sequence: int) -> turnid_pb2.Turn:
    turn = turnid_pb2.Turn(
        thread_id="bench-thread-0000",
        turn_id=_CANNED_ID,
        kind=kind,  # type: ignore[arg-type]
        sequence=sequence,
        request_id="bench-request-0000000000",
    )
    turn.create_time.seconds = 1_764_000_000
    turn.create_time.nanos = 123_456_000
    return turn


class NoopServicer(turnid_pb2_grpc.TurnIdServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self._single = turnid_pb2.AllocateTurnIdResponse(turn=_turn(1, 1))
        self._batches: dict[int, turnid_pb2.BatchAllocateTurnIdsResponse] = {}

    async def AllocateTurnId(self, request, context):  # type: ignore[no-untyped-def]
        return self._single

    async def BatchAllocateTurnIds(self, request, context):  # type: ignore[no-untyped-def]
        count = max(1, min(request.count, 1000))
        response = self._batches.get(count)
        if response is None:
            response = turnid_pb2.BatchAllocateTurnIdsResponse(
                turns=[_turn(1, i + 1) for i in range(count)]
            )
            self._batches[count] = response
        return response


async def _serve(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    turnid_pb2_grpc.add_TurnIdServiceServicer_to_server(NoopServicer(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    logging.info("serving on %s:%d (no-op baseline)", listen.rsplit(":", 1)[0], port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    asyncio.run(_serve(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
