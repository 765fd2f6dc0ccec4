"""UUIDv7 minting (RFC 9562).

One generator per process, shared by every OS thread and every conversation thread: uuid_utils
wraps the Rust `uuid` crate's `now_v7()`, which implements RFC 9562 §6.2 Method 1 (a counter in
rand_a/rand_b seeded randomly each millisecond, behind a process-wide lock). Ids are strictly
increasing, the timestamp never runs ahead of the clock except on counter overflow (~2^42 ids
in one millisecond), and when the clock steps back the last timestamp is reused with the counter
bumped, so order holds. The `uuid6` package's uuid7() is deliberately not used: it pushes the
timestamp 1 ms forward per call inside a millisecond.
"""

from __future__ import annotations

import uuid_utils


def mint_uuid7() -> str:
    """A new UUIDv7 in canonical lower-case 8-4-4-4-12 text."""
    return str(uuid_utils.uuid7())
