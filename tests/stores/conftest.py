"""The store fixture: every test in tests/stores runs against every store.

PostgreSQL joins when TURNID_TEST_POSTGRES_DSN is set (CI sets it); otherwise it is skipped
with that reason.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from turnid.service.stores import Store, open_store

POSTGRES_DSN = os.environ.get("TURNID_TEST_POSTGRES_DSN")

StoreFactory = Callable[[], Awaitable[Store]]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """Opens stores over one shared backing database; `durable` says if reopening keeps data."""
    kind = request.param
    if kind == "memory":
        url = "memory:"
    elif kind == "sqlite":
        url = f"sqlite://{tmp_path / 'turnid.db'}"
    else:
        if not POSTGRES_DSN:
            pytest.skip("TURNID_TEST_POSTGRES_DSN is not set")
        url = POSTGRES_DSN
    opened: list[Store] = []
    memory = open_store(url) if kind == "memory" else None

    async def factory() -> Store:
        store = memory if memory is not None else open_store(url)
        if store not in opened:
            await store.open()
            opened.append(store)
        return store

    factory.durable = kind != "memory"  # type: ignore[attr-defined]
    yield factory
    for store in opened:
        await store.close()


@pytest.fixture
async def store(store_factory: StoreFactory) -> Store:
    return await store_factory()
