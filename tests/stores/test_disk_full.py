"""A disk that fills up under the SQLite store: a 2 MB tmpfs, mounted where the test may.

While the disk is full, every write fails UNAVAILABLE or RESOURCE_EXHAUSTED with a turnid
ErrorInfo (never INTERNAL, never a crash, never a partial write); reads go on; once space is
freed the same request_ids succeed, the thread stays gap-free and `PRAGMA integrity_check`
is ok. `turnid serve` on a full disk exits with one line that names the cause.

Mounting needs root (or CAP_SYS_ADMIN); elsewhere these tests skip and say why.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from turnid.service.config import ServerConfig
from turnid.service.server import TurnIdServer
from turnid.v1 import turnid_pb2 as pb
from turnid.v1 import turnid_pb2_grpc as pb_grpc

from ..e2e.serve_process import ServeProcess
from ..grpc_helpers import error_details

DISK = "2m"
# What a write may answer while the disk is full: a store outage, or the store out of room.
FULL_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
NAMES_THE_CAUSE = re.compile(r"full|no space|ENOSPC", re.IGNORECASE)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 2 MB tmpfs, unmounted afterwards whatever happens."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(path: Path, leave: int = 0) -> None:
    """Write `path` until the disk has at most `leave` bytes free (0: until ENOSPC)."""
    stats = os.statvfs(path.parent)
    budget = stats.f_bavail * stats.f_frsize - leave if leave else None
    chunk = b"\0" * 4096
    written = 0
    with open(path, "ab", buffering=0) as f:  # unbuffered: nothing left to flush at close
        while budget is None or written + len(chunk) <= budget:
            try:
                written += f.write(chunk) or 0
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
                break
    with contextlib.suppress(OSError):
        os.sync()


def integrity(database: Path) -> str:
    conn = sqlite3.connect(database)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


async def write(stub: pb_grpc.TurnIdServiceStub, thread_id: str, kind: int, rid: str) -> Any:
    """A batch of 50 turns: the answer, or the AioRpcError."""
    try:
        response = await stub.BatchAllocateTurnIds(
            pb.BatchAllocateTurnIdsRequest(
                thread_id=thread_id, kind=kind, count=50, request_id=rid
            ),
            timeout=30,
        )
        return list(response.turns)
    except grpc.aio.AioRpcError as error:
        return error


async def test_allocations_while_the_disk_fills_then_frees(small_disk: Path) -> None:
    database = small_disk / "turnid.db"
    filler = small_disk / "filler"
    thread_id = f"disk-{uuid.uuid4()}"
    server = TurnIdServer(ServerConfig(listen="127.0.0.1:0", database=f"sqlite://{database}"))
    await server.start()
    acknowledged: dict[str, list[pb.Turn]] = {}
    refused: dict[str, tuple[int, grpc.StatusCode, str]] = {}  # rid -> (kind, code, reason)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.TurnIdServiceStub(channel)
            first = await write(stub, thread_id, pb.TURN_KIND_AUTO_COMPACTION, "before-full")
            assert isinstance(first, list), first
            acknowledged["before-full"] = first
            fill(filler, leave=256 * 1024)  # the rest goes to turns

            for step in range(200):
                kind = (pb.TURN_KIND_AUTO_COMPACTION, pb.TURN_KIND_REALTIME_DELEGATION)[step % 2]
                rid = f"fill-{step}"
                answer = await write(stub, thread_id, kind, rid)
                if isinstance(answer, list):
                    acknowledged[rid] = answer
                    continue
                code, info, _ = error_details(answer)  # one ErrorInfo, domain turnid
                assert code in FULL_CODES, f"{rid}: {code.name}/{info.reason}: {answer.details()}"
                assert info.reason in ("STORAGE_FULL", "STORE_UNAVAILABLE"), info.reason
                refused[rid] = (kind, code, info.reason)
                if len(refused) >= 6:
                    break
            assert refused, "the disk never filled up"
            print(
                f"{len(acknowledged)} batches before the disk was full; refusals: "
                + ", ".join(f"{c.name}/{r}" for _, c, r in refused.values())
            )

            # Full: reads still answer, and show no trace of the refused writes.
            turns = await stub.ListTurns(
                pb.ListTurnsRequest(thread_id=thread_id, page_size=1000), timeout=30
            )
            assert {t.request_id for t in turns.turns} <= acknowledged.keys()
            got = await stub.GetTurn(
                pb.GetTurnRequest(thread_id=thread_id, turn_id="auto-compact-0"), timeout=30
            )
            assert got.turn == first[0]

            filler.unlink()  # space again: the refused steps, retried, go through
            for rid, (kind, _, _) in refused.items():
                answer = await write(stub, thread_id, kind, rid)
                assert isinstance(answer, list), f"{rid} after freeing space: {answer}"
                acknowledged[rid] = answer
                assert await write(stub, thread_id, kind, rid) == answer  # and replay

            listed: list[pb.Turn] = []
            token = ""
            while True:
                page = await stub.ListTurns(
                    pb.ListTurnsRequest(thread_id=thread_id, page_size=1000, page_token=token),
                    timeout=30,
                )
                listed.extend(page.turns)
                if not (token := page.next_page_token):
                    break
            assert [t.sequence for t in listed] == list(range(1, len(listed) + 1))
            compactions = [t.turn_id for t in listed if t.kind == pb.TURN_KIND_AUTO_COMPACTION]
            assert compactions == [f"auto-compact-{n}" for n in range(len(compactions))]
            assert sorted(listed, key=lambda t: t.sequence) == sorted(
                (t for turns in acknowledged.values() for t in turns), key=lambda t: t.sequence
            ), "the thread holds exactly the acknowledged turns"
    finally:
        await server.stop(grace=0)
    assert integrity(database) == "ok"


def start_up_error(disk: Path, name: str) -> str:
    """`turnid serve` on the file `name` on `disk`: what it exits with (it must not start),
    with the path (which holds the test's name) left out."""
    with pytest.raises(RuntimeError) as exited:
        server = ServeProcess(f"sqlite://{disk / name}")
        server.kill()
    log = str(exited.value).replace(str(disk), "<disk>")
    assert "Traceback" not in log, log
    return log


@pytest.mark.e2e
def test_start_up_on_a_full_disk_names_the_cause_new_file(small_disk: Path) -> None:
    fill(small_disk / "filler")
    log = start_up_error(small_disk, "new.db")
    assert "cannot rollback" not in log, log
    assert NAMES_THE_CAUSE.search(log), f"start-up error does not say the disk is full: {log}"


@pytest.mark.e2e
def test_start_up_on_a_full_disk_names_the_cause_existing_file(small_disk: Path) -> None:
    database = small_disk / "old.db"

    async def create() -> None:
        server = TurnIdServer(ServerConfig(listen="127.0.0.1:0", database=f"sqlite://{database}"))
        await server.start()
        async with grpc.aio.insecure_channel(server.target) as channel:
            await pb_grpc.TurnIdServiceStub(channel).AllocateTurnId(
                pb.AllocateTurnIdRequest(thread_id="t", kind=pb.TURN_KIND_AUTO_COMPACTION),
                timeout=30,
            )
        await server.stop(grace=0)

    asyncio.run(create())
    fill(small_disk / "filler")
    log = start_up_error(small_disk, "old.db")
    assert "cannot rollback" not in log, log
    assert NAMES_THE_CAUSE.search(log), f"start-up error does not say the disk is full: {log}"
