"""The bench's ceiling: a grpc.aio TurnIdService that does no work.

It answers AllocateTurnId and BatchAllocateTurnIds with canned responses of the same shape and
size as the real service's (a UUIDv7-length turn id, the request's thread and request ids), so
the difference between this server and `turnid serve` under the same load is the cost of
turnid itself: validation, minting, the store and the proto mapping.

    python bench/baseline_server.py --listen 127.0.0.1:0

Logs `serving on HOST:PORT` like `turnid serve`, and stops on SIGTERM/SIGINT.

With `--fsync-dir DIR` it is the end-to-end floor of a durable allocation instead: every
AllocateTurnId first appends 4 KiB to a file in DIR and fsyncs it, on the event loop, as the
fsync row measures it and as SQLite's lone commit blocks the loop (no other work). What that
costs a caller over the plain no-op is what one durable write costs through this machine's
gRPC, scheduler and idle states, not the fsync alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import grpc

from turnid.v1 import turnid_pb2, turnid_pb2_grpc

_CANNED_ID = "0193a8e2-7c4f-7d3e-9a1b-2c3d4e5f6a7b"
_FSYNC_BLOCK = 4096  # as bench/run.py's fsync row
_FSYNC_FILE_MAX = 4 * 1024 * 1024  # then the file starts again from empty


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


class DurableWrite:
    """A 4 KiB append + fsync per call to one file (the bench's fsync row, on the loop)."""

    def __init__(self, directory: Path) -> None:
        self._path = directory / f"fsync-floor-{os.getpid()}"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._block = os.urandom(_FSYNC_BLOCK)
        self._size = 0

    def __call__(self) -> None:
        if self._size >= _FSYNC_FILE_MAX:
            os.ftruncate(self._fd, 0)
            self._size = 0
        os.write(self._fd, self._block)
        os.fsync(self._fd)
        self._size += _FSYNC_BLOCK

    def close(self) -> None:
        os.close(self._fd)
        self._path.unlink(missing_ok=True)


class NoopServicer(turnid_pb2_grpc.TurnIdServiceServicer):  # type: ignore[misc]
    def __init__(self, durable_write: DurableWrite | None = None) -> None:
        self._single = turnid_pb2.AllocateTurnIdResponse(turn=_turn(1, 1))
        self._batches: dict[int, turnid_pb2.BatchAllocateTurnIdsResponse] = {}
        self._durable_write = durable_write

    async def AllocateTurnId(self, request, context):  # type: ignore[no-untyped-def]
        if self._durable_write is not None:
            self._durable_write()
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


async def _serve(listen: str, fsync_dir: Path | None) -> None:
    durable_write = DurableWrite(fsync_dir) if fsync_dir is not None else None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    turnid_pb2_grpc.add_TurnIdServiceServicer_to_server(NoopServicer(durable_write), server)
    port = server.add_insecure_port(listen)
    await server.start()
    what = "no-op baseline" + (", one fsync per AllocateTurnId" if durable_write else "")
    logging.info("serving on %s:%d (%s)", listen.rsplit(":", 1)[0], port, what)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)
    if durable_write is not None:
        durable_write.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument(
        "--fsync-dir",
        type=Path,
        help="append 4 KiB to a file here and fsync it before every AllocateTurnId answer",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    asyncio.run(_serve(args.listen, args.fsync_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
