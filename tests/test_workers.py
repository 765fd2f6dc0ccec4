"""`turnid serve --workers N`: several processes on one port and one SQLite file."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from turnid.v1 import turnid_pb2, turnid_pb2_grpc

pytestmark = pytest.mark.e2e

_ALL_SERVING = re.compile(r"turnid serving on (\S+) with (\d+) workers")
_STORE_CLOSED = re.compile(r"sqlite\.?\S*\[(\d+)\]: sqlite store closed: (\d+) allocations")


class Workers:
    """`turnid serve --workers N` in a subprocess; `target` once every worker serves."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "turnid.service.cli", "serve", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={"TURNID_DRAIN": "0", **os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.log: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_serving(self) -> str:
        while (line := self._lines.get(timeout=60)) is not None:
            if match := _ALL_SERVING.search(line):
                return match.group(1)
        raise AssertionError(f"turnid serve exited: {''.join(self.log)}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def _allocate_on_fresh_connection(
    target: str, thread_id: str, kind: int, n: int
) -> turnid_pb2.Turn:
    # A local subchannel pool makes each channel open its own TCP connection, which the kernel
    # hands to one of the workers.
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = turnid_pb2_grpc.TurnIdServiceStub(channel)
        response = stub.AllocateTurnId(
            turnid_pb2.AllocateTurnIdRequest(thread_id=thread_id, kind=kind, request_id=f"r-{n}"),
            timeout=30,
        )
    return response.turn


def test_two_workers_share_one_sqlite_file(tmp_path: Path, thread_id: str) -> None:
    database = f"sqlite://{tmp_path / 'turnid.db'}"
    workers = Workers("--listen", "127.0.0.1:0", "--database", database, "--workers", "2")
    try:
        target = workers.wait_serving()
        kinds = [
            turnid_pb2.TURN_KIND_AUTO_COMPACTION if n % 3 == 0 else turnid_pb2.TURN_KIND_USER_INPUT
            for n in range(60)
        ]
        turns = [
            _allocate_on_fresh_connection(target, thread_id, kind, n)
            for n, kind in enumerate(kinds)
        ]
        assert workers.stop() == 0
    finally:
        workers.kill()

    assert len({turn.turn_id for turn in turns}) == len(turns)
    assert sorted(turn.sequence for turn in turns) == list(range(1, len(turns) + 1))
    compactions = [t.turn_id for t in turns if t.kind == turnid_pb2.TURN_KIND_AUTO_COMPACTION]
    assert compactions == [f"auto-compact-{n}" for n in range(len(compactions))]
    # Both workers served: 60 connections all landing on one of two is a 2^-59 chance.
    served = {pid: int(count) for pid, count in _STORE_CLOSED.findall("".join(workers.log))}
    assert len(served) == 2, workers.log
    assert all(count > 0 for count in served.values()), served
    assert sum(served.values()) == len(turns)


def test_workers_refuse_the_memory_store() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "turnid.service.cli",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            "memory:",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "memory:" in result.stderr and "same turn ids" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "--workers" in result.stderr


_WORKER_SERVING = re.compile(r"\[(\d+)\]: turnid serving on ")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_when_the_parent_is_killed(tmp_path: Path) -> None:
    import select

    database = f"sqlite://{tmp_path / 'turnid.db'}"
    workers = Workers("--listen", "127.0.0.1:0", "--database", database, "--workers", "2")
    try:
        workers.wait_serving()
        # Each worker logged its own "serving" line (with its pid) before the parent's.
        pids = {int(pid) for pid in _WORKER_SERVING.findall("".join(workers.log))}
        assert len(pids) == 2, workers.log
        assert workers.process.pid not in pids
        handles = {os.pidfd_open(pid): pid for pid in pids}
        try:
            workers.process.kill()  # SIGKILL: the parent cannot pass anything on
            workers.process.wait(30)
            remaining = dict(handles)
            while remaining:
                ready, _, _ = select.select(list(remaining), [], [], 30)
                assert ready, f"workers {sorted(remaining.values())} outlived their parent"
                for handle in ready:
                    del remaining[handle]
        finally:
            for handle in handles:
                os.close(handle)
    finally:
        workers.kill()
        for pid in _WORKER_SERVING.findall("".join(workers.log)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def test_sigterm_stops_every_worker_and_exits_zero(tmp_path: Path) -> None:
    database = f"sqlite://{tmp_path / 'turnid.db'}"
    workers = Workers("--listen", "127.0.0.1:0", "--database", database, "--workers", "2")
    try:
        workers.wait_serving()
        assert workers.stop() == 0
        log = "".join(workers.log)
        assert log.count("INFO turnid.server[") and log.count(": stopped\n") == 2, log
    finally:
        workers.kill()
