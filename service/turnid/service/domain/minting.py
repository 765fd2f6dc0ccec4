"""UUIDv7 minting (RFC 9562).

One generator per process, shared by every OS thread and every conversation thread: uuid_utils
wraps the Rust `uuid` crate's `now_v7()`, which implements RFC 9562 §6.2 Method 1 (a counter in
rand_a/rand_b seeded randomly each millisecond, behind a process-wide lock). Ids are strictly
increasing, the timestamp never runs ahead of the clock except on counter overflow (~2^42 ids
in one millisecond), and when the clock steps back the last timestamp is reused with the counter
bumped, so order holds. The `uuid6` package's uuid7() is deliberately not used: it pushes the
timestamp 1 ms forward per call inside a millisecond.

Within a thread, ids must also follow the thread's history across processes and replicas
(invariant 8), so stores mint with `mint_uuid7_after(last id minted in the thread)` at the
thread's serialization point: the process's next id, unless another process with a clock ahead
of ours minted a greater one, in which case the successor of that id (same millisecond, counter
+ 1) rather than going back in time.
"""

from __future__ import annotations

import uuid

import uuid_utils

_COUNTER_BITS = 74  # rand_a (12 bits) and rand_b (62 bits): the RFC's counter space
_RAND_B_BITS = 62
_RAND_B_MASK = (1 << _RAND_B_BITS) - 1


def mint_uuid7() -> str:
    """A new UUIDv7 in canonical lower-case 8-4-4-4-12 text."""
    return str(uuid_utils.uuid7())


def mint_uuid7s(count: int) -> list[str]:
    """`count` new UUIDv7s, each greater than the one before (the generator's order)."""
    uuid7 = uuid_utils.uuid7
    return [str(uuid7()) for _ in range(count)]


def mint_uuid7_after(last: str) -> str:
    """A new UUIDv7 greater than `last` (a canonical UUIDv7 text, or "" for none)."""
    fresh = str(uuid_utils.uuid7())
    # Canonical lower-case UUID text sorts like the 128-bit number it spells.
    if fresh > last:
        return fresh
    return uuid7_successor(last)


def uuid7_successor(text: str) -> str:
    """The next UUIDv7 after `text`: its counter (rand_a, rand_b) + 1, carrying into the
    millisecond only when the counter is exhausted."""
    value = uuid.UUID(text).int
    millis = value >> 80
    counter = (((value >> 64) & 0xFFF) << _RAND_B_BITS) | (value & _RAND_B_MASK)
    counter += 1
    if counter >> _COUNTER_BITS:
        millis, counter = millis + 1, 0
    rand_a, rand_b = counter >> _RAND_B_BITS, counter & _RAND_B_MASK
    successor = (millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=successor))
