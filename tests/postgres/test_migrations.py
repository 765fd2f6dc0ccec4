"""Migration 0001 -> 0002 on a version-1 schema with rows: namespaces lead every key, existing
rows move to the namespace "", and the thread rows gain the state decide() needs (the greatest
minted id, the greatest claimed id, create and update times), computed from the turns."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from turnid.service.domain import Allocation, TurnKind
from turnid.service.domain.minting import mint_uuid7
from turnid.service.stores.postgres import SCHEMA_TABLE, migrate, migrations

from .conftest import StoreMaker

pytestmark = pytest.mark.postgres

REALTIME, COMPACTION, USER = (
    TurnKind.REALTIME_DELEGATION,
    TurnKind.AUTO_COMPACTION,
    TurnKind.USER_INPUT,
)
# A UUIDv7 from a clock a day ahead (counter 0): the greatest minted id of thread "a".
_NOW_MS = uuid.UUID(mint_uuid7()).int >> 80
FUTURE = str(uuid.UUID(int=(_NOW_MS + 86_400_000) << 80 | 0x7 << 76 | 0b10 << 62))


async def _v1_schema_with_rows(url: str) -> dict[str, list[tuple[object, ...]]]:
    """Applies 0001 by hand (as a turnid of version 1 would have) and writes rows for two
    threads: "a" (minted ids, compactions, a claim, request_ids) and "b" (only claims)."""
    first = migrations()[0]
    minted = sorted(mint_uuid7() for _ in range(2))
    turns_a = [
        (1, minted[0], REALTIME, "r1", False, 1_000),
        (2, "auto-compact-0", COMPACTION, "", False, 2_000),
        (3, FUTURE, USER, "r3", False, 3_000),
        (4, "zzz-claimed", USER, "r4", True, 4_000),  # sorts above every UUID
        (5, minted[1], REALTIME, "", False, 5_000),
        (6, "auto-compact-1", COMPACTION, "r6", False, 6_000),
    ]
    turns_b = [(1, "rollout-2", USER, "", True, 7_000), (2, "Rollout-9", USER, "", True, 8_000)]
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    async with conn, conn.transaction():
        await conn.execute(first.sql)
        await conn.execute(
            f"CREATE TABLE {SCHEMA_TABLE} (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        await conn.execute(f"INSERT INTO {SCHEMA_TABLE} VALUES (1, %s)", (first.name,))
        for thread_id, turns, compactions in (("a", turns_a, 2), ("b", turns_b, 0)):
            await conn.execute(
                "INSERT INTO threads VALUES (%s, %s, %s)",
                (thread_id, len(turns) + 1, compactions),
            )
            for seq, turn_id, kind, request_id, claimed, created in turns:
                await conn.execute(
                    "INSERT INTO turns (thread_id, sequence, turn_id, kind, request_id, "
                    "claimed, create_time_us) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (thread_id, seq, turn_id, int(kind), request_id, claimed, created),
                )
                if request_id:
                    await conn.execute(
                        "INSERT INTO requests VALUES (%s, %s, %s, 1, %s, %s)",
                        (thread_id, request_id, int(kind), turn_id if claimed else None, seq),
                    )
    return {"a": turns_a, "b": turns_b}


async def test_0001_to_0002_keeps_every_row_in_the_default_namespace(
    schema_url: str, make_store: StoreMaker
) -> None:
    rows = await _v1_schema_with_rows(schema_url)
    result = await migrate(schema_url)
    assert list(result.applied) == ["0002_namespaces.sql"]

    async with await psycopg.AsyncConnection.connect(schema_url) as conn:
        cursor = await conn.execute(
            "SELECT namespace, thread_id, next_sequence, next_compaction, last_minted, "
            "max_claimed, create_time_us, update_time_us FROM threads ORDER BY thread_id"
        )
        assert await cursor.fetchall() == [
            ("", "a", 7, 2, FUTURE, "zzz-claimed", 1_000, 6_000),
            # Byte order, not the database's collation: "R" < "r".
            ("", "b", 3, 0, "", "rollout-2", 7_000, 8_000),
        ]
        cursor = await conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE conrelid::regclass::text IN ('threads', 'turns', "
            "'requests') ORDER BY 1, 2"
        )
        assert await cursor.fetchall() == [
            ("requests", "requests_pkey", "PRIMARY KEY (namespace, thread_id, request_id)"),
            ("threads", "threads_pkey", "PRIMARY KEY (namespace, thread_id)"),
            ("turns", "turns_pkey", "PRIMARY KEY (namespace, thread_id, sequence)"),
            ("turns", "turns_turn_id_key", "UNIQUE (namespace, thread_id, turn_id)"),
        ]
        cursor = await conn.execute(
            "SELECT DISTINCT namespace FROM turns UNION SELECT namespace FROM requests"
        )
        assert await cursor.fetchall() == [("",)]

    store = await make_store()
    listed = await store.list("", "a", 0, 100)
    assert [(t.sequence, t.turn_id, t.request_id, t.claimed) for t in listed] == [
        (seq, turn_id, request_id, claimed) for seq, turn_id, _, request_id, claimed, _ in rows["a"]
    ]
    assert await store.get("", "a", FUTURE) == listed[2]
    # Old request_ids replay; new allocations continue the counters, and a minted id follows
    # the greatest id minted before the migration (invariant 8), even one from a fast clock.
    assert await store.allocate(Allocation("a", USER, 1, "r3")) == [listed[2]]
    (compaction,) = await store.allocate(Allocation("a", COMPACTION, 1))
    assert (compaction.sequence, compaction.turn_id) == (7, "auto-compact-2")
    (minted,) = await store.allocate(Allocation("a", REALTIME, 1))
    assert minted.sequence == 8 and minted.turn_id > FUTURE
    assert minted.turn_id[:13] == FUTURE[:13]  # the fast clock's millisecond, counter + 1
    info = await store.get_thread("", "b")
    assert info is not None and info.state.last_sequence == 2
    assert await store.get_thread("x", "a") is None
