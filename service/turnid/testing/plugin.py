"""pytest plugin: a real turnid service, in-process, for your own test suite.

Installed with turnid and registered through the `pytest11` entry point, so the fixtures are
there with no configuration:

- `turnid_server`: a `TurnIdTestServer` listening on `127.0.0.1:<free port>`, fresh for each
  test, with the `memory:` store. Ask for a temporary SQLite file with the marker
  `@pytest.mark.turnid(store="sqlite")` or indirect parametrization
  (`@pytest.mark.parametrize("turnid_server", ["memory", "sqlite"], indirect=True)`); any
  database URL works too (`store="sqlite:///path/x.db"`).
- `turnid_client`: a `TurnIdClient` connected to it.
- `turnid_async_client`: an `AsyncTurnIdClient` connected to it (an async fixture when
  pytest-asyncio is installed; otherwise a client that opens its channel on the first call, on
  your test's loop).

The server runs on its own event loop in a background thread. That is what lets the blocking
client call it from a plain (sync) test, and keeps it independent of whichever loop (if any)
your async tests use: the sync fixtures need no asyncio plugin at all.
`turnid_server.restart()` stops the server and starts a new one on the same port and the same
store, for testing how your code rides out a reconnect.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from turnid.client import AsyncTurnIdClient, TurnIdClient

if TYPE_CHECKING:
    from turnid.service.server import TurnIdServer
    from turnid.service.stores import Store

_T = TypeVar("_T")

#: How long starting or stopping the in-process server may take before the fixture gives up.
STARTUP_TIMEOUT = 30.0

MARKER = "turnid"


class TurnIdTestServer:
    """A `TurnIdServer` on its own event loop in a daemon thread; usable from sync and async code.

    `start()` binds `listen` (port 0: a free port) and later starts reuse that port, so
    `restart()` brings a new server up at the same `target`. With `memory:` the same in-memory
    store lives on across restarts; any other database URL is reopened (as a new process would).
    """

    def __init__(self, database: str = "memory:", listen: str = "127.0.0.1:0") -> None:
        self.database = database
        self.listen = listen
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: TurnIdServer | None = None
        self._memory_store: Store | None = None
        self.port = 0

    @property
    def target(self) -> str:
        if not self.port:
            raise RuntimeError("the turnid test server has not been started")
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="turnid-test-server", daemon=True
            )
            thread.start()
            self._loop, self._thread = loop, thread
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(STARTUP_TIMEOUT)

    def start(self) -> None:
        """Start serving (on the port of the previous start, if there was one)."""
        if self._server is not None:
            return
        from turnid.service.config import ServerConfig
        from turnid.service.server import TurnIdServer

        listen = self.listen
        if self.port:
            listen = f"{listen.rsplit(':', 1)[0]}:{self.port}"
        store: Store | None = None
        if self.database == "memory:":
            if self._memory_store is None:
                from turnid.service.stores import open_store

                self._memory_store = open_store("memory:")
            store = self._memory_store
        server = TurnIdServer(ServerConfig(listen=listen, database=self.database), store=store)
        self._run(server.start())
        self._server = server
        self.port = server.port

    def stop(self, grace: float | None = 0) -> None:
        """Stop serving; in-flight calls get `grace` seconds (default: none, they fail)."""
        server, self._server = self._server, None
        if server is not None:
            self._run(server.stop(grace))

    def restart(self, grace: float | None = 0) -> None:
        """Stop, then start a new server on the same port and store."""
        self.stop(grace)
        self.start()

    def close(self) -> None:
        """Stop the server and end its thread and loop."""
        try:
            self.stop()
        finally:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            if loop is not None and thread is not None:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(STARTUP_TIMEOUT)
                if not thread.is_alive():
                    loop.close()

    def __enter__(self) -> TurnIdTestServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.target if self.port else "not started"
        return f"TurnIdTestServer({where}, database={self.database!r})"


def database_url(store: str, directory: Path) -> str:
    """`memory` / `sqlite` (a file in `directory`) / a database URL, as a database URL."""
    if store in ("memory", "memory:"):
        return "memory:"
    if store == "sqlite":
        return f"sqlite://{directory / 'turnid.db'}"
    if ":" in store:
        return store
    raise pytest.UsageError(
        f"turnid_server: unknown store {store!r}; use 'memory', 'sqlite' or a database URL"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(store='memory'): the turnid_server fixture's store: 'memory' (default), "
        "'sqlite' (a temporary file) or a database URL",
    )


def _requested_store(request: pytest.FixtureRequest) -> str:
    param = getattr(request, "param", None)
    if param is not None:
        return str(param)
    marker = request.node.get_closest_marker(MARKER)
    if marker is not None:
        store = marker.kwargs.get("store", marker.args[0] if marker.args else "memory")
        return str(store)
    return "memory"


@pytest.fixture
def turnid_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TurnIdTestServer]:
    """A running turnid service on 127.0.0.1 (memory store unless asked otherwise)."""
    store = _requested_store(request)
    directory = tmp_path_factory.mktemp("turnid") if store == "sqlite" else Path()
    with TurnIdTestServer(database_url(store, directory)) as server:
        yield server


@pytest.fixture
def turnid_client(turnid_server: TurnIdTestServer) -> Iterator[TurnIdClient]:
    """A blocking `TurnIdClient` for `turnid_server`."""
    with TurnIdClient(turnid_server.target) as client:
        yield client


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - tests/client/test_plugin.py runs this in a subprocess
    _HAVE_PYTEST_ASYNCIO = False
else:
    _HAVE_PYTEST_ASYNCIO = True


if _HAVE_PYTEST_ASYNCIO:

    @pytest_asyncio.fixture
    async def turnid_async_client(
        turnid_server: TurnIdTestServer,
    ) -> AsyncIterator[AsyncTurnIdClient]:
        """An `AsyncTurnIdClient` for `turnid_server`."""
        async with AsyncTurnIdClient(turnid_server.target) as client:
            yield client

else:  # pragma: no cover

    @pytest.fixture
    def turnid_async_client(turnid_server: TurnIdTestServer) -> Iterator[AsyncTurnIdClient]:
        """An `AsyncTurnIdClient` for `turnid_server`; its channel opens on the test's loop."""
        client = AsyncTurnIdClient(turnid_server.target)
        yield client
        loop = client.loop
        if loop is not None and not loop.is_closed() and not loop.is_running():
            loop.run_until_complete(client.close())
