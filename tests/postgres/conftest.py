"""PostgreSQL fixtures: a fresh database or a private schema per test, stores on it (replicas
of one service in one process), and three `turnid serve` replicas on a fresh database.

Every test here needs TURNID_TEST_POSTGRES_DSN (CI sets it to the local server) and is skipped
with that reason otherwise.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from turnid.service.stores.postgres import PostgresStore

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


def with_search_path(dsn: str, schema: str) -> str:
    """`dsn` with every session's search_path set to `schema` (so tables land there)."""
    parts = urlsplit(dsn)
    option = "options=" + quote(f"-csearch_path={schema}", safe="")
    query = f"{parts.query}&{option}" if parts.query else option
    return urlunsplit(parts._replace(query=query))


@pytest.fixture
async def schema_url() -> AsyncIterator[str]:
    """A private, empty schema in the shared test database (cheaper than a database), dropped
    afterwards: tests that create, migrate or drop tables do it there."""
    assert POSTGRES_DSN
    name = f"turnid_test_{uuid.uuid4().hex[:16]}"
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield with_search_path(POSTGRES_DSN, name)
    finally:
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as admin:
            await admin.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
            )


StoreMaker = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
async def make_store(schema_url: str) -> AsyncIterator[StoreMaker]:
    """Opens PostgresStores on the private schema (each one is a replica); closes them after."""
    opened: list[PostgresStore] = []

    async def make(**options: Any) -> PostgresStore:
        store = PostgresStore(options.pop("url", schema_url), **options)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


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
