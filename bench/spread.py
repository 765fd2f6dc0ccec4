"""Several `make bench` runs side by side: the README's spread table, one column per run.

    python bench/spread.py bench/results/bench-20261201-210609.json ...
    python bench/spread.py 21:06=bench/results/bench-20261201-210609.json ...   (own labels)

Each cell is a ratio to the no-op of the same run (calls/s, or the no-op's server CPU per call
over the row's), as `make bench` computes them (medians of per-round ratios), so the noise of
one run shows as the spread across columns. A row missing from a run (a `--only` run, no
PostgreSQL) leaves its cell empty. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The rows' names as make bench writes them (bench/ is on sys.path when this runs as a script).
from run import BASELINE, DURABLE_NOOP
from run import CLIENT_ASYNC_MEMORY as ASYNC_MEMORY
from run import CLIENT_ASYNC_SQLITE as ASYNC_SQLITE
from run import CLIENT_SYNC_SQLITE as SYNC_SQLITE
from run import SQLITE_REALTIME as REALTIME

Run = dict[str, Any]

COMPACTION = "AllocateTurnId compaction, SQLite"
BATCH = "BatchAllocateTurnIds 1000, SQLite"


def _row(run: Run, name: str) -> dict[str, Any]:
    for row in run["rows"]:
        if row["name"] == name:
            return dict(row)
    raise KeyError(name)


def _pair(run: Run, first: str, second: str, key: str = "ratio") -> str:
    return f"{_row(run, first)[key]:.2f} / {_row(run, second)[key]:.2f}"


def _c1_deltas(run: Run) -> str:
    limit = 1.25 * run["fsync"]["p50_ms"] + 0.1
    names = (REALTIME, COMPACTION, ASYNC_SQLITE, SYNC_SQLITE)
    deltas = " / ".join(f"{_row(run, name)['c1_p50_delta_ms']:+.2f}" for name in names)
    return f"{deltas} (+{limit:.2f})"


def _per_commit(run: Run) -> str:
    return " / ".join(
        f"{_row(run, name)['group_commit']['allocations_per_commit']:.1f}"
        for name in (REALTIME, COMPACTION)
    )


def _idle_replicas(run: Run) -> str:
    row = _row(run, "AllocateTurnId realtime, PostgreSQL, 2 idle replicas")
    return f"{row['vs']['ratio']:.2f}; {row['c32']['idle_replica_cpu_us_per_call']:.1f}"


def _client(run: Run, name: str) -> str:
    row = _row(run, name)
    return f"{row['ratio']:.2f}; {1 / row['cpu_ratio']:.2f}"


def _baseline(run: Run) -> str:
    c32 = _row(run, BASELINE)["c32"]
    return f"{c32['calls_per_s']:,.0f}; {c32['cpu_us_per_call']:.0f}; {run['fsync']['p50_ms']:.2f}"


def _batch(run: Run) -> str:
    row = _row(run, BATCH)
    return f"{row['ratio']:.2f} ({row['c32']['calls_per_s'] * 1000:,.0f})"


LINES: list[tuple[str, Callable[[Run], str]]] = [
    ("no-op: calls/s c32; server CPU per call (µs); fsync p50 (ms)", _baseline),
    (
        "unary AllocateTurnId realtime / compaction, SQLite: calls/s",
        lambda r: _pair(r, REALTIME, COMPACTION),
    ),
    ("... server CPU", lambda r: _pair(r, REALTIME, COMPACTION, "cpu_ratio")),
    ("... allocations per commit", _per_commit),
    (
        "unary AllocateTurnId realtime / compaction, memory store: calls/s",
        lambda r: _pair(
            r, "AllocateTurnId realtime, memory:", "AllocateTurnId compaction, memory:"
        ),
    ),
    (
        "client AsyncTurnIdClient, SQLite: calls/s; server CPU per allocation",
        lambda r: _client(r, ASYNC_SQLITE),
    ),
    (
        "client AsyncTurnIdClient, memory store: calls/s; server CPU per allocation",
        lambda r: _client(r, ASYNC_MEMORY),
    ),
    (
        "client TurnIdClient from 32 threads, SQLite: calls/s (target 2)",
        lambda r: f"{_row(r, SYNC_SQLITE)['ratio']:.2f}",
    ),
    (
        "p50 at c1 over the no-op: unary realtime / compaction / async client / sync client "
        "(limit)",
        _c1_deltas,
    ),
    (
        "... the no-op with one 4 KiB append + fsync per call (its floor)",
        lambda r: f"{_row(r, DURABLE_NOOP)['c1_p50_delta_ms']:+.2f}",
    ),
    ("BatchAllocateTurnIds(1000), SQLite (ids/s)", _batch),
    (
        "unary AllocateTurnId realtime / compaction, PostgreSQL",
        lambda r: _pair(
            r, "AllocateTurnId realtime, PostgreSQL", "AllocateTurnId compaction, PostgreSQL"
        ),
    ),
    (
        "... realtime with 2 idle replicas on its schema: calls/s x the row without; their CPU per "
        "allocation (µs each)",
        _idle_replicas,
    ),
    (
        "client AsyncTurnIdClient, PostgreSQL",
        lambda r: f"{_row(r, 'client AsyncTurnIdClient, PostgreSQL')['ratio']:.2f}",
    ),
    (
        "unary AllocateTurnId realtime, SQLite, `--workers 2`",
        lambda r: f"{_row(r, 'AllocateTurnId realtime, SQLite, --workers 2')['ratio']:.2f}",
    ),
    (
        "targets met (of 13)",
        lambda r: str(sum(t["met"] for t in r["targets"])),
    ),
]


def _label(path: Path) -> str:
    """HH:MM of the run, from bench-YYYYMMDD-HHMMSS.json; else the file's name."""
    found = re.search(r"-(\d{2})(\d{2})\d{2}\.json$", path.name)
    return f"{found.group(1)}:{found.group(2)}" if found else path.stem


def table(runs: list[tuple[str, Run]]) -> str:
    lines = [
        "| ratio to the no-op (same run) | " + " | ".join(label for label, _ in runs) + " |",
        "|---|" + "--:|" * len(runs),
    ]
    for title, cell in LINES:
        cells = []
        for _, run in runs:
            try:
                cells.append(cell(run))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="bench JSON files, optionally LABEL=path")
    args = parser.parse_args()
    runs = []
    for item in args.runs:
        label, _, path = item.rpartition("=")
        runs.append((label or _label(Path(path)), json.loads(Path(path).read_text())))
    print(table(runs))


if __name__ == "__main__":
    main()
