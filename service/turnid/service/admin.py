"""Admin commands, safe while the service runs: `turnid backup`, `turnid check`, `turnid stats`.

Wiring (cli.py)::

    from turnid.service.admin import add_admin_commands, run_admin_command

    add_admin_commands(commands)  # in _parser(), beside add_client_commands(commands)
    ...
    if getattr(args, "admin_command", None) is not None:  # in main()
        return run_admin_command(args)

Each command takes `--database URL` (default: TURNID_DATABASE, else the default SQLite file)
and exits 0 on success, 1 when it failed or (check) found problems, 2 when it cannot do that
for this database (memory:, PostgreSQL backups, a file that is not a turnid database).

SQLite files are opened read-only (`file:PATH?mode=ro`) and read in one transaction: a WAL
reader never blocks the service's writer and sees one consistent snapshot. PostgreSQL runs in
one REPEATABLE READ READ ONLY transaction.

- `backup DEST [--force]`: SQLite's online backup API (one step, one snapshot: every turn
  committed, so acknowledged, before it starts is in the copy) into DEST.tmp-PID, checked
  with `PRAGMA quick_check`, fsynced, then moved to DEST (refused when DEST exists, unless
  --force replaces it). PostgreSQL: exit 2, use pg_dump.
- `check`: `PRAGMA integrity_check` (SQLite) and turnid's invariants, one line per problem.
- `stats [--json]`: namespaces, threads, turns by kind, claimed turns, requests, the longest
  thread; SQLite file, WAL and free-page bytes; PostgreSQL table sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from turnid.service.config import default_database_url, redact_url

__all__ = [
    "AdminError",
    "Unsupported",
    "add_admin_commands",
    "backup_sqlite",
    "check",
    "run_admin_command",
    "stats",
]

KIND_NAMES = {1: "realtime_delegation", 2: "auto_compaction", 3: "user_input"}
COMPACTION = 2
COMPACTION_PREFIX = "auto-compact-"
ROW_LIMIT = 1000  # problems shown per check; more are summarized in one line


class AdminError(Exception):
    """The command failed (exit 1)."""


class Unsupported(Exception):
    """The command cannot do this for this database (exit 2)."""


# --- opening databases --------------------------------------------------------------------


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def _sqlite_file(url: str, command: str) -> Path:
    if url == "memory:":
        raise Unsupported("memory: keeps nothing on disk; use sqlite:/// or postgresql://")
    if not url.startswith("sqlite:"):
        raise Unsupported(f"unsupported database URL {redact_url(url)!r}")
    from turnid.service.stores import sqlite_path

    path = Path(sqlite_path(url))
    if not path.is_file():
        raise AdminError(f"no SQLite database at {path}")
    return path


def open_sqlite_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection (URI mode=ro) that never takes the write lock."""
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None)
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    except sqlite3.Error as error:
        raise AdminError(f"cannot open {path} read-only: {error}") from None
    return conn


@dataclass(frozen=True, slots=True)
class _Dialect:
    name: str
    collate: str  # makes text comparisons byte order, as Python's (and SQLite's BINARY)

    def columns(self, conn: Any, table: str) -> set[str]:
        if self.name == "sqlite":
            return {row[1] for row in conn.execute(f"PRAGMA table_info({table})").fetchall()}
        rows = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
            "AND attnum > 0 AND NOT attisdropped",
            (table,),
        ).fetchall()
        return {row[0] for row in rows}


SQLITE = _Dialect("sqlite", "")
POSTGRES = _Dialect("postgresql", ' COLLATE "C"')

_REQUIRED = {
    "threads": {"namespace", "thread_id", "next_sequence", "next_compaction", "last_minted"},
    "turns": {"namespace", "thread_id", "sequence", "turn_id", "kind", "request_id", "claimed"},
    "requests": {
        "namespace",
        "thread_id",
        "request_id",
        "kind",
        "count",
        "claimed_turn_id",
        "first_sequence",
    },
}


