"""A crash loop under load: `turnid serve` on one SQLite file, SIGKILLed again and again while
several clients allocate, and restarted on the same port and file each time.

Every client gives each logical step its own request_id and repeats it (same request_id, same
parameters) until it is acknowledged, as a reconnecting orchestrator does (invariant 9). The
kills come after a random number of acknowledgements, so they land mid-group-commit, between
commits, right after a start, wherever the load puts them. At the end (invariants 1, 2, 4, 5,
6, 8):

* every acknowledged turn reads back unchanged (GetTurn), and the threads hold exactly the
  acknowledged turns: none lost, none doubled by a retry that minted again;
* no turn id repeats in a thread; `sequence` is 1..n and `auto-compact-N` 0..k-1, gap-free;
* a batch's turns have consecutive sequences; minted UUIDv7s rise with `sequence`;
* every request_id, sent once more, returns its first answer.

The seed is printed; TURNID_CRASH_SEED=N repeats a run's choices (not its timing).
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from turnid.v1 import turnid_pb2 as pb
from turnid.v1 import turnid_pb2_grpc as pb_grpc

from .serve_process import ServeProcess

pytestmark = pytest.mark.e2e

CLIENTS = 6
KILLS = 10
THREADS = 3
KINDS = (
    pb.TURN_KIND_REALTIME_DELEGATION,
    pb.TURN_KIND_AUTO_COMPACTION,
    pb.TURN_KIND_USER_INPUT,
)
ATTEMPT_TIMEOUT = 10.0  # seconds one attempt may take (wait_for_ready waits out a restart)
STEP_DEADLINE = 60.0  # seconds a logical step may take, retries included
# A server that is down answers no call; one that is killed mid-call breaks it. Both are
# UNAVAILABLE (or the attempt's deadline); RESOURCE_EXHAUSTED is overload. Nothing else is.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Short reconnect backoff: gRPC's default grows to 120 s, longer than the whole test.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 300),
]


@dataclass
class Step:
    """One logical step: what was asked (with its request_id) and its acknowledged answer."""

    method: str  # "AllocateTurnId" or "BatchAllocateTurnIds"
    request: Any
    turns: list[pb.Turn]
    attempts: int


class Load:
    """The clients' shared bookkeeping, and the trigger for the next kill."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.steps: list[Step] = []
        self.acks = 0
        self.kill_at = rng.randint(1, 40)
        self.kill_now = asyncio.Event()
        self.stop = False
        self.retries = 0

    def acknowledged(self, step: Step) -> None:
        self.steps.append(step)
        self.acks += 1
        self.retries += step.attempts - 1
        if self.acks >= self.kill_at:
            self.kill_now.set()


async def until_acknowledged(
    channel: grpc.aio.Channel, method: str, request: Any
) -> tuple[Any, int]:
    """The call, repeated with the same request (so the same request_id) until answered."""
    call = getattr(pb_grpc.TurnIdServiceStub(channel), method)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP_DEADLINE
    attempts = 0
    while True:
        attempts += 1
        try:
            response = await call(request, timeout=ATTEMPT_TIMEOUT, wait_for_ready=True)
            return response, attempts
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE or loop.time() >= deadline:
                raise AssertionError(
                    f"{method} {request.request_id}: {error.code().name} {error.details()} "
                    f"(attempt {attempts})"
                ) from error
        # A backoff between attempts (not a wait for an event): a server that answers
        # UNAVAILABLE at once, e.g. while it starts, is not hammered.
        await asyncio.sleep(random.uniform(0.005, 0.03))


async def client(index: int, target: str, thread_ids: list[str], load: Load) -> None:
    rng = random.Random(load.rng.random())
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        step = 0
        while not load.stop:
            step += 1
            mine = [s for s in load.steps if s.request.request_id.startswith(f"c{index}-")]
            if mine and rng.random() < 0.1:
                # A retry of an earlier step, maybe from before a crash: its first answer.
                earlier = rng.choice(mine)
                response, _ = await until_acknowledged(channel, earlier.method, earlier.request)
                got = [response.turn] if earlier.method == "AllocateTurnId" else response.turns
                assert list(got) == earlier.turns, f"retry of {earlier.request.request_id}"
                continue
            thread_id = rng.choice(thread_ids)
            kind = rng.choice(KINDS)
            rid = f"c{index}-s{step}-{uuid.uuid4().hex[:8]}"
            if rng.random() < 0.2:
                method = "BatchAllocateTurnIds"
                request: Any = pb.BatchAllocateTurnIdsRequest(
                    thread_id=thread_id, kind=kind, count=rng.randint(2, 4), request_id=rid
                )
            else:
                method = "AllocateTurnId"
                request = pb.AllocateTurnIdRequest(thread_id=thread_id, kind=kind, request_id=rid)
            response, attempts = await until_acknowledged(channel, method, request)
            turns = [response.turn] if method == "AllocateTurnId" else list(response.turns)
            load.acknowledged(Step(method, request, turns, attempts))


