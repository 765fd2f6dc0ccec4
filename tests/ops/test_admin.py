"""`turnid backup`, `turnid check`, `turnid stats` on SQLite files (the service may be running)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

from turnid.service.admin import backup_sqlite, check
from turnid.service.domain import TurnService
from turnid.service.stores.sqlite import SqliteStore

from .helpers import admin

REALTIME, COMPACTION, USER = 1, 2, 3


async def fill(path: Path, thread_id: str) -> None:
    """Two namespaces; every kind, a batch, request ids and a claim."""
    store = SqliteStore(str(path))
    await store.open()
    try:
        service = TurnService(store)
        for namespace in ("", "tenant-a"):
            await service.allocate(thread_id, REALTIME, "r1", namespace=namespace)
            await service.allocate(thread_id, COMPACTION, namespace=namespace)
            await service.allocate_batch(thread_id, USER, 3, "b1", namespace=namespace)
            await service.allocate(thread_id, COMPACTION, "c1", namespace=namespace)
            await service.claim(thread_id, "rollout-7", USER, "k1", namespace=namespace)
            await service.allocate(thread_id, COMPACTION, namespace=namespace)
    finally:
        await store.close()


async def test_check_reports_a_good_file_clean(tmp_path: Path, thread_id: str) -> None:
    path = tmp_path / "turnid.db"
    await fill(path, thread_id)
    status, out, err = admin("check", "--database", f"sqlite://{path}")
    assert (status, err) == (0, "")
    assert "is consistent" in out


async def test_check_finds_a_planted_gap_and_a_wrong_counter(
    tmp_path: Path, thread_id: str
) -> None:
    path = tmp_path / "turnid.db"
    await fill(path, thread_id)
    with sqlite3.connect(path) as conn:
        conn.execute(
            "DELETE FROM turns WHERE namespace = '' AND thread_id = ? AND sequence = 3",
            (thread_id,),
        )
        conn.execute(
            "UPDATE threads SET next_compaction = next_compaction + 1 "
            "WHERE namespace = 'tenant-a' AND thread_id = ?",
            (thread_id,),
        )
    status, out, _ = admin("check", "--database", f"sqlite://{path}")
    assert status == 1
    lines = out.splitlines()
    assert f"thread {thread_id!r}: sequence 3 is missing" in lines
    # the deleted turn was the first of request b1's batch: its record no longer matches
    assert any("request 'b1'" in line and "2 of its 3 turns" in line for line in lines)
    assert (
        f"namespace 'tenant-a' thread {thread_id!r}: next_compaction is 4, expected 3 "
        "(3 compaction turns)"
    ) in lines
    assert all(thread_id in line for line in lines), lines


async def test_check_finds_a_skipped_compaction_number(tmp_path: Path, thread_id: str) -> None:
    path = tmp_path / "turnid.db"
    await fill(path, thread_id)
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE turns SET turn_id = 'auto-compact-5' WHERE namespace = '' AND "
            "thread_id = ? AND turn_id = 'auto-compact-1'",
            (thread_id,),
        )
    problems = check(f"sqlite://{path}")
    assert any("expected 'auto-compact-1'" in line for line in problems), problems


async def test_stats(tmp_path: Path, thread_id: str) -> None:
    path = tmp_path / "turnid.db"
    await fill(path, thread_id)
    status, out, _ = admin("stats", "--json", "--database", f"sqlite://{path}")
    assert status == 0
    figures = json.loads(out)
    assert figures["namespaces"] == 2
    assert figures["threads"] == 2
    assert figures["turns"] == 2 * 8
    assert figures["turns_by_kind"] == {
        "realtime_delegation": 2,
        "auto_compaction": 6,
        "user_input": 8,
    }
    assert figures["claimed_turns"] == 2
    assert figures["requests"] == 2 * 4
    assert figures["longest_thread_turns"] == 8
    assert figures["file_bytes"] > 0
    status, out, _ = admin("stats", "--database", f"sqlite://{path}")
    assert status == 0
    assert "threads        2" in out


async def test_backup_under_load_passes_check_and_serves_every_acknowledged_turn(
    tmp_path: Path, thread_id: str
) -> None:
    path = tmp_path / "turnid.db"
    dest = tmp_path / "backup.db"
    store = SqliteStore(str(path))
    await store.open()
    service = TurnService(store)
    acknowledged: list[tuple[str, str]] = []  # (thread, turn_id), in acknowledgement order
    backing_up = asyncio.Event()
    done = asyncio.Event()

    async def writer(index: int) -> None:
        thread = f"{thread_id}-{index}"
        for step in range(2000):  # bounded; stops once the backup is done
            if done.is_set() and step > 20:
                return
            kind = COMPACTION if step % 3 == 0 else REALTIME
            if step % 5 == 0:
                turns = await service.allocate_batch(thread, USER, 4, f"req-{step}")
            else:
                turns = [await service.allocate(thread, kind)]
            acknowledged.extend((thread, turn.turn_id) for turn in turns)
            if len(acknowledged) >= 200:
                backing_up.set()

    writers = [asyncio.create_task(writer(index)) for index in range(4)]
    try:
        await asyncio.wait_for(backing_up.wait(), 60)
        before = list(acknowledged)  # every turn acknowledged before the backup starts
        result = await asyncio.to_thread(backup_sqlite, f"sqlite://{path}", dest)
        during = len(acknowledged) - len(before)
        done.set()
        await asyncio.gather(*writers)
    finally:
        done.set()
        for task in writers:
            task.cancel()
        await store.close()
    assert result["turns"] >= len(before)
    assert during >= 0
    assert check(f"sqlite://{dest}") == []
    # The copy serves: a store opened on it has every turn acknowledged before the backup.
    restored = SqliteStore(str(dest))
    await restored.open()
    try:
        for thread, turn_id in before:
            assert await restored.get("", thread, turn_id) is not None, (thread, turn_id)
    finally:
        await restored.close()


async def test_backup_refuses_an_existing_file_unless_forced(
    tmp_path: Path, thread_id: str
) -> None:
    path = tmp_path / "turnid.db"
    await fill(path, thread_id)
    dest = tmp_path / "copy.db"
    dest.write_text("precious")
    database = f"sqlite://{path}"
    status, _, err = admin("backup", str(dest), "--database", database)
    assert status == 1
    assert "exists; pass --force" in err
    assert dest.read_text() == "precious"
    status, out, _ = admin("backup", str(dest), "--force", "--database", database)
    assert status == 0
    assert "16 turns in 2 threads" in out
    assert check(f"sqlite://{dest}") == []
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob("*.tmp-*")))


def test_unsupported_databases_exit_2(tmp_path: Path) -> None:
    status, _, err = admin("backup", str(tmp_path / "x.db"), "--database", "postgresql://h/db")
    assert status == 2
    assert "pg_dump" in err
    status, _, err = admin("check", "--database", "memory:")
    assert status == 2
    status, _, err = admin("check", "--database", f"sqlite://{tmp_path / 'missing.db'}")
    assert status == 1
    assert "no SQLite database at" in err
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    status, _, err = admin("stats", "--database", f"sqlite://{empty}")
    assert status == 2
    assert "not a turnid database" in err
