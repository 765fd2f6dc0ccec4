"""Stores: where turns live. `open_store(url)` picks one by database URL."""

from __future__ import annotations

from turnid.service.domain.store import Store

__all__ = ["Store", "open_store", "sqlite_path"]


def sqlite_path(url: str) -> str:
    """`sqlite:///abs/path`, `sqlite:relative/path` or `sqlite::memory:` -> a file path."""
    rest = url.removeprefix("sqlite:")
    if rest.startswith("//"):
        rest = rest[2:]  # sqlite:///tmp/x.db -> /tmp/x.db
    if not rest:
        raise ValueError(f"database URL {url!r} names no file")
    return rest


def open_store(url: str, *, migrate: bool = True) -> Store:
    """A store for a database URL: `memory:`, `sqlite:///path` or `postgresql://...`.

    `migrate=False` makes the PostgreSQL store check the schema version instead of migrating
    (`turnid migrate` does it); SQLite always migrates its own file.
    """
    if url == "memory:":
        from turnid.service.stores.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:"):
        from turnid.service.stores.sqlite import SqliteStore

        return SqliteStore(sqlite_path(url))
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from turnid.service.stores.postgres import PostgresStore
        except ImportError as error:
            raise ValueError(
                f"the PostgreSQL store needs psycopg and psycopg-pool ({error}): "
                "install turnid[postgres]"
            ) from error
        return PostgresStore(url, migrate=migrate)
    raise ValueError(
        f"unsupported database URL {url!r}: use memory:, sqlite:///path or postgresql://..."
    )
