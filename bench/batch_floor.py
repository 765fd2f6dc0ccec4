"""The floor under BatchAllocateTurnIds(1000) in this Python: what answering 1,000 fresh turns
costs before any storage, next to what the no-op batch baseline does per call.

The no-op batch (bench/baseline_server.py) serializes one canned 1,000-turn response per call. A
server that answers fresh turns must also build that response from the allocation's 1,000 turns
(the servicer's `add_turns` of the TurnRun every store answers an allocation with: the first
turn field by field into upb messages, each one after it a copy of the one before with its own
turn_id and sequence) and mint 1,000 UUIDv7s (`mint_uuid7s`, as `decide` does), whatever its
store does. Printed as one JSON object: the median server CPU (this process, µs) of each step
over `--trials` runs of `--calls` responses each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from turnid.service.domain.minting import mint_uuid7s
from turnid.service.domain.model import TurnKind, TurnRun
from turnid.service.servicer import add_turns
from turnid.v1 import turnid_pb2

COUNT = 1000


def _cpu_us(work: Callable[[], object], calls: int, trials: int) -> float:
    samples = []
    for _ in range(trials):
        started = time.process_time()
        for _ in range(calls):
            work()
        samples.append((time.process_time() - started) / calls * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    now_us = time.time_ns() // 1000
    turns = TurnRun(
        "bench-thread", mint_uuid7s(COUNT), TurnKind.REALTIME_DELEGATION, 1, now_us, "r", False
    )
    canned = turnid_pb2.BatchAllocateTurnIdsResponse()
    add_turns(canned.turns, turns)

    def build() -> bytes:
        response = turnid_pb2.BatchAllocateTurnIdsResponse()
        add_turns(response.turns, turns)
        return response.SerializeToString()

    figures = {
        "turns": COUNT,
        "serialize_canned_us": _cpu_us(canned.SerializeToString, args.calls, args.trials),
        "build_and_serialize_us": _cpu_us(build, args.calls, args.trials),
        "mint_us": _cpu_us(lambda: mint_uuid7s(COUNT), args.calls, args.trials),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
