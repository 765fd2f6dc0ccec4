"""Stores: where turns live. `open_store(url)` picks one by database URL."""

from __future__ import annotations

from dataclasses import dataclass

from turnid.service.domain.store import Store

__all__ = ["Store", "StoreOptions", "open_store", "sqlite_path"]


def sqlite_path(url: str) -> str:
    """`sqlite:///abs/path`, `sqlite:relative/path` or `sqlite::memory:` -> a file path."""
    rest = url.removeprefix("sqlite:")
    if rest.startswith("//"):
        rest = rest[2:]  # sqlite:///tmp/x.db -> /tmp/x.db
    if not rest:
        raise ValueError(f"database URL {url!r} names no file")
    return rest


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """Tuning that only some stores read (the server's configuration fills it)."""

    sqlite_busy_timeout_s: float = 5.0
    pg_pool_min: int = 2
    pg_pool_max: int = 10
    pg_pool_timeout_s: float = 3.0
    pg_connect_timeout_s: float = 5.0
    pg_statement_timeout_s: float = 3.0
    pg_lock_timeout_s: float = 2.0


def open_store(url: str, *, migrate: bool = True, options: StoreOptions | None = None) -> Store:
    """A store for a database URL: `memory:`, `sqlite:///path` or `postgresql://...`.

    `migrate=False` makes the PostgreSQL store check the schema version instead of migrating
    (`turnid migrate` does it); SQLite always migrates its own file.
    """
    options = options or StoreOptions()
    if url == "memory:":
        from turnid.service.stores.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:"):
        from turnid.service.stores.sqlite import SqliteStore

        return SqliteStore(sqlite_path(url), busy_timeout_s=options.sqlite_busy_timeout_s)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from turnid.service.stores.postgres import PostgresStore
        except ImportError as error:
            raise ValueError(
                f"the PostgreSQL store needs psycopg and psycopg-pool ({error}): "
                "install turnid[postgres]"
            ) from error
        return PostgresStore(
            url,
            migrate=migrate,
            pool_min=options.pg_pool_min,
            pool_max=options.pg_pool_max,
            acquire_timeout_s=options.pg_pool_timeout_s,
            connect_timeout_s=options.pg_connect_timeout_s,
            statement_timeout_s=options.pg_statement_timeout_s,
            lock_timeout_s=options.pg_lock_timeout_s,
        )
    raise ValueError(
        f"unsupported database URL {url!r}: use memory:, sqlite:///path or postgresql://..."
    )
