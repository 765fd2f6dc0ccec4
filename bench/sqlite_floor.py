"""The floor under a SQLite allocation: the SQL of a group commit in a plain sqlite3 loop, with
no service around it (no gRPC, no asyncio, no decision, no writer thread).

A file made by the SQLite store (its schema, its connection settings: WAL, synchronous=FULL),
in `--dir` (the bench puts it beside the SQLite rows' files, on the same file system), warmed
with history on 32 threads; then, per transaction, the statements the store runs for a group:
BEGIN IMMEDIATE, the prefetch of the threads and request ids, the multi-row inserts of turns,
thread states and request records, COMMIT. Twice: a lone allocation (what a call at
concurrency 1 costs the store at least) and a group of 32 allocations on 32 threads. Printed as
one JSON object: the median wall time and CPU time of this thread (µs) per transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from turnid.service.domain import Allocation, TurnKind
from turnid.service.domain.minting import mint_uuid7
from turnid.service.stores.sqlite import SqliteStore, _connect, _multi_row

THREADS = 32
NAMESPACE = ""


async def _make(path: Path, threads: list[str], rounds: int) -> None:
    """The store's file, with `rounds` turns on each thread."""
    store = SqliteStore(str(path))
    await store.open()
    try:
        for _ in range(rounds):
            await store.allocate_many(
                [Allocation(t, TurnKind.REALTIME_DELEGATION, 1, mint_uuid7()) for t in threads]
            )
    finally:
        await store.close()


def _transactions(path: Path, threads: list[str], size: int, count: int) -> dict[str, float]:
    """`count` transactions of `size` allocations (one turn each, fresh request ids, on the
    first `size` threads): median wall and thread-CPU µs per transaction."""
    conn = _connect(str(path), 5.0)
    try:
        cursor = conn.cursor()
        rows = cursor.execute(
            "SELECT thread_id, next_sequence, last_minted FROM threads WHERE namespace = ?",
            (NAMESPACE,),
        ).fetchall()
        state = {thread_id: [sequence, minted] for thread_id, sequence, minted in rows}
        group = threads[:size]
        walls, cpus = [], []
        for _ in range(count):
            now_us = time.time_ns() // 1000
            prefetch: list[object] = []
            turns: list[object] = []
            heads: list[object] = []
            requests: list[object] = []
            for index, thread_id in enumerate(group):
                sequence, _ = state[thread_id]
                request_id, turn_id = mint_uuid7(), mint_uuid7()
                prefetch += (index, NAMESPACE, thread_id, request_id)
                turns += (NAMESPACE, thread_id, turn_id, 1, sequence, now_us, request_id, 0)
                heads += (NAMESPACE, thread_id, sequence + 1, 0, turn_id, "", now_us, now_us)
                requests += (NAMESPACE, thread_id, request_id, 1, 1, None, sequence)
                state[thread_id] = [sequence + 1, turn_id]
            wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
            cursor.execute("BEGIN IMMEDIATE")
            cursor.execute(_multi_row("prefetch", size), prefetch).fetchone()
            cursor.execute(_multi_row("turns", size), turns)
            cursor.execute(_multi_row("threads", size), heads)
            cursor.execute(_multi_row("requests", size), requests)
            cursor.execute("COMMIT")
            cpus.append((time.thread_time_ns() - cpu) / 1000)
            walls.append((time.perf_counter_ns() - wall) / 1000)
    finally:
        conn.close()
    return {
        "allocations": size,
        "wall_us": statistics.median(walls),
        "cpu_us": statistics.median(cpus),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="where the file goes (default: a temp dir)")
    parser.add_argument("--count", type=int, default=300, help="transactions of each size")
    parser.add_argument("--history", type=int, default=200, help="turns per thread beforehand")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sqlite-floor-", dir=args.dir) as tmp:
        path = Path(tmp) / "floor.db"
        threads = [f"floor-thread-{n}" for n in range(THREADS)]
        asyncio.run(_make(path, threads, args.history))
        figures = {
            "lone": _transactions(path, threads, 1, args.count),
            "group": _transactions(path, threads, THREADS, args.count),
        }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