async def list_all(stub: pb_grpc.TurnIdServiceStub, thread_id: str) -> list[pb.Turn]:
    turns: list[pb.Turn] = []
    token = ""
    while True:
        page = await stub.ListTurns(
            pb.ListTurnsRequest(thread_id=thread_id, page_size=1000, page_token=token),
            timeout=30,
        )
        turns.extend(page.turns)
        if not (token := page.next_page_token):
            return turns


async def verify(target: str, thread_ids: list[str], load: Load) -> None:
    acknowledged = {(t.thread_id, t.turn_id): t for s in load.steps for t in s.turns}
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.TurnIdServiceStub(channel)
        stored: dict[tuple[str, str], pb.Turn] = {}
        for thread_id in thread_ids:
            turns = await list_all(stub, thread_id)
            assert [t.sequence for t in turns] == list(range(1, len(turns) + 1)), thread_id
            ids = [t.turn_id for t in turns]
            assert len(set(ids)) == len(ids), f"a turn id repeats in {thread_id}"
            compactions = [t.turn_id for t in turns if t.kind == pb.TURN_KIND_AUTO_COMPACTION]
            assert compactions == [f"auto-compact-{n}" for n in range(len(compactions))]
            minted = [uuid.UUID(t.turn_id) for t in turns if t.kind != pb.TURN_KIND_AUTO_COMPACTION]
            assert minted == sorted(minted), f"UUIDv7 order is not sequence order in {thread_id}"
            stored.update(((t.thread_id, t.turn_id), t) for t in turns)
        # Exactly the acknowledged turns: none lost (durability), none extra (a retry that
        # minted a second turn for one step would be an extra one).
        assert stored.keys() == acknowledged.keys()
        for key, turn in acknowledged.items():
            assert stored[key] == turn, f"{key} changed after it was acknowledged"
            read = await stub.GetTurn(
                pb.GetTurnRequest(thread_id=turn.thread_id, turn_id=turn.turn_id), timeout=30
            )
            assert read.turn == turn
        for step in load.steps:
            sequences = [t.sequence for t in step.turns]
            assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
            assert all(t.request_id == step.request.request_id for t in step.turns)
            # The request once more, after every crash: its first answer, exactly.
            response = await getattr(stub, step.method)(step.request, timeout=30)
            got = [response.turn] if step.method == "AllocateTurnId" else list(response.turns)
            assert got == step.turns, f"retry of {step.request.request_id} after the crashes"


async def test_sigkill_loop_under_load_loses_and_doubles_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("TURNID_CRASH_SEED", random.randrange(2**32)))
    print(f"crash loop seed {seed} (TURNID_CRASH_SEED={seed} repeats its choices)")
    rng = random.Random(seed)
    database = f"sqlite://{tmp_path / 'crash.db'}"
    thread_ids = [f"crash-{uuid.uuid4()}" for _ in range(THREADS)]
    load = Load(rng)
    servers = [await asyncio.to_thread(ServeProcess, database)]
    target = servers[0].target
    try:
        clients = [asyncio.create_task(client(i, target, thread_ids, load)) for i in range(CLIENTS)]
        kills_at: list[int] = []
        for _ in range(KILLS):
            waiter = asyncio.create_task(load.kill_now.wait())
            done, _ = await asyncio.wait(
                [waiter, *clients], timeout=60, return_when=asyncio.FIRST_COMPLETED
            )
            assert waiter in done, "the clients stopped or did not make progress"
            servers[-1].kill()  # SIGKILL: only what was committed survives
            kills_at.append(load.acks)
            load.kill_now.clear()
            # Same port, same file. The clients keep retrying while it starts.
            servers.append(await asyncio.to_thread(ServeProcess, database, listen=target))
            # The next kill: after a random number of acknowledgements (a few: right after
            # the start; many: in the thick of the load).
            load.kill_at = load.acks + rng.choice([1, 2, rng.randint(5, 30), rng.randint(30, 90)])
        # A last stretch of load on the last server, then every client finishes its step.
        waiter = asyncio.create_task(load.kill_now.wait())
        done, _ = await asyncio.wait([waiter, *clients], timeout=60, return_when="FIRST_COMPLETED")
        assert waiter in done, "the clients stopped or did not make progress"
        load.stop = True
        await asyncio.wait_for(asyncio.gather(*clients), 90)
        print(
            f"{len(load.steps)} acknowledged steps, {load.retries} retried attempts, "
            f"kills after acknowledgement {kills_at}"
        )
        assert len(kills_at) == KILLS
        await verify(target, thread_ids, load)
        assert servers[-1].terminate() == 0
    finally:
        for task in clients:
            task.cancel()
        for server in servers:
            if server.process.poll() is None:
                server.kill()
