"""`turnid` command line: `turnid serve` runs the service, `turnid migrate` updates a schema."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from turnid.client.cli import add_client_commands, run_client_command
from turnid.service.config import DEFAULT_LISTEN, ServerConfig, default_database_url


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turnid",
        description="turnid: durable, thread-scoped turn ids for AI conversation threads.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the gRPC service",
        description="Run the turnid gRPC service (TurnIdService, grpc.health.v1, reflection) "
        "until SIGTERM or SIGINT, then finish in-flight calls and exit 0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument(
        "--listen",
        default=os.environ.get("TURNID_LISTEN", DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help="address to listen on; port 0 picks a free one (env TURNID_LISTEN)",
    )
    serve.add_argument(
        "--database",
        default=default_database_url(),
        metavar="URL",
        help="memory:, sqlite:///path/to/file.db or postgresql://... (env TURNID_DATABASE)",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long in-flight calls may finish after SIGTERM/SIGINT",
    )
    serve.add_argument(
        "--migrate",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("TURNID_MIGRATE", "1").lower() not in ("0", "false", "no", "off"),
        help="PostgreSQL: apply pending schema migrations at start; with --no-migrate, refuse "
        "to start unless `turnid migrate` has run (env TURNID_MIGRATE=0 for --no-migrate)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="service processes sharing the port (SO_REUSEPORT); needs sqlite: or postgresql:",
    )
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    migrate = commands.add_parser(
        "migrate",
        help="create or update the database schema",
        description="Apply pending schema migrations to the database and exit. Safe to run "
        "while replicas serve and from several places at once (PostgreSQL: advisory lock).",
    )
    migrate.add_argument(
        "--database",
        default=None,
        metavar="URL",
        help="sqlite:///path/to/file.db or postgresql://... (env TURNID_DATABASE; "
        f"default {default_database_url()})",
    )
    add_client_commands(commands)  # allocate, claim, get, list, parse
    return parser


def _serve(args: argparse.Namespace) -> int:
    from turnid.service.server import serve
    from turnid.service.stores import open_store

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = ServerConfig(listen=args.listen, database=args.database, grace_seconds=args.grace)
    except ValueError as error:
        print(f"turnid serve: {error}", file=sys.stderr)
        return 2
    if args.workers != 1:
        from turnid.service.workers import serve_workers

        try:
            return serve_workers(
                config, args.workers, migrate=args.migrate, log_level=args.log_level
            )
        except (OSError, ValueError) as error:
            print(f"turnid serve: {error}", file=sys.stderr)
            return 1
    try:
        asyncio.run(serve(config, open_store(config.database, migrate=args.migrate)))
    except (OSError, ValueError, RuntimeError) as error:
        print(f"turnid serve: {error}", file=sys.stderr)
        return 1
    return 0


def _migrate(args: argparse.Namespace) -> int:
    url = args.database or default_database_url()
    try:
        if url.startswith(("postgresql://", "postgres://")):
            from turnid.service.stores import open_store

            open_store(url)  # a clear error when the postgres extra is missing
            from turnid.service.stores.postgres import migrate

            result = asyncio.run(migrate(url))
            done = ", ".join(result.applied) or "nothing to apply"
            print(f"turnid migrate: schema at version {result.version} ({done})")
        else:
            asyncio.run(_open_and_close(url))  # SQLite migrates its file when it opens
            print("turnid migrate: schema up to date")
    except (OSError, ValueError, RuntimeError) as error:
        print(f"turnid migrate: {error}", file=sys.stderr)
        return 1
    return 0


async def _open_and_close(url: str) -> None:
    from turnid.service.stores import open_store

    store = open_store(url)
    await store.open()
    await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "migrate":
        return _migrate(args)
    if getattr(args, "client_command", None) is not None:
        return run_client_command(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