def _require_schema(conn: Any, dialect: _Dialect) -> None:
    for table, needed in _REQUIRED.items():
        found = dialect.columns(conn, table)
        if not found:
            raise Unsupported(f"not a turnid database: it has no {table} table")
        missing = needed - found
        if missing:
            raise Unsupported(
                f"the {table} table lacks {', '.join(sorted(missing))}: an older turnid "
                "schema; run `turnid migrate` (or start the service once) first"
            )


@contextlib.contextmanager
def _snapshot(url: str, command: str) -> Iterator[tuple[Any, _Dialect]]:
    """A connection in one read-only transaction (one snapshot) of the database at `url`."""
    if _is_postgres(url):
        try:
            import psycopg
        except ImportError:
            raise Unsupported("PostgreSQL needs psycopg: install turnid[postgres]") from None
        try:
            pg = psycopg.connect(url, connect_timeout=10)
        except psycopg.Error as error:
            text = str(error).strip()
            first = text.splitlines()[0] if text else type(error).__name__
            raise AdminError(f"cannot connect to {redact_url(url)}: {first}") from None
        try:
            pg.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            pg.read_only = True
            with pg.transaction():
                yield pg, POSTGRES
        finally:
            pg.close()
        return
    conn = open_sqlite_readonly(_sqlite_file(url, command))
    try:
        conn.execute("BEGIN")  # deferred: the snapshot is taken at the first read
        try:
            yield conn, SQLITE
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


# --- check ---------------------------------------------------------------------------------


def _where(namespace: str, thread_id: str) -> str:
    if namespace:
        return f"namespace {namespace!r} thread {thread_id!r}"
    return f"thread {thread_id!r}"


