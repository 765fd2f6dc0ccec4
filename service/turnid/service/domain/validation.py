"""Input limits (DESIGN.md, "Limits"). Each failure has its own reason and names its field."""

from __future__ import annotations

from turnid.service.domain.errors import invalid_field
from turnid.service.domain.model import COMPACTION_PREFIX, TurnKind

MAX_ID_BYTES = 256
MAX_REQUEST_ID_CHARS = 128
MAX_BATCH = 1000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

_KINDS = {kind.value: kind for kind in TurnKind}


def _id_problem(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID_BYTES or len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return f"must be at most {MAX_ID_BYTES} bytes of UTF-8"
    # isprintable() is False for control, format, surrogate, unassigned and separator
    # characters except the ASCII space, which we refuse as well.
    if not value.isprintable() or " " in value:
        return "must not contain whitespace or control characters"
    return None


def thread_id(value: str) -> str:
    problem = _id_problem(value)
    if problem:
        raise invalid_field(
            "INVALID_THREAD_ID", "thread_id", f"thread_id {problem}", thread_id=value[:300]
        )
    return value


def turn_id(value: str) -> str:
    problem = _id_problem(value)
    if problem:
        raise invalid_field("INVALID_TURN_ID", "turn_id", f"turn_id {problem}", turn_id=value[:300])
    return value


def claimable_turn_id(value: str) -> str:
    turn_id(value)
    if value.startswith(COMPACTION_PREFIX):
        raise invalid_field(
            "RESERVED_TURN_ID",
            "turn_id",
            f"ids starting with {COMPACTION_PREFIX!r} belong to the compaction counter "
            "and cannot be claimed",
            turn_id=value,
        )
    return value


def kind(value: int) -> TurnKind:
    found = _KINDS.get(value)
    if found is None:
        raise invalid_field(
            "INVALID_KIND",
            "kind",
            "kind must be REALTIME_DELEGATION, AUTO_COMPACTION or USER_INPUT",
            kind=str(value),
        )
    return found


def claimable_kind(value: int) -> TurnKind:
    found = kind(value)
    if found is TurnKind.AUTO_COMPACTION:
        raise invalid_field(
            "INVALID_KIND",
            "kind",
            "AUTO_COMPACTION turns are numbered by the service and cannot be claimed",
            kind=str(value),
        )
    return found


def request_id(value: str) -> str:
    if value and (
        len(value) > MAX_REQUEST_ID_CHARS or not (value.isascii() and value.isprintable())
    ):
        raise invalid_field(
            "INVALID_REQUEST_ID",
            "request_id",
            f"request_id must be empty or 1-{MAX_REQUEST_ID_CHARS} printable ASCII characters",
            request_id=value[:300],
        )
    return value


def count(value: int) -> int:
    if not 1 <= value <= MAX_BATCH:
        raise invalid_field(
            "INVALID_COUNT", "count", f"count must be within 1..{MAX_BATCH}", count=str(value)
        )
    return value


def page_size(value: int) -> int:
    if value < 0:
        raise invalid_field(
            "INVALID_PAGE_SIZE",
            "page_size",
            "page_size must not be negative",
            page_size=str(value),
        )
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def expected_last_sequence(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise invalid_field(
            "INVALID_SEQUENCE",
            "expected_last_sequence",
            "expected_last_sequence must not be negative",
            expected_last_sequence=str(value),
        )
    return value


def after_sequence(value: int) -> int:
    if value < 0:
        raise invalid_field(
            "INVALID_SEQUENCE",
            "after_sequence",
            "after_sequence must not be negative",
            after_sequence=str(value),
        )
    return value
