"""The method surface is written once (turnid.client._methods) and is the same on both clients:
names, signatures, docstrings; async methods are coroutine functions."""

from __future__ import annotations

import inspect

import pytest

from turnid.client import AsyncTurnIdClient, TurnIdClient

UNARY = [
    "allocate", "realtime_delegation", "auto_compaction", "user_input", "allocate_batch",
    "claim", "get", "get_thread", "check_health",
]  # fmt: skip
WRITES = ["allocate", "realtime_delegation", "auto_compaction", "user_input", "allocate_batch",
          "claim"]  # fmt: skip
ALL = [*UNARY, "list_turns", "list_pages", "watch", "close"]


@pytest.mark.parametrize("name", ALL)
def test_both_clients_have_the_same_signature_and_docs(name: str) -> None:
    sync, aio = getattr(TurnIdClient, name), getattr(AsyncTurnIdClient, name)
    parameters = inspect.signature(sync).parameters
    assert parameters == inspect.signature(aio).parameters, name  # results differ: (Async)Iterator
    assert next(iter(parameters)) == "self"
    if name in UNARY:
        assert sync.__doc__ and sync.__doc__ == aio.__doc__


@pytest.mark.parametrize("name", UNARY)
def test_async_methods_are_coroutine_functions(name: str) -> None:
    assert inspect.iscoroutinefunction(getattr(AsyncTurnIdClient, name))
    assert not inspect.iscoroutinefunction(getattr(TurnIdClient, name))


@pytest.mark.parametrize("name", WRITES)
def test_every_write_takes_request_id_and_expected_last_sequence(name: str) -> None:
    parameters = inspect.signature(getattr(TurnIdClient, name)).parameters
    for keyword in ("request_id", "expected_last_sequence", "timeout"):
        assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[keyword].default is None


def test_the_result_types_read_well() -> None:
    assert inspect.signature(TurnIdClient.allocate).return_annotation == "Turn"
    assert inspect.signature(TurnIdClient.allocate_batch).return_annotation == "list[Turn]"
    assert inspect.signature(AsyncTurnIdClient.get_thread).return_annotation == "Thread"