def _invariant_checks(dialect: _Dialect) -> list[tuple[str, str]]:
    """(name, SQL) of every invariant query: each row it returns is a problem."""
    c = dialect.collate
    limit = f" LIMIT {ROW_LIMIT + 1}"
    minted = "NOT t.claimed AND t.kind <> 2"
    return [
        (
            "gaps",  # invariant 4: sequences 1..n per thread, no gap, no repeat
            "SELECT namespace, thread_id, prev, sequence FROM ("
            " SELECT t.namespace, t.thread_id, t.sequence,"
            " LAG(t.sequence, 1, CAST(0 AS BIGINT)) OVER"
            " (PARTITION BY t.namespace, t.thread_id ORDER BY t.sequence) AS prev"
            " FROM turns t) s WHERE sequence <> prev + 1" + limit,
        ),
        (
            "compaction_ids",  # invariant 2: auto-compact-0..k-1 in sequence order
            "SELECT namespace, thread_id, sequence, turn_id, n FROM ("
            " SELECT t.namespace, t.thread_id, t.sequence, t.turn_id, ROW_NUMBER() OVER"
            " (PARTITION BY t.namespace, t.thread_id ORDER BY t.sequence) - 1 AS n"
            " FROM turns t WHERE t.kind = 2) s"
            " WHERE turn_id <> 'auto-compact-' || CAST(n AS TEXT)" + limit,
        ),
        (
            "compaction_kind",  # a counter-owned id on a turn of another kind
            "SELECT t.namespace, t.thread_id, t.sequence, t.turn_id, t.kind FROM turns t"
            " WHERE t.kind <> 2 AND substr(t.turn_id, 1, 13) = 'auto-compact-'" + limit,
        ),
        (
            "kinds",
            "SELECT t.namespace, t.thread_id, t.sequence, t.kind FROM turns t"
            " WHERE t.kind NOT IN (1, 2, 3)" + limit,
        ),
        (
            "counters",  # the thread row: next_sequence = max + 1, next_compaction = k
            "SELECT th.namespace, th.thread_id, th.next_sequence, th.next_compaction,"
            " COALESCE(a.max_sequence, 0), COALESCE(a.compactions, 0)"
            " FROM threads th LEFT JOIN ("
            " SELECT t.namespace, t.thread_id, max(t.sequence) AS max_sequence,"
            " sum(CASE WHEN t.kind = 2 THEN 1 ELSE 0 END) AS compactions"
            " FROM turns t GROUP BY t.namespace, t.thread_id) a"
            " ON a.namespace = th.namespace AND a.thread_id = th.thread_id"
            " WHERE th.next_sequence <> COALESCE(a.max_sequence, 0) + 1"
            " OR th.next_compaction <> COALESCE(a.compactions, 0)" + limit,
        ),
        (
            "orphan_turns",  # turns of a thread with no thread row (its counters are lost)
            "SELECT namespace, thread_id FROM turns GROUP BY namespace, thread_id"
            " EXCEPT SELECT namespace, thread_id FROM threads" + limit,
        ),
        (
            "request_ranges",  # invariant 5: a replay returns exactly the original turns
            "SELECT r.namespace, r.thread_id, r.request_id, r.first_sequence, r.count,"
            " count(t.sequence) FROM requests r LEFT JOIN turns t"
            " ON t.namespace = r.namespace AND t.thread_id = r.thread_id"
            " AND t.sequence >= r.first_sequence AND t.sequence < r.first_sequence + r.count"
            " AND t.request_id = r.request_id AND t.kind = r.kind"
            " GROUP BY r.namespace, r.thread_id, r.request_id, r.first_sequence, r.count"
            " HAVING count(t.sequence) <> r.count" + limit,
        ),
        (
            "request_claims",
            "SELECT r.namespace, r.thread_id, r.request_id, r.claimed_turn_id FROM requests r"
            " WHERE COALESCE(r.claimed_turn_id, '') <> '' AND NOT EXISTS ("
            " SELECT 1 FROM turns t WHERE t.namespace = r.namespace"
            " AND t.thread_id = r.thread_id AND t.sequence = r.first_sequence"
            " AND t.turn_id = r.claimed_turn_id)" + limit,
        ),
        (
            "unrecorded_requests",  # a retry of these would mint new turns
            "SELECT DISTINCT t.namespace, t.thread_id, t.request_id FROM turns t"
            " WHERE t.request_id <> '' AND NOT EXISTS (SELECT 1 FROM requests r"
            " WHERE r.namespace = t.namespace AND r.thread_id = t.thread_id"
            " AND r.request_id = t.request_id)" + limit,
        ),
        (
            "duplicate_ids",  # invariant 1
            "SELECT t.namespace, t.thread_id, t.turn_id, count(*) FROM turns t"
            " GROUP BY t.namespace, t.thread_id, t.turn_id HAVING count(*) > 1" + limit,
        ),
        (
            "minted_order",  # invariant 8: minted ids rise with the sequence
            "SELECT namespace, thread_id, sequence, turn_id, prev FROM ("
            f" SELECT t.namespace, t.thread_id, t.sequence, t.turn_id, LAG(t.turn_id{c}) OVER"
            " (PARTITION BY t.namespace, t.thread_id ORDER BY t.sequence) AS prev"
            f" FROM turns t WHERE {minted}) s WHERE turn_id{c} <= prev{c}" + limit,
        ),
        (
            "last_minted",  # the next id is minted after last_minted: it must be the greatest
            "SELECT th.namespace, th.thread_id, th.last_minted, m.greatest FROM threads th"
            f" JOIN (SELECT t.namespace, t.thread_id, max(t.turn_id{c}) AS greatest"
            f" FROM turns t WHERE {minted} GROUP BY t.namespace, t.thread_id) m"
            " ON m.namespace = th.namespace AND m.thread_id = th.thread_id"
            f" WHERE th.last_minted{c} < m.greatest{c}" + limit,
        ),
    ]


