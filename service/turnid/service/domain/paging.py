"""Opaque AIP-158 page tokens: the last sequence served, bound to the thread it was for.

A token is accepted only in exactly the form `encode` writes (no sign, padding, leading zeros,
underscores or non-ASCII digits), so a token that the service did not issue is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from turnid.service.domain.errors import invalid_field

_VERSION = "1"
_ISSUED = re.compile(r"1\.([0-9a-f]{12})\.([1-9][0-9]{0,18})")


def _thread_tag(namespace: str, thread_id: str) -> str:
    key = f"{namespace}\x00{thread_id}".encode()
    return hashlib.blake2s(key, digest_size=6).hexdigest()


def encode(namespace: str, thread_id: str, after_sequence: int) -> str:
    raw = f"{_VERSION}.{_thread_tag(namespace, thread_id)}.{after_sequence}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(namespace: str, thread_id: str, token: str) -> int:
    """The sequence to list after; 0 for the first page."""
    if not token:
        return 0
    match = None
    if token.isascii() and "=" not in token:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
            match = _ISSUED.fullmatch(raw)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            match = None
    if (
        match is None
        or encode(namespace, thread_id, int(match[2])) != token
        or match[1] != _thread_tag(namespace, thread_id)
        or int(match[2]) >= 2**63
    ):
        raise invalid_field(
            "INVALID_PAGE_TOKEN",
            "page_token",
            "page_token was not issued by ListTurns for this thread",
            page_token=token[:300],
        )
    return int(match[2])
