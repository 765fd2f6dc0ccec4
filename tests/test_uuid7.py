"""Invariant 3: UUIDv7 done right (RFC 9562)."""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid

from turnid.service.domain.minting import mint_uuid7

CANONICAL = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def timestamp_ms(text: str) -> int:
    return int(text[:8] + text[9:13], 16)


def test_version_variant_and_canonical_text() -> None:
    for _ in range(1000):
        text = mint_uuid7()
        assert CANONICAL.match(text), text
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (7, uuid.RFC_4122, text)


def test_strictly_increasing_across_8_os_threads() -> None:
    per_thread: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def mint(out: list[str]) -> None:
        start.wait()
        for _ in range(20_000):
            out.append(mint_uuid7())

    threads = [threading.Thread(target=mint, args=(out,)) for out in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ids in per_thread:
        # Canonical lower-case hex sorts as the 128-bit value does.
        assert all(a < b for a, b in itertools.pairwise(ids))
    everything = [i for ids in per_thread for i in ids]
    assert len(set(everything)) == len(everything)


def test_timestamp_stays_honest_after_a_million_mints() -> None:
    last = ""
    for _ in range(999_999):
        last = mint_uuid7()
    before_ms = time.time_ns() // 1_000_000
    last = mint_uuid7()
    after_ms = time.time_ns() // 1_000_000
    # No forward drift: the embedded time is the clock's time at the mint, to the millisecond.
    assert before_ms - 1 <= timestamp_ms(last) <= after_ms + 1
    assert timestamp_ms(last) <= after_ms