def _describe(name: str, row: Sequence[Any]) -> list[str]:
    where = _where(row[0], row[1])
    if name == "gaps":
        prev, sequence = row[2], row[3]
        if sequence <= prev:
            return [f"{where}: sequence {sequence} repeats"]
        if sequence == prev + 2:
            return [f"{where}: sequence {prev + 1} is missing"]
        return [f"{where}: sequences {prev + 1}..{sequence - 1} are missing"]
    if name == "compaction_ids":
        return [
            f"{where}: compaction turn at sequence {row[2]} is {row[3]!r}, expected "
            f"'{COMPACTION_PREFIX}{row[4]}'"
        ]
    if name == "compaction_kind":
        return [
            f"{where}: turn {row[3]!r} (sequence {row[2]}) has a compaction id but kind {row[4]}"
        ]
    if name == "kinds":
        return [f"{where}: turn at sequence {row[2]} has unknown kind {row[3]}"]
    if name == "counters":
        next_sequence, next_compaction, max_sequence, compactions = row[2:6]
        found = []
        if next_sequence != max_sequence + 1:
            found.append(
                f"{where}: next_sequence is {next_sequence}, expected {max_sequence + 1} "
                f"(last sequence {max_sequence})"
            )
        if next_compaction != compactions:
            found.append(
                f"{where}: next_compaction is {next_compaction}, expected {compactions} "
                f"({compactions} compaction turns)"
            )
        return found
    if name == "orphan_turns":
        return [f"{where}: has turns but no threads row"]
    if name == "request_ranges":
        last = row[3] + row[4] - 1
        return [
            f"{where}: request {row[2]!r} covers sequences {row[3]}..{last} but {row[5]} of "
            f"its {row[4]} turns are there"
        ]
    if name == "request_claims":
        return [f"{where}: request {row[2]!r} claimed {row[3]!r}, which is not at its sequence"]
    if name == "unrecorded_requests":
        return [f"{where}: turns carry request_id {row[2]!r}, which has no requests row"]
    if name == "duplicate_ids":
        return [f"{where}: turn id {row[2]!r} appears {row[3]} times"]
    if name == "minted_order":
        return [f"{where}: minted id {row[3]!r} (sequence {row[2]}) is not above {row[4]!r}"]
    if name == "last_minted":
        return [f"{where}: last_minted {row[2]!r} is below the greatest minted id {row[3]!r}"]
    raise AssertionError(name)


def check(url: str) -> list[str]:
    """Every problem found in the database at `url`, one line each (empty: clean)."""
    problems: list[str] = []
    with _snapshot(url, "check") as (conn, dialect):
        if dialect is SQLITE:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
            if [tuple(row) for row in rows] != [("ok",)]:
                problems.extend(f"integrity_check: {row[0]}" for row in rows)
        _require_schema(conn, dialect)
        for name, query in _invariant_checks(dialect):
            rows = conn.execute(query).fetchall()
            if name == "compaction_ids":  # the first wrong one per thread: the rest follow
                firsts: dict[tuple[str, str], Any] = {}
                for row in rows:
                    firsts.setdefault((row[0], row[1]), row)
                rows = list(firsts.values())
            for row in rows[:ROW_LIMIT]:
                problems.extend(_describe(name, row))
            if len(rows) > ROW_LIMIT:
                problems.append(f"({name}: more problems of this kind not shown)")
    return problems


# --- stats ---------------------------------------------------------------------------------


