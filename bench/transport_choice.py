"""Why coalesced writes travel in a unary AllocateMany call and not on a bidirectional stream
(issue 13: "measure both and say why you chose"): the transport's cost alone, side by side.

A bench-only grpc.aio service (its own process, no store, canned answers of the real shape)
offers the same messages two ways: `Unary` (AllocateManyRequest -> AllocateManyResponse, one
call per message, as AllocateMany) and `Stream` (a bidirectional stream of the same messages,
one answer per message, in order). A load process (grpc.aio) keeps `in flight` messages of
`items` allocations each going, for `--seconds` per trial; on the stream all of them share one
long-lived stream (pipelined, as a coalescing client would use one). Rounds interleave the rows.
Printed: a markdown table of items/s and the server's CPU per item (user + system, /proc),
medians over the rounds, each also as a ratio to the first row (one unary call per allocation,
what a client without coalescing makes).

    python bench/transport_choice.py [--rounds 5] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from turnid.v1 import turnid_pb2

SERVICE = "turnid.bench.Transport"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# (row, method, allocations per message, messages in flight): per allocation, as a client
# without coalescing sends; the same on one stream; and as the coalescing client sends (two
# calls in flight of ~16 allocations each at 32 callers; README "Coalescing").
ROWS = (
    ("unary, 1 allocation per call, 32 in flight", "Unary", 1, 32),
    ("stream, 1 allocation per message, 32 in flight", "Stream", 1, 32),
    ("unary, 16 allocations per call, 2 in flight", "Unary", 16, 2),
    ("stream, 16 allocations per message, 2 in flight", "Stream", 16, 2),
)


def _answer(request: turnid_pb2.AllocateManyRequest) -> turnid_pb2.AllocateManyResponse:
    """One canned turn per item, with the item's thread and request ids (the real shape)."""
    response = turnid_pb2.AllocateManyResponse()
    for index, item in enumerate(request.items):
        asked = item.allocate
        turn = response.results.add().turns.add()
        turn.thread_id = asked.thread_id
        turn.turn_id = "0193a8e2-7c4f-7d3e-9a1b-2c3d4e5f6a7b"
        turn.kind = asked.kind
        turn.sequence = index + 1
        turn.request_id = asked.request_id
        turn.create_time.seconds = 1_764_000_000
    return response


async def _unary(request: turnid_pb2.AllocateManyRequest, context: Any) -> Any:
    return _answer(request)


async def _stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async for request in requests:
        yield _answer(request)


async def _serve() -> None:
    parse = turnid_pb2.AllocateManyRequest.FromString
    serialize = turnid_pb2.AllocateManyResponse.SerializeToString
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            _unary, request_deserializer=parse, response_serializer=serialize
        ),
        "Stream": grpc.stream_stream_rpc_method_handler(
            _stream, request_deserializer=parse, response_serializer=serialize
        ),
    }
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def _request(items: int, tag: str) -> bytes:
    request = turnid_pb2.AllocateManyRequest()
    for index in range(items):
        asked = request.items.add().allocate
        asked.thread_id = f"bench-thread-{index:04d}"
        asked.kind = turnid_pb2.TURN_KIND_REALTIME_DELEGATION
        asked.request_id = f"{tag}-{index:04d}-0193a8e2-7c4f-7d3e"
    return request.SerializeToString()


async def _trial(
    channel: grpc.aio.Channel, method: str, items: int, flight: int, seconds: float
) -> int:
    """Messages answered in `seconds`, `flight` kept in flight."""
    payload = _request(items, "r")
    path = f"/{SERVICE}/{method}"
    done = 0
    deadline = time.monotonic() + seconds
    if method == "Unary":
        call = channel.unary_unary(path, None, turnid_pb2.AllocateManyResponse.FromString)

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                await call(payload)
                done += 1

        await asyncio.gather(*(worker() for _ in range(flight)))
        return done
    open_stream = channel.stream_stream(path, None, turnid_pb2.AllocateManyResponse.FromString)
    stream = open_stream()  # type: ignore[call-arg]  # the requests go by write()
    window = asyncio.Semaphore(flight)

    async def writer() -> None:
        while time.monotonic() < deadline:
            await window.acquire()
            await stream.write(payload)
        await stream.done_writing()

    async def reader() -> None:
        nonlocal done
        while await stream.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
            done += 1
            window.release()

    await asyncio.gather(writer(), reader())
    return done


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def _measure(target: str, pid: int, rounds: int, seconds: float) -> dict[str, Any]:
    figures: dict[str, list[dict[str, float]]] = {row[0]: [] for row in ROWS}
    async with grpc.aio.insecure_channel(target) as channel:
        for _name, method, items, flight in ROWS:  # warm-up
            await _trial(channel, method, items, flight, 0.5)
        for _ in range(rounds):
            for name, method, items, flight in ROWS:
                before, started = _cpu(pid), time.monotonic()
                messages = await _trial(channel, method, items, flight, seconds)
                elapsed, used = time.monotonic() - started, _cpu(pid) - before
                allocations = max(1, messages * items)
                figures[name].append(
                    {"items_per_s": allocations / elapsed, "cpu_us": used / allocations * 1e6}
                )
    return figures


def _table(figures: dict[str, list[dict[str, float]]]) -> str:
    first = ROWS[0][0]
    lines = [
        "| transport | allocations/s | x first row | server CPU µs per allocation | x first row |",
        "|---|--:|--:|--:|--:|",
    ]
    for name, trials in figures.items():
        rate = statistics.median(t["items_per_s"] for t in trials)
        cpu = statistics.median(t["cpu_us"] for t in trials)
        rate_x = statistics.median(
            t["items_per_s"] / f["items_per_s"] for t, f in zip(trials, figures[first], strict=True)
        )
        cpu_x = statistics.median(
            t["cpu_us"] / f["cpu_us"] for t, f in zip(trials, figures[first], strict=True)
        )
        lines.append(f"| {name} | {rate:,.0f} | {rate_x:.2f} | {cpu:,.1f} | {cpu_x:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve())
        return 0
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        found = re.search(r"serving on (\S+)", server.stdout.readline())
        if found is None:
            raise SystemExit("the transport server did not start")
        figures = asyncio.run(_measure(found.group(1), server.pid, args.rounds, args.seconds))
    finally:
        server.terminate()
        server.wait(30)
    print(json.dumps(figures) if args.json else _table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
