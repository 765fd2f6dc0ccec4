"""PostgreSQL fixtures: a fresh database per test, and three `turnid serve` replicas on it.

Every test here needs TURNID_TEST_POSTGRES_DSN (CI sets it to the local server) and is skipped
with that reason otherwise.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from ..e2e.serve_process import ServeProcess

POSTGRES_DSN = os.environ.get("TURNID_TEST_POSTGRES_DSN")


@pytest.fixture(autouse=True)
def _needs_postgres() -> None:
    if not POSTGRES_DSN:
        pytest.skip("TURNID_TEST_POSTGRES_DSN is not set")


def with_database(dsn: str, dbname: str) -> str:
    """The same server and credentials as `dsn` (a postgresql:// URL), another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    """A uniquely named database, created empty and dropped afterwards, so runs never collide."""
    assert POSTGRES_DSN
    name = f"turnid_test_{uuid.uuid4().hex[:16]}"
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(POSTGRES_DSN, name)
    finally:
        # The server may have been restarted by the test: connect afresh.
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as admin:
            await admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def replicas(database_url: str) -> Iterator[list[ServeProcess]]:
    """Three `turnid serve` processes on one empty database, started at once (so they race to
    migrate it: the advisory lock must let exactly one do it)."""
    with ThreadPoolExecutor(3) as starter:
        futures = [starter.submit(ServeProcess, database_url) for _ in range(3)]
    started: list[ServeProcess] = []
    errors: list[BaseException] = []
    for future in futures:
        try:
            started.append(future.result())
        except Exception as error:
            errors.append(error)
    try:
        if errors:
            raise errors[0]
        yield started
    finally:
        for server in started:
            if server.process.poll() is None:
                server.terminate()
