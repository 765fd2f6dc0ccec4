"""`turnid check` / `turnid stats` against PostgreSQL, in a private schema of the shared DB."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest

from turnid.service.admin import check, stats
from turnid.service.domain import TurnService

from .helpers import admin

POSTGRES_DSN = os.environ.get("TURNID_TEST_POSTGRES_DSN")
pytestmark = pytest.mark.postgres


@pytest.fixture
async def schema_url() -> AsyncIterator[str]:
    """The test DSN with search_path set to a fresh schema, migrated; dropped afterwards."""
    if not POSTGRES_DSN:
        pytest.skip("TURNID_TEST_POSTGRES_DSN is not set")
    import psycopg
    from psycopg import sql

    from turnid.service.stores.postgres import migrate

    schema = f"turnid_ops_{uuid.uuid4().hex[:12]}"
    separator = "&" if "?" in POSTGRES_DSN else "?"
    url = f"{POSTGRES_DSN}{separator}options=-csearch_path%3D{schema}"
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        await migrate(url)
        yield url
    finally:
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


async def test_check_and_stats_on_postgresql(schema_url: str, thread_id: str) -> None:
    import psycopg

    from turnid.service.stores.postgres import PostgresStore

    store = PostgresStore(schema_url)
    await store.open()
    try:
        service = TurnService(store)
        for namespace in ("", "tenant-a"):
            await service.allocate(thread_id, 1, "r1", namespace=namespace)
            await service.allocate(thread_id, 2, namespace=namespace)
            await service.allocate_batch(thread_id, 3, 3, "b1", namespace=namespace)
            await service.claim(thread_id, "rollout-7", 3, "k1", namespace=namespace)
            await service.allocate(thread_id, 2, namespace=namespace)
    finally:
        await store.close()

    assert check(schema_url) == []
    figures = stats(schema_url)
    assert (figures["threads"], figures["turns"], figures["requests"]) == (2, 14, 6)
    assert figures["turns_by_kind"]["auto_compaction"] == 4

    with psycopg.connect(schema_url, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM turns WHERE namespace = '' AND thread_id = %s AND sequence = 2",
            (thread_id,),
        )
        conn.execute(
            "UPDATE threads SET next_sequence = next_sequence + 5 "
            "WHERE namespace = 'tenant-a' AND thread_id = %s",
            (thread_id,),
        )
    status, out, _ = admin("check", "--database", schema_url)
    assert status == 1
    lines = out.splitlines()
    assert f"thread {thread_id!r}: sequence 2 is missing" in lines
    # sequence 2 was auto-compact-0: the thread's compactions now start at 1
    assert any("expected 'auto-compact-0'" in line for line in lines), lines
    assert any("next_compaction is 2, expected 1" in line for line in lines), lines
    assert (
        f"namespace 'tenant-a' thread {thread_id!r}: next_sequence is 13, expected 8 "
        "(last sequence 7)"
    ) in lines
    status, _, err = admin("backup", "/tmp/never.db", "--database", schema_url)
    assert status == 2
    assert "pg_dump" in err
