"""The client commands of the `turnid` CLI: allocate, claim, get, list, parse.

`add_client_commands(subparsers)` adds them to an argparse parser; each parsed command carries
`client_command`, which `run_client_command(args)` runs. Exit status: 0 on success, 1 when the
service refuses or cannot be reached (the reason goes to stderr), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from turnid.client._core import DEFAULT_TARGET
from turnid.client._turn import ParsedTurnId, Turn, TurnIdForm, TurnKind, parse_turn_id
from turnid.client.errors import TurnIdError
from turnid.client.sync import TurnIdClient

#: Seconds a CLI command may take, retries of UNAVAILABLE included.
CLI_TIMEOUT = 10.0

_KINDS = ", ".join(kind.label for kind in TurnKind if kind is not TurnKind.UNSPECIFIED)

Command = Callable[[argparse.Namespace, TextIO], int]


def _kind(text: str) -> TurnKind:
    try:
        return TurnKind.parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown kind {text!r} (use {_KINDS})") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("TURNID_TARGET", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help=f"the turnid service (env TURNID_TARGET; default {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=CLI_TIMEOUT,
        metavar="SECONDS",
        help=f"deadline of the call, retries included (default {CLI_TIMEOUT:g})",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("TURNID_TOKEN"),
        help="bearer token sent as `authorization` metadata (env TURNID_TOKEN)",
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--root-certs", type=Path, metavar="PEM", help="CA certificates (TLS)")
    group.add_argument("--client-cert", type=Path, metavar="PEM", help="client certificate")
    group.add_argument("--client-key", type=Path, metavar="PEM", help="client private key")


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def add_client_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
) -> None:
    """Add allocate, claim, get, list and parse to the `turnid` parser's subcommands."""
    allocate = commands.add_parser(
        "allocate",
        help="allocate new turn ids in a thread",
        description="Allocate a turn (or --count turns) of KIND in THREAD_ID. "
        f"KIND: {_KINDS}. Retries with the same request_id while the service is unavailable.",
    )
    allocate.add_argument("thread_id", metavar="THREAD_ID")
    allocate.add_argument("kind", type=_kind, metavar="KIND")
    allocate.add_argument("--count", type=_positive, default=1, help="how many (default 1)")
    allocate.add_argument("--request-id", help="idempotency key (default: a new UUIDv7)")
    _json_option(allocate)
    _connection_options(allocate)
    allocate.set_defaults(client_command=_allocate)

    claim = commands.add_parser(
        "claim",
        help="register a turn id minted elsewhere",
        description="Record TURN_ID (minted elsewhere) as a turn of THREAD_ID. "
        "KIND: realtime-delegation or user-input.",
    )
    claim.add_argument("thread_id", metavar="THREAD_ID")
    claim.add_argument("turn_id", metavar="TURN_ID")
    claim.add_argument("kind", type=_kind, metavar="KIND")
    claim.add_argument("--request-id", help="idempotency key (default: a new UUIDv7)")
    _json_option(claim)
    _connection_options(claim)
    claim.set_defaults(client_command=_claim)

    get = commands.add_parser("get", help="show one turn", description="Show one turn.")
    get.add_argument("thread_id", metavar="THREAD_ID")
    get.add_argument("turn_id", metavar="TURN_ID")
    _json_option(get)
    _connection_options(get)
    get.set_defaults(client_command=_get)

    list_ = commands.add_parser(
        "list",
        help="list a thread's turns",
        description="List every turn of THREAD_ID in sequence order.",
    )
    list_.add_argument("thread_id", metavar="THREAD_ID")
    list_.add_argument("--page-size", type=_positive, default=None, help="turns per request")
    _json_option(list_)
    _connection_options(list_)
    list_.set_defaults(client_command=_list)

    parse = commands.add_parser(
        "parse",
        help="tell what a turn id is (no server needed)",
        description="Tell a UUIDv7 (and its timestamp), an auto-compact-N (and N) and any other "
        "turn id apart. Needs no server.",
    )
    parse.add_argument("turn_ids", nargs="+", metavar="TURN_ID")
    _json_option(parse)
    parse.set_defaults(client_command=_parse)


