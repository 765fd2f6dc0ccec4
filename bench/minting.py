"""In-process UUIDv7 minting: ours vs `uuid6.uuid7()` vs `uuid_utils.uuid7()`.

For each generator: ids per second over `--ids` calls in a tight loop, whether the ids came out
strictly increasing, and how far the last id's millisecond timestamp ran ahead of the clock read
right after it (RFC 9562 keeps it within the millisecond; uuid6's uuid7() adds 1 ms per call
inside a millisecond). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable

import uuid6
import uuid_utils

from turnid.service.domain.minting import mint_uuid7


def _measure(mint: Callable[[], object], ids: int) -> dict[str, object]:
    started = time.perf_counter()
    minted = [mint() for _ in range(ids)]
    elapsed = time.perf_counter() - started
    clock_ms = time.time_ns() // 1_000_000
    texts = [str(u) for u in minted]
    hexes = [t.replace("-", "") for t in texts]
    last_ms = int(hexes[-1][:12], 16)
    return {
        "ids": ids,
        "ids_per_s": ids / elapsed,
        "ns_per_id": elapsed / ids * 1e9,
        "ahead_of_clock_ms": max(0, last_ms - clock_ms),
        "strictly_increasing": all(a < b for a, b in itertools.pairwise(hexes)),
        "version_7": all(h[12] == "7" and h[16] in "89ab" for h in hexes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=100_000)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    generators: dict[str, Callable[[], object]] = {
        "turnid mint_uuid7() (str)": mint_uuid7,
        "uuid_utils.uuid7()": uuid_utils.uuid7,
        "uuid6.uuid7()": uuid6.uuid7,
    }
    results = {}
    for name, mint in generators.items():
        trials = [_measure(mint, args.ids) for _ in range(args.trials)]
        # Drift accumulates over trials in one process: report it after the first `ids` calls.
        ahead = trials[0]["ahead_of_clock_ms"]
        trials.sort(key=lambda t: t["ids_per_s"])  # type: ignore[arg-type, return-value]
        median = dict(trials[len(trials) // 2])
        median["ahead_of_clock_ms"] = ahead
        median["strictly_increasing"] = all(t["strictly_increasing"] for t in trials)
        results[name] = median
    print(json.dumps(results))


if __name__ == "__main__":
    main()
