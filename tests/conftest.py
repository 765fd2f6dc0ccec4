"""Shared test helpers."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def thread_id() -> str:
    """A thread id no other test uses (stores may be shared, e.g. one PostgreSQL database)."""
    return f"thread-{uuid.uuid4()}"
