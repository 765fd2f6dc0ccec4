"""`turnid` command line: `turnid serve` runs the service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

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
        default=None,
        metavar="HOST:PORT",
        help=f"address to listen on (env TURNID_LISTEN; default {DEFAULT_LISTEN}; port 0: any)",
    )
    serve.add_argument(
        "--database",
        default=None,
        metavar="URL",
        help="memory:, sqlite:///path/to/file.db or postgresql://... (env TURNID_DATABASE; "
        f"default {default_database_url()})",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long in-flight calls may finish after SIGTERM/SIGINT",
    )
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from turnid.service.server import serve

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = {
        key: value
        for key, value in (("listen", args.listen), ("database", args.database))
        if value is not None
    }
    config = ServerConfig(grace_seconds=args.grace, **overrides)
    try:
        asyncio.run(serve(config))
    except (OSError, ValueError, RuntimeError) as error:
        print(f"turnid serve: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
