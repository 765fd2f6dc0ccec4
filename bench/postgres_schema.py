"""A fresh PostgreSQL schema per bench server, so that a row's figures do not depend on what
earlier runs left in the database (its tables start empty, as a SQLite row's file does)."""

from __future__ import annotations


def postgres_schema(dsn: str, schema: str, *, drop: bool = False) -> str:
    """Creates (or drops, with everything in it) `schema` in the database at `dsn`; the URL
    of a store in it."""
    import psycopg  # only the PostgreSQL rows need it

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE" if drop else f"CREATE SCHEMA {schema}")
    return f"{dsn}{'&' if '?' in dsn else '?'}options=-csearch_path%3D{schema}"