def run_client_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    command: Command = args.client_command
    try:
        return command(args, out or sys.stdout)
    except TurnIdError as error:
        label = f"{error.reason} ({error.code.name})" if error.reason else error.code.name
        print(f"turnid {args.command}: {label}: {error.message}", file=sys.stderr)
        for key, value in sorted(error.metadata.items()):
            print(f"  {key}: {value}", file=sys.stderr)
        return 1
    except OSError as error:  # unreadable certificate files
        print(f"turnid {args.command}: {error}", file=sys.stderr)
        return 1


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def _client(args: argparse.Namespace) -> TurnIdClient:
    return TurnIdClient(
        args.target,
        timeout=args.timeout,
        token=args.token or None,
        tls=args.tls,
        root_certificates=_read(args.root_certs),
        certificate_chain=_read(args.client_cert),
        private_key=_read(args.client_key),
    )


# -- the commands -----------------------------------------------------------------------------


def _allocate(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        if args.count == 1:
            turn = client.allocate(args.thread_id, args.kind, request_id=args.request_id)
            _print_turns([turn], args.json, out, single=True)
        else:
            turns = client.allocate_batch(
                args.thread_id, args.kind, args.count, request_id=args.request_id
            )
            _print_turns(turns, args.json, out)
    return 0


def _claim(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        turn = client.claim(args.thread_id, args.turn_id, args.kind, request_id=args.request_id)
    _print_turns([turn], args.json, out, single=True)
    return 0


def _get(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        turn = client.get(args.thread_id, args.turn_id)
    _print_turns([turn], args.json, out, single=True)
    return 0


def _list(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        turns = client.list_turns(args.thread_id, page_size=args.page_size or 0)
        _print_turns(turns, args.json, out)
    return 0


def _parse(args: argparse.Namespace, out: TextIO) -> int:
    parsed = [parse_turn_id(turn_id) for turn_id in args.turn_ids]
    if args.json:
        documents = [_parsed_json(p) for p in parsed]
        print(json.dumps(documents[0] if len(documents) == 1 else documents), file=out)
        return 0
    rows: list[tuple[str, ...]] = [("TURN_ID", "FORM", "DETAIL")]
    rows += [(p.turn_id, p.form.value, _parsed_detail(p)) for p in parsed]
    _print_rows(rows, out)
    return 0


# -- output -----------------------------------------------------------------------------------


def _time(value: datetime) -> str:
    return value.isoformat(timespec="microseconds").replace("+00:00", "Z")


def turn_json(turn: Turn) -> dict[str, Any]:
    document: dict[str, Any] = {
        "thread_id": turn.thread_id,
        "turn_id": turn.turn_id,
        "kind": turn.kind.name,
        "sequence": turn.sequence,
        "create_time": _time(turn.create_time),
        "request_id": turn.request_id,
        "claimed": turn.claimed,
    }
    parsed = turn.parsed()
    if parsed.compaction_index is not None:
        document["compaction_index"] = parsed.compaction_index
    if parsed.timestamp is not None:
        document["uuid_time"] = _time(parsed.timestamp)
    return document


def _parsed_json(parsed: ParsedTurnId) -> dict[str, Any]:
    document: dict[str, Any] = {"turn_id": parsed.turn_id, "form": parsed.form.value}
    if parsed.timestamp is not None:
        document["uuid_time"] = _time(parsed.timestamp)
    if parsed.compaction_index is not None:
        document["compaction_index"] = parsed.compaction_index
    return document


def _parsed_detail(parsed: ParsedTurnId) -> str:
    if parsed.form is TurnIdForm.UUID7 and parsed.timestamp is not None:
        return f"time {_time(parsed.timestamp)}"
    if parsed.form is TurnIdForm.AUTO_COMPACTION:
        return f"N = {parsed.compaction_index}"
    return "-"


def _print_turns(turns: Iterable[Turn], as_json: bool, out: TextIO, single: bool = False) -> None:
    if as_json:
        documents = [turn_json(turn) for turn in turns]
        print(json.dumps(documents[0] if single else documents), file=out)
        return
    rows: list[tuple[str, ...]] = [
        ("SEQUENCE", "TURN_ID", "KIND", "CREATE_TIME", "REQUEST_ID", "CLAIMED")
    ]
    rows += [
        (
            str(turn.sequence),
            turn.turn_id,
            turn.kind.label,
            _time(turn.create_time),
            turn.request_id or "-",
            "yes" if turn.claimed else "no",
        )
        for turn in turns
    ]
    _print_rows(rows, out)


def _print_rows(rows: list[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip(), file=out)