def stats(url: str) -> dict[str, Any]:
    """Figures about the database at `url` (JSON-ready)."""
    result: dict[str, Any] = {"database": redact_url(url)}
    with _snapshot(url, "stats") as (conn, dialect):
        _require_schema(conn, dialect)
        namespaces, threads, longest = conn.execute(
            "SELECT count(DISTINCT namespace), count(*), COALESCE(max(next_sequence), 1) - 1 "
            "FROM threads"
        ).fetchone()
        by_kind = {name: 0 for name in KIND_NAMES.values()}
        total = claimed = 0
        for kind, count, claims in conn.execute(
            "SELECT kind, count(*), sum(CASE WHEN claimed THEN 1 ELSE 0 END) FROM turns "
            "GROUP BY kind ORDER BY kind"
        ).fetchall():
            by_kind[KIND_NAMES.get(kind, f"kind_{kind}")] = int(count)
            total += int(count)
            claimed += int(claims or 0)
        (requests,) = conn.execute("SELECT count(*) FROM requests").fetchone()
        result.update(
            namespaces=int(namespaces),
            threads=int(threads),
            turns=total,
            turns_by_kind=by_kind,
            claimed_turns=claimed,
            requests=int(requests),
            longest_thread_turns=int(longest),
        )
        if dialect is SQLITE:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            (page_size,) = conn.execute("PRAGMA page_size").fetchone()
            (free_pages,) = conn.execute("PRAGMA freelist_count").fetchone()
            (path,) = [row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"]
            wal = Path(f"{path}-wal")
            result.update(
                schema_version=int(version),
                file=path,
                file_bytes=Path(path).stat().st_size,
                wal_bytes=wal.stat().st_size if wal.exists() else 0,
                free_bytes=int(page_size) * int(free_pages),
            )
        else:
            (version,) = conn.execute(
                "SELECT COALESCE(max(version), 0) FROM turnid_schema_migrations"
            ).fetchone()
            sizes = {}
            for table in ("threads", "turns", "requests"):
                (size,) = conn.execute(
                    "SELECT pg_total_relation_size(to_regclass(%s))", (table,)
                ).fetchone()
                sizes[table] = int(size or 0)
            result.update(schema_version=int(version), table_bytes=sizes)
    return result


def _format_stats(figures: dict[str, Any]) -> str:
    lines = [f"database       {figures['database']}"]
    if "schema_version" in figures:
        lines.append(f"schema version {figures['schema_version']}")
    lines += [
        f"namespaces     {figures['namespaces']}",
        f"threads        {figures['threads']}",
        f"turns          {figures['turns']}",
    ]
    lines += [f"  {kind:<20} {count}" for kind, count in figures["turns_by_kind"].items()]
    lines += [
        f"  {'claimed':<20} {figures['claimed_turns']}",
        f"requests       {figures['requests']}",
        f"longest thread {figures['longest_thread_turns']} turns",
    ]
    if "file_bytes" in figures:
        lines += [
            f"file           {figures['file']}",
            f"file size      {figures['file_bytes']} bytes",
            f"WAL size       {figures['wal_bytes']} bytes",
            f"free pages     {figures['free_bytes']} bytes",
        ]
    for table, size in figures.get("table_bytes", {}).items():
        lines.append(f"{table + ' size':<14} {size} bytes")
    return "\n".join(lines)


# --- backup --------------------------------------------------------------------------------


def backup_sqlite(url: str, dest: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Copy the SQLite database at `url` to `dest` while the service may be writing it.

    One backup step copies every page under one read transaction: the copy is the database
    as of that snapshot, so it holds every turn committed (acknowledged) before the backup
    began. Written to DEST.tmp-PID, quick-checked, fsynced and then moved into place, so
    DEST never holds a partial copy. Returns {"dest", "bytes", "threads", "turns"}.
    """
    if _is_postgres(url):
        raise Unsupported(
            "PostgreSQL is backed up with its own tools: "
            f"pg_dump --format=custom --file=turnid.dump '{redact_url(url)}' "
            "(or your provider's snapshots and point-in-time recovery)"
        )
    source_path = _sqlite_file(url, "backup")
    target = Path(dest)
    if target.exists() and not force:
        raise AdminError(f"{target} exists; pass --force to replace it")
    if target.resolve() == source_path.resolve():
        raise AdminError("the backup cannot replace the database itself")
    if not target.parent.is_dir():
        raise AdminError(f"no directory {target.parent}")
    temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    source = open_sqlite_readonly(source_path)
    try:
        copy = sqlite3.connect(temporary, isolation_level=None)
        try:
            source.backup(copy)  # pages=-1: all in one step, one snapshot
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            (verdict,) = copy.execute("PRAGMA quick_check").fetchone()
            if verdict != "ok":
                raise AdminError(f"the copy failed its quick_check: {verdict}")
            (threads,) = copy.execute("SELECT count(*) FROM threads").fetchone()
            (turns,) = copy.execute("SELECT count(*) FROM turns").fetchone()
        finally:
            copy.close()
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        if force:
            os.replace(temporary, target)
        else:
            try:
                os.link(temporary, target)  # fails if DEST appeared meanwhile
            except FileExistsError:
                raise AdminError(f"{target} exists; pass --force to replace it") from None
            os.unlink(temporary)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except sqlite3.Error as error:
        raise AdminError(f"backup failed: {error}") from None
    finally:
        source.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return {
        "dest": str(target),
        "bytes": target.stat().st_size,
        "threads": int(threads),
        "turns": int(turns),
    }


# --- the command line ----------------------------------------------------------------------


def _add_database(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database",
        default=None,
        metavar="URL",
        help="sqlite:///path/to/file.db or postgresql://... (env TURNID_DATABASE; "
        f"default {default_database_url()})",
    )


def add_admin_commands(commands: Any) -> None:
    """Add `backup`, `check` and `stats` to the `turnid` subcommands (argparse subparsers)."""
    backup = commands.add_parser(
        "backup",
        help="copy a SQLite database safely while the service runs",
        description="Copy the SQLite database to DEST with SQLite's online backup API, while "
        "the service keeps serving: the copy holds every turn acknowledged before the backup "
        "started. DEST appears only once complete and checked. PostgreSQL: use pg_dump.",
    )
    backup.add_argument("dest", metavar="DEST", help="the file to write")
    backup.add_argument("--force", action="store_true", help="replace DEST if it exists")
    _add_database(backup)
    backup.set_defaults(admin_command="backup")

    check_parser = commands.add_parser(
        "check",
        help="verify a database's integrity and turnid's invariants",
        description="Read the database (read-only, one snapshot) and report each broken "
        "invariant on its own line: sequences 1..n per thread, auto-compact-0..k-1 and the "
        "thread counters, request records and their turns, unique ids, minted-id order; "
        "SQLite also runs PRAGMA integrity_check. Exit 0 when clean, 1 with problems.",
    )
    _add_database(check_parser)
    check_parser.set_defaults(admin_command="check")

    stats_parser = commands.add_parser(
        "stats",
        help="print figures about a database",
        description="Namespaces, threads, turns by kind, requests, and sizes (SQLite: file, "
        "WAL and free pages; PostgreSQL: tables). Read-only.",
    )
    _add_database(stats_parser)
    stats_parser.add_argument("--json", action="store_true", help="print one JSON object")
    stats_parser.set_defaults(admin_command="stats")


def run_admin_command(args: argparse.Namespace) -> int:
    """Run the admin command that `args` names; returns the exit status."""
    command: str = args.admin_command
    url: str = args.database or default_database_url()
    try:
        if command == "backup":
            done = backup_sqlite(url, args.dest, force=args.force)
            print(
                f"turnid backup: {done['turns']} turns in {done['threads']} threads "
                f"-> {done['dest']} ({done['bytes']} bytes)"
            )
            return 0
        if command == "check":
            problems = check(url)
            for problem in problems:
                print(problem)
            if problems:
                print(f"turnid check: {len(problems)} problem(s)", file=sys.stderr)
                return 1
            print(f"turnid check: {redact_url(url)} is consistent")
            return 0
        if command == "stats":
            figures = stats(url)
            print(json.dumps(figures, indent=2) if args.json else _format_stats(figures))
            return 0
    except Unsupported as error:
        print(f"turnid {command}: {error}", file=sys.stderr)
        return 2
    except (AdminError, OSError) as error:
        print(f"turnid {command}: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # a driver error mid-query: one line, never a traceback
        print(f"turnid {command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    raise AssertionError(command)
