"""`turnid` command line: `turnid serve` runs the service, `turnid migrate` updates a schema,
`turnid token create` makes a bearer token; the client commands talk to a running service."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from turnid.client.cli import add_client_commands, run_client_command
from turnid.service import logs
from turnid.service.admin import add_admin_commands
from turnid.service.auth import add_token_commands
from turnid.service.config import (
    SETTINGS,
    ConfigError,
    LoadedConfig,
    add_serve_arguments,
    default_database_url,
    load_serve_config,
    render_config,
    store_options,
)

if TYPE_CHECKING:
    from turnid.service.server import StopSignals


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
        "until SIGTERM or SIGINT; then health says NOT_SERVING, calls are served on for "
        "--drain seconds, new calls are refused UNAVAILABLE, in-flight calls get --grace "
        "seconds, and it exits 0 (a second signal: at once, status 128+signal). Every setting "
        "comes from its flag, else its TURNID_* environment variable, else the --config TOML "
        "file, else its default.",
    )
    add_serve_arguments(serve)
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
    add_token_commands(commands)  # token create
    add_admin_commands(commands)  # backup, check, stats
    add_client_commands(commands)  # allocate, claim, get, list, parse
    return parser


def _bad_setting(loaded: LoadedConfig, error: ConfigError) -> int:
    """One line naming the setting and where its value came from; exit status 2."""
    setting = next((s for s in SETTINGS if s.field == error.setting), None)
    message = str(error)
    if setting is not None and not message.startswith(setting.flag):
        message = f"{setting.flag}: {message} (from {loaded.sources[setting.field]})"
    print(f"turnid serve: {message}", file=sys.stderr)
    return 2


def _serve(args: argparse.Namespace) -> int:
    # First: a stop signal from here on ends start-up cleanly (see server.StopSignals).
    from turnid.service.server import StopSignals

    signals = StopSignals.install()
    try:
        return _serve_with(args, signals)
    finally:
        signals.restore()


def _serve_with(args: argparse.Namespace, signals: StopSignals) -> int:
    from turnid.service.server import Security, serve
    from turnid.service.stores import open_store

    try:
        loaded = load_serve_config(args)
    except ConfigError as error:
        print(f"turnid serve: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(render_config(loaded))
        return 0
    config = loaded.config
    logs.configure(config.log_level, config.log_format)
    try:
        security = Security.from_config(config)  # bad TLS or tokens files: exit 2
    except ConfigError as error:
        return _bad_setting(loaded, error)
    if config.workers != 1:
        from turnid.service.workers import check_workers, serve_workers

        try:
            check_workers(config.database, config.workers)
        except ValueError as error:
            return _bad_setting(loaded, ConfigError("workers", str(error)))
        try:
            return serve_workers(config, signals=signals)
        except OSError as error:
            print(f"turnid serve: {error}", file=sys.stderr)
            return 1
    try:
        store = open_store(config.database, migrate=config.migrate, options=store_options(config))
    except ValueError as error:
        return _bad_setting(loaded, ConfigError("database", str(error)))
    try:
        asyncio.run(serve(config, store, signals=signals, security=security))
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
    if args.command == "token":
        from turnid.service.auth import run_token_command

        return run_token_command(args)
    if getattr(args, "admin_command", None) is not None:
        from turnid.service.admin import run_admin_command

        return run_admin_command(args)
    if getattr(args, "client_command", None) is not None:
        return run_client_command(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
