"""Model-based test: every store, driven through TurnService, answers like a plain model.

The model below is written from DESIGN.md (invariants 1, 2, 4, 5, 8, 10, conditional
allocation, limits, AIP-158 paging), not from any store. Hypothesis drives the real service
(memory, SQLite, PostgreSQL when TURNID_TEST_POSTGRES_DSN is set) and the model with the same
random operations and requires the same answers: the same turn ids where the model can predict
them (auto-compact-N, claims), the same sequences, kinds, request ids and error reasons. A
UUIDv7 the model cannot predict is checked for its form and its place in the thread's order
(invariant 8), then remembered: every replay must return exactly the first answer.

Where DESIGN.md leaves a choice open the model accepts each reading (`alternatives`): which
of two refusals wins when a request breaks two rules, and whether AllocateTurnId and a
one-turn BatchAllocateTurnIds with the same kind are the same request.

Stateful machines are synchronous: each store runs on one event loop that the test creates,
and each step runs a coroutine to completion on it. Every example uses fresh thread ids, so a
shared PostgreSQL database (or SQLite file) is fine.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import uuid_utils
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from turnid.service.domain import TurnIdError, TurnKind, TurnService
from turnid.service.stores import open_store

from .conftest import POSTGRES_DSN

REALTIME = int(TurnKind.REALTIME_DELEGATION)
COMPACTION = int(TurnKind.AUTO_COMPACTION)
USER = int(TurnKind.USER_INPUT)
KINDS = (REALTIME, COMPACTION, USER)
PREFIX = "auto-compact-"
DEFAULT_PAGE, MAX_PAGE = 100, 1000


def _accepts(method: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(method).parameters


# The refactor of issues 9-11 adds these; the model uses them as soon as TurnService has them.
HAS_NAMESPACE = _accepts(TurnService.allocate_batch, "namespace")
HAS_EXPECTED = _accepts(TurnService.allocate_batch, "expected_last_sequence")
HAS_GET_THREAD = hasattr(TurnService, "get_thread")
NAMESPACES = ("", "tenant-b") if HAS_NAMESPACE else ("",)


# --- what a request is, and what the model expects of it ------------------------------------


@dataclass(frozen=True)
class Write:
    op: str  # "allocate", "batch" or "claim"
    namespace: str
    thread_id: str
    kind: int
    count: int = 1
    turn_id: str | None = None  # claims
    request_id: str = ""
    expected_last_sequence: int | None = None


@dataclass(frozen=True)
class Refused:
    category: str  # ErrorCategory name
    reasons: frozenset[str]


def refused(category: str, *reasons: str) -> Refused:
    return Refused(category, frozenset(reasons))


@dataclass(frozen=True)
class Shape:
    """A new turn as the model expects it; turn_id None: a UUIDv7 minted by the service."""

    turn_id: str | None
    kind: int
    sequence: int
    request_id: str
    claimed: bool


@dataclass(frozen=True)
class New:
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class Replayed:
    turns: tuple[Any, ...]  # exactly the turns the first answer held


Outcome = Refused | New | Replayed


@dataclass
class ModelThread:
    turns: list[Any] = field(default_factory=list)  # the service's turns; index = sequence - 1
    ids: set[str] = field(default_factory=set)
    next_compaction: int = 0
    requests: dict[str, tuple[Write, tuple[Any, ...]]] = field(default_factory=dict)
    last_minted: int = -1  # the greatest UUIDv7 (as an int) the service minted in the thread


def _id_ok(value: str) -> bool:
    return (
        bool(value)
        and len(value.encode("utf-8", "surrogatepass")) <= 256
        and value.isprintable()
        and " " not in value
    )


def _request_id_ok(value: str) -> bool:
    return not value or (len(value) <= 128 and value.isascii() and value.isprintable())


def _same_request(first: Write, again: Write) -> bool | None:
    """True: the same request; False: different parameters; None: DESIGN.md does not say."""
    if (first.op == "claim") != (again.op == "claim"):
        return False
    if (first.kind, first.count, first.turn_id) != (again.kind, again.count, again.turn_id):
        return False
    if first.op != again.op or first.expected_last_sequence != again.expected_last_sequence:
        return None  # AllocateTurnId vs a batch of one; another (or no) condition
    return True


class Model:
    """The rules of DESIGN.md over plain dicts."""

    def __init__(self) -> None:
        self.threads: dict[tuple[str, str], ModelThread] = {}

    def thread(self, namespace: str, thread_id: str) -> ModelThread:
        return self.threads.setdefault((namespace, thread_id), ModelThread())

    def decide(self, w: Write) -> list[Outcome]:
        """Every answer the contract allows, in no order."""
        invalid = []
        if w.kind not in KINDS or (w.op == "claim" and w.kind == COMPACTION):
            invalid.append("INVALID_KIND")
        if not 1 <= w.count <= 1000:
            invalid.append("INVALID_COUNT")
        if not _request_id_ok(w.request_id):
            invalid.append("INVALID_REQUEST_ID")
        if w.op == "claim":
            assert w.turn_id is not None
            if not _id_ok(w.turn_id):
                invalid.append("INVALID_TURN_ID")
            elif w.turn_id.startswith(PREFIX):
                invalid.append("RESERVED_TURN_ID")
        if invalid:
            return [refused("INVALID_ARGUMENT", *invalid)]

        thread = self.thread(w.namespace, w.thread_id)
        last = len(thread.turns)
        advanced = w.expected_last_sequence is not None and w.expected_last_sequence != last
        if w.request_id and w.request_id in thread.requests:
            first, turns = thread.requests[w.request_id]
            same = _same_request(first, w)
            reused = refused("ALREADY_EXISTS", "REQUEST_ID_REUSED")
            if same:
                return [Replayed(turns)]  # replayed before the condition is checked
            outcomes: list[Outcome] = [reused]
            if same is None:
                outcomes.append(Replayed(turns))
            if advanced:
                outcomes.append(refused("FAILED_PRECONDITION", "THREAD_ADVANCED"))
            return outcomes

        problems: list[Outcome] = []
        if advanced:
            problems.append(refused("FAILED_PRECONDITION", "THREAD_ADVANCED"))
        if w.op == "claim" and w.turn_id in thread.ids:
            problems.append(refused("ALREADY_EXISTS", "TURN_ID_TAKEN"))
        if problems:
            return problems

        if w.op == "claim":
            ids: list[str | None] = [w.turn_id]
        elif w.kind == COMPACTION:
            ids = [f"{PREFIX}{thread.next_compaction + i}" for i in range(w.count)]
        else:
            ids = [None] * w.count
        claimed = w.op == "claim"
        return [
            New(
                tuple(
                    Shape(turn_id, w.kind, last + 1 + i, w.request_id, claimed)
                    for i, turn_id in enumerate(ids)
                )
            )
        ]

    def apply(self, w: Write, turns: tuple[Any, ...]) -> None:
        thread = self.thread(w.namespace, w.thread_id)
        thread.turns.extend(turns)
        thread.ids.update(t.turn_id for t in turns)
        if w.op != "claim" and w.kind == COMPACTION:
            thread.next_compaction += len(turns)
        if w.op != "claim" and w.kind != COMPACTION:
            thread.last_minted = max(thread.last_minted, *(uuid.UUID(t.turn_id).int for t in turns))
        if w.request_id:
            thread.requests[w.request_id] = (w, turns)


def check_uuid7(text: str) -> int:
    parsed = uuid.UUID(text)
    assert str(parsed) == text, f"{text!r} is not canonical lower-case 8-4-4-4-12"
    assert parsed.version == 7, f"{text} is not version 7"
    assert parsed.variant == uuid.RFC_4122, f"{text} does not have variant 10"
    return parsed.int


def uuid7_at(ms: int, rand: int) -> str:
    """A client-made UUIDv7 with any timestamp (claimed ids may carry any clock)."""
    rand_a, rand_b = (rand >> 62) & 0xFFF, rand & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))


def describe(outcomes: list[Outcome]) -> str:
    parts = []
    for o in outcomes:
        if isinstance(o, Refused):
            parts.append(f"{o.category}/{'|'.join(sorted(o.reasons))}")
        elif isinstance(o, Replayed):
            parts.append(f"replay of {[t.turn_id for t in o.turns]}")
        else:
            parts.append(f"new {[(s.turn_id or 'uuid7', s.sequence) for s in o.shapes]}")
    return " or ".join(parts)


# --- the machine ---------------------------------------------------------------------------

RID_CHOICE = st.sampled_from(["none", "fresh", "fresh", "reuse"])
CLAIM_ID_CHOICE = st.sampled_from(
    ["rollout", "rollout", "uuid7", "uuid7-any-clock", "unicode", "taken", "elsewhere", "reserved"]
)


def make_machine(
    loop: asyncio.AbstractEventLoop, service: TurnService
) -> type[RuleBasedStateMachine]:
    def run(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
        try:
            return True, loop.run_until_complete(asyncio.wait_for(coro, 30))
        except TurnIdError as error:
            return False, error

    def ns_kwargs(method: Callable[..., Any], namespace: str) -> dict[str, str]:
        if _accepts(method, "namespace"):
            return {"namespace": namespace}
        assert namespace == ""
        return {}

    class TurnServiceVersusModel(RuleBasedStateMachine):
        @initialize()
        def fresh_threads(self) -> None:
            self.model = Model()
            base = uuid.uuid4().hex[:12]
            self.thread_ids = [f"model-{base}-a", f"model-{base}-b"]
            self.writes: list[Write] = []
            self.request_ids: list[str] = []
            self.serial = 0

        # -- helpers ------------------------------------------------------------------------

        def _next(self) -> int:
            self.serial += 1
            return self.serial

        def _where(self, data: st.DataObject) -> tuple[str, str]:
            return data.draw(st.sampled_from(NAMESPACES)), data.draw(
                st.sampled_from(self.thread_ids)
            )

        def _request_id(self, data: st.DataObject) -> str:
            choice = data.draw(RID_CHOICE)
            if choice == "reuse" and self.request_ids:
                return data.draw(st.sampled_from(self.request_ids))
            if choice == "none":
                return ""
            rid = f"req-{self._next()}"
            self.request_ids.append(rid)
            return rid

        def _expected(self, data: st.DataObject, namespace: str, thread_id: str) -> int | None:
            if not HAS_EXPECTED or data.draw(st.integers(0, 3)):
                return None
            last = len(self.model.thread(namespace, thread_id).turns)
            return data.draw(st.sampled_from([last, last, 0, last + 1, max(last - 1, 0)]))

        def _send(self, w: Write) -> None:
            kwargs: dict[str, Any] = ns_kwargs(service.allocate_batch, w.namespace)
            if w.expected_last_sequence is not None:
                kwargs["expected_last_sequence"] = w.expected_last_sequence
            if w.op == "allocate":
                coro = service.allocate(w.thread_id, w.kind, w.request_id, **kwargs)
            elif w.op == "batch":
                coro = service.allocate_batch(w.thread_id, w.kind, w.count, w.request_id, **kwargs)
            else:
                assert w.turn_id is not None
                coro = service.claim(w.thread_id, w.turn_id, w.kind, w.request_id, **kwargs)
            outcomes = self.model.decide(w)
            before_us = time.time_ns() // 1000
            ok, answer = run(coro)
            after_us = time.time_ns() // 1000
            self.writes.append(w)
            if not ok:
                for o in outcomes:
                    if (
                        isinstance(o, Refused)
                        and answer.category.name == o.category
                        and answer.reason in o.reasons
                    ):
                        return
                raise AssertionError(
                    f"{w}: expected {describe(outcomes)}, "
                    f"got {answer.category.name}/{answer.reason}: {answer.message}"
                )
            turns = tuple([answer] if w.op in ("allocate", "claim") else answer)
            for o in outcomes:
                if isinstance(o, Replayed) and turns == o.turns:
                    return
            news = [o for o in outcomes if isinstance(o, New)]
            assert news, f"{w}: expected {describe(outcomes)}, got turns {turns}"
            self._check_new(w, news[0], turns, before_us, after_us)
            self.model.apply(w, turns)

        def _check_new(
            self, w: Write, new: New, turns: tuple[Any, ...], before_us: int, after_us: int
        ) -> None:
            thread = self.model.thread(w.namespace, w.thread_id)
            got = [(t.turn_id, int(t.kind), t.sequence, t.request_id, t.claimed) for t in turns]
            want = [(s.turn_id, s.kind, s.sequence, s.request_id, s.claimed) for s in new.shapes]
            assert len(got) == len(want), f"{w}: expected {len(want)} turns, got {got}"
            last_minted = thread.last_minted
            for turn, g, s in zip(turns, got, new.shapes, strict=True):
                assert turn.thread_id == w.thread_id, (w, turn)
                if s.turn_id is None:
                    minted = check_uuid7(turn.turn_id)
                    assert minted > last_minted, (
                        f"{w}: minted {turn.turn_id} is not above every id minted before "
                        "in the thread (invariant 8)"
                    )
                    last_minted = minted
                    g = (None, *g[1:])
                assert g == (s.turn_id, s.kind, s.sequence, s.request_id, s.claimed), (
                    f"{w}: expected {want}, got {got}"
                )
                assert turn.turn_id not in thread.ids, f"{w}: {turn.turn_id} repeats in thread"
                # The service's clock and ours are one machine's; a second of slack.
                assert before_us - 1_000_000 <= turn.create_time_us <= after_us + 1_000_000
            assert len({t.turn_id for t in turns}) == len(turns), f"{w}: repeats in {got}"

        # -- writes -------------------------------------------------------------------------

        @rule(data=st.data(), kind=st.sampled_from(KINDS))
        def allocate(self, data: st.DataObject, kind: int) -> None:
            ns, tid = self._where(data)
            rid = self._request_id(data)
            self._send(
                Write("allocate", ns, tid, kind, 1, None, rid, self._expected(data, ns, tid))
            )

        @rule(data=st.data(), kind=st.sampled_from(KINDS), count=st.integers(1, 5))
        def batch(self, data: st.DataObject, kind: int, count: int) -> None:
            ns, tid = self._where(data)
            rid = self._request_id(data)
            self._send(
                Write("batch", ns, tid, kind, count, None, rid, self._expected(data, ns, tid))
            )

        @rule(
            data=st.data(),
            how=CLAIM_ID_CHOICE,
            kind=st.sampled_from([REALTIME, USER, REALTIME, USER, COMPACTION]),
        )
        def claim(self, data: st.DataObject, how: str, kind: int) -> None:
            ns, tid = self._where(data)
            here = self.model.thread(ns, tid)
            elsewhere = [
                t.turn_id
                for key, th in self.model.threads.items()
                if key != (ns, tid)
                for t in th.turns
            ]
            if how == "taken" and here.turns:
                turn_id = data.draw(st.sampled_from(sorted(here.ids)))
            elif how == "elsewhere" and elsewhere:
                turn_id = data.draw(st.sampled_from(elsewhere))
            elif how == "reserved":
                turn_id = f"{PREFIX}{data.draw(st.integers(0, 6))}"
            elif how == "uuid7":
                turn_id = str(uuid_utils.uuid7())
            elif how == "uuid7-any-clock":
                turn_id = uuid7_at(
                    data.draw(st.integers(0, 2**48 - 1)), data.draw(st.integers(0, 2**74 - 1))
                )
            elif how == "unicode":
                turn_id = f"ターン-{data.draw(st.integers(0, 3))}"
            else:
                turn_id = f"rollout-{data.draw(st.integers(0, 4))}"
            rid = self._request_id(data)
            self._send(
                Write("claim", ns, tid, kind, 1, turn_id, rid, self._expected(data, ns, tid))
            )

        @precondition(lambda self: self.writes)
        @rule(data=st.data())
        def retry_same(self, data: st.DataObject) -> None:
            """A reconnecting caller repeats a request exactly."""
            self._send(data.draw(st.sampled_from(self.writes)))

        @precondition(lambda self: any(w.request_id for w in self.writes))
        @rule(data=st.data(), change=st.sampled_from(["kind", "count", "op", "turn_id"]))
        def retry_changed(self, data: st.DataObject, change: str) -> None:
            """The same request_id with other parameters."""
            w = data.draw(st.sampled_from([w for w in self.writes if w.request_id]))
            if change == "kind":
                w = replace(w, kind=data.draw(st.sampled_from([k for k in KINDS if k != w.kind])))
            elif change == "count":
                w = replace(w, op="batch", turn_id=None, count=w.count % 5 + 1)
            elif change == "op":
                w = (
                    replace(w, op="allocate", turn_id=None, count=1)
                    if w.op == "claim"
                    else replace(w, op="claim", turn_id=f"rollout-{self._next()}", count=1)
                )
            else:
                w = replace(w, op="claim", turn_id=f"rollout-x{self._next()}", count=1)
            self._send(w)

        @rule(
            data=st.data(),
            op=st.sampled_from(["allocate", "batch", "claim"]),
            bad=st.sampled_from(["kind-0", "kind-99", "count-0", "count-1001", "rid", "turn-id"]),
        )
        def invalid(self, data: st.DataObject, op: str, bad: str) -> None:
            ns, tid = self._where(data)
            w = Write(op, ns, tid, REALTIME, 1, "rollout-ok" if op == "claim" else None)
            if bad.startswith("kind"):
                w = replace(w, kind=int(bad.split("-")[1]))
            elif bad.startswith("count"):
                w = replace(w, op="batch", turn_id=None, count=int(bad.split("-")[1]))
            elif bad == "rid":
                w = replace(w, request_id=data.draw(st.sampled_from(["has space", "é", "x" * 129])))
            else:
                w = replace(w, op="claim", turn_id=data.draw(st.sampled_from(["a b", "\x00", ""])))
            self._send(w)

        # -- reads --------------------------------------------------------------------------

        @rule(data=st.data(), how=st.sampled_from(["known", "known", "unknown", "elsewhere"]))
        def get(self, data: st.DataObject, how: str) -> None:
            ns, tid = self._where(data)
            here = self.model.thread(ns, tid)
            others = [
                t
                for key, th in self.model.threads.items()
                if key != (ns, tid)
                for t in th.turns
                if t.turn_id not in here.ids
            ]
            if how == "known" and here.turns:
                turn_id = data.draw(st.sampled_from(here.turns)).turn_id
            elif how == "elsewhere" and others:
                turn_id = data.draw(st.sampled_from(others)).turn_id
            else:
                turn_id = data.draw(st.sampled_from([f"{PREFIX}{len(here.turns) + 3}", "nope"]))
            ok, answer = run(service.get(tid, turn_id, **ns_kwargs(service.get, ns)))
            expected = next((t for t in here.turns if t.turn_id == turn_id), None)
            if expected is None:
                assert not ok and (answer.category.name, answer.reason) == (
                    "NOT_FOUND",
                    "TURN_NOT_FOUND",
                ), f"get {ns!r}/{tid}/{turn_id}: expected TURN_NOT_FOUND, got {answer}"
            else:
                assert ok and answer == expected, (
                    f"get {turn_id}: expected {expected}, got {answer}"
                )

        def _list_all(self, ns: str, tid: str, page_size: int) -> list[Any]:
            effective = min(page_size or DEFAULT_PAGE, MAX_PAGE)
            expected = self.model.thread(ns, tid).turns
            got: list[Any] = []
            token = ""
            for _ in range(len(expected) + 2):
                ok, page = run(service.list(tid, page_size, token, **ns_kwargs(service.list, ns)))
                assert ok, f"list {tid} size {page_size}: {page}"
                assert len(page.turns) <= effective, (page_size, len(page.turns))
                got.extend(page.turns)
                token = page.next_page_token
                if not token:
                    break
                assert page.turns, "an empty page with a next_page_token"
            else:
                raise AssertionError(f"paging {tid} with size {page_size} does not end")
            return got

        @rule(data=st.data(), page_size=st.sampled_from([0, 1, 2, 3, 5, 1000, 5000]))
        def list_pages(self, data: st.DataObject, page_size: int) -> None:
            ns, tid = self._where(data)
            assert self._list_all(ns, tid, page_size) == self.model.thread(ns, tid).turns

        @rule(data=st.data(), bad=st.sampled_from(["other-thread", "garbage", "negative"]))
        def list_refused(self, data: st.DataObject, bad: str) -> None:
            ns, tid = self._where(data)
            size, token, reason = 1, "", "INVALID_PAGE_TOKEN"
            other = next(t for t in self.thread_ids if t != tid)
            if bad == "other-thread" and len(self.model.thread(ns, other).turns) >= 2:
                ok, page = run(service.list(other, 1, "", **ns_kwargs(service.list, ns)))
                assert ok and page.next_page_token
                token = page.next_page_token
            elif bad == "negative":
                size, reason = -1, "INVALID_PAGE_SIZE"
            else:
                token = "bm90LWEtdG9rZW4"
            ok, answer = run(service.list(tid, size, token, **ns_kwargs(service.list, ns)))
            assert not ok and (answer.category.name, answer.reason) == (
                "INVALID_ARGUMENT",
                reason,
            ), f"list {tid} size {size} token {token!r}: expected {reason}, got {answer}"

        @precondition(lambda self: HAS_GET_THREAD)
        @rule(data=st.data())
        def get_thread(self, data: st.DataObject) -> None:
            ns, tid = self._where(data)
            here = self.model.thread(ns, tid)
            ok, answer = run(
                service.get_thread(tid, **ns_kwargs(service.get_thread, ns))  # type: ignore[attr-defined]
            )
            if not here.turns:
                assert not ok and (answer.category.name, answer.reason) == (
                    "NOT_FOUND",
                    "THREAD_NOT_FOUND",
                ), f"get_thread of an empty thread: {answer}"
                return
            assert ok, answer
            state = answer.state
            assert answer.thread_id == tid
            assert state.last_sequence == len(here.turns)
            assert state.next_compaction == here.next_compaction
            assert answer.last_turn == here.turns[-1]
            # DESIGN.md: create_time is when the first turn was recorded, update_time the last.
            assert state.create_time_us == here.turns[0].create_time_us
            assert state.update_time_us == here.turns[-1].create_time_us

        # -- at the end of each example: the whole of every thread --------------------------

        def teardown(self) -> None:
            if not hasattr(self, "model"):
                return
            for (ns, tid), thread in self.model.threads.items():
                turns = self._list_all(ns, tid, MAX_PAGE)
                assert turns == thread.turns
                assert [t.sequence for t in turns] == list(range(1, len(turns) + 1))
                assert len({t.turn_id for t in turns}) == len(turns)
                compactions = [t.turn_id for t in turns if t.kind == COMPACTION]
                assert compactions == [f"{PREFIX}{n}" for n in range(len(compactions))]
                assert len(compactions) == thread.next_compaction

    return TurnServiceVersusModel


MODEL_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
def test_every_store_answers_like_the_model(kind: str, tmp_path: Path) -> None:
    if kind == "memory":
        url = "memory:"
    elif kind == "sqlite":
        url = f"sqlite://{tmp_path / 'model.db'}"
    else:
        if not POSTGRES_DSN:
            pytest.skip("TURNID_TEST_POSTGRES_DSN is not set")
        url = POSTGRES_DSN
    loop = asyncio.new_event_loop()
    store = open_store(url)
    try:
        loop.run_until_complete(store.open())
        try:
            machine = make_machine(loop, TurnService(store))
            run_state_machine_as_test(machine, settings=MODEL_SETTINGS)
        finally:
            loop.run_until_complete(store.close())
    finally:
        loop.close()
