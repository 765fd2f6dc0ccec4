"""Fixtures for the client tests: the fake service, on the test's loop or on a loop thread."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.client.fakes import FakeServer, LoopThread


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    running = LoopThread()
    yield running
    running.close()


@pytest.fixture
async def fake_server() -> AsyncIterator[FakeServer]:
    """A `FakeServer` on the (async) test's own loop."""
    server = await FakeServer().start()
    yield server
    await server.stop()


@pytest.fixture
def threaded_fake(loop_thread: LoopThread) -> Iterator[FakeServer]:
    """A `FakeServer` on a loop thread, for the blocking client (drive it via `loop_thread`)."""
    server = loop_thread.run(FakeServer().start())
    yield server
    loop_thread.run(server.stop())
