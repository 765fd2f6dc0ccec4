"""Opaque AIP-158 page tokens: the last sequence served, bound to the thread it was for."""

from __future__ import annotations

import base64
import binascii
import hashlib

from turnid.service.domain.errors import invalid_field

_VERSION = "1"


def _thread_tag(thread_id: str) -> str:
    return hashlib.blake2s(thread_id.encode(), digest_size=6).hexdigest()


def encode(thread_id: str, after_sequence: int) -> str:
    raw = f"{_VERSION}.{_thread_tag(thread_id)}.{after_sequence}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(thread_id: str, token: str) -> int:
    """The sequence to list after; 0 for the first page."""
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, tag, after = raw.split(".")
        after_sequence = int(after)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        after_sequence = -1
        version = tag = ""
    if version != _VERSION or tag != _thread_tag(thread_id) or not 1 <= after_sequence < 2**63:
        raise invalid_field(
            "INVALID_PAGE_TOKEN",
            "page_token",
            "page_token was not issued by ListTurns for this thread",
            page_token=token[:300],
        )
    return after_sequence
