"""Invariant 3, the clock part: a clock that steps back does not break UUIDv7 ordering.

The minter runs in a subprocess under libfaketime, whose clock the test sets between batches by
rewriting a timestamp file (FAKETIME_NO_CACHE makes every clock read consult it).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

LIBFAKETIME = next(
    (
        path
        for path in (
            Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"),
            Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1"),
            Path("/usr/lib/faketime/libfaketimeMT.so.1"),
        )
        if path.exists()
    ),
    None,
)

MINTER = """
import sys
from turnid.service.domain.minting import mint_uuid7
for _ in sys.stdin:
    print(" ".join(mint_uuid7() for _ in range(2000)), flush=True)
"""


def timestamp_ms(text: str) -> int:
    return int(text[:8] + text[9:13], 16)


@pytest.mark.skipif(
    LIBFAKETIME is None, reason="libfaketime is not installed (.ci/run installs it)"
)
def test_ids_stay_ordered_when_the_clock_steps_back(tmp_path: Path) -> None:
    clock = tmp_path / "clock"
    start = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)

    def set_clock(offset_s: int) -> int:
        at = datetime.fromtimestamp(start.timestamp() + offset_s, tz=UTC)
        clock.write_text(at.strftime("@%Y-%m-%d %H:%M:%S"))
        return int(at.timestamp() * 1000)

    set_clock(0)
    env = {
        **os.environ,
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_NO_CACHE": "1",
        "TZ": "UTC",
    }
    minter = subprocess.Popen(
        [sys.executable, "-c", MINTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert minter.stdin is not None and minter.stdout is not None

    def batch() -> list[str]:
        minter.stdin.write("mint\n")  # type: ignore[union-attr]
        minter.stdin.flush()  # type: ignore[union-attr]
        return minter.stdout.readline().split()  # type: ignore[union-attr]

    try:
        before = batch()
        set_clock(-10)  # the clock steps back 10 s
        after_step_back = batch()
        forward_ms = set_clock(30)  # and later well past where it was
        after_catch_up = batch()
    finally:
        minter.kill()
        minter.wait(30)

    ids = before + after_step_back + after_catch_up
    assert all(a < b for a, b in itertools.pairwise(ids)), "order broke"
    assert abs(timestamp_ms(before[0]) - (forward_ms - 30_000)) < 5_000
    # While the clock is behind, ids keep the last timestamp rather than follow it back ...
    assert timestamp_ms(after_step_back[0]) >= timestamp_ms(before[-1])
    assert timestamp_ms(after_step_back[-1]) < timestamp_ms(before[-1]) + 1_000
    # ... and once it is ahead again, they carry the clock's time (no drift).
    assert forward_ms <= timestamp_ms(after_catch_up[-1]) < forward_ms + 5_000
