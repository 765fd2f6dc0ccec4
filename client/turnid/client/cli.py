"""The client commands of the `turnid` CLI: allocate, claim, get, list, thread, watch, health,
parse.

`add_client_commands(subparsers)` adds them to an argparse parser; each parsed command carries
`client_command`, which `run_client_command(args)` runs. Exit status: 0 on success, 1 when the
service refuses or cannot be reached (the reason goes to stderr), 2 for usage errors (among
them a token that would travel in cleartext). `watch` exits 0 on Ctrl-C; `health` exits 1
unless the service is SERVING.
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
from turnid.client._turn import ParsedTurnId, Thread, Turn, TurnIdForm, TurnKind, parse_turn_id
from turnid.client.errors import TurnIdError
from turnid.client.sync import TurnIdClient

#: Seconds a CLI command may take, retries of UNAVAILABLE included.
CLI_TIMEOUT = 10.0
#: Seconds `turnid health` may take: a probe should answer well inside its prober's timeout.
HEALTH_TIMEOUT = 5.0

_TRUE = ("1", "true", "yes", "on")

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


class UsageError(Exception):
    """A command line that cannot run as given (exit status 2)."""


def _connection_options(
    parser: argparse.ArgumentParser, timeout: float = CLI_TIMEOUT, timeout_help: str = ""
) -> None:
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
        default=timeout,
        metavar="SECONDS",
        help=timeout_help or f"deadline of each call, retries included (default {timeout:g})",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("TURNID_TOKEN"),
        help="bearer token sent as `authorization` metadata (env TURNID_TOKEN); refused over "
        "plaintext to a non-loopback target unless --insecure",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=os.environ.get("TURNID_INSECURE", "").lower() in _TRUE,
        help="allow --token over a plaintext channel to a non-loopback target (env "
        "TURNID_INSECURE=1); the token then crosses the network in cleartext",
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
    """Add allocate, claim, get, list, thread, watch, health and parse to the `turnid` parser."""
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
    _condition_option(allocate)
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
    _condition_option(claim)
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
        description="List every turn of THREAD_ID in sequence order, printing each page as it "
        "arrives (a thread of any length never waits for its last page, nor is held in "
        "memory). Text: a header, then one row per turn. --json: JSON lines, one object per "
        "turn (`jq -s .` makes an array). A failure mid-way exits 1 after the pages printed.",
    )
    list_.add_argument("thread_id", metavar="THREAD_ID")
    list_.add_argument(
        "--page-size", type=_positive, default=None, help="turns per request (default 100)"
    )
    list_.add_argument("--json", action="store_true", help="print JSON lines, one per turn")
    _connection_options(list_, timeout_help=f"deadline of each page (default {CLI_TIMEOUT:g})")
    list_.set_defaults(client_command=_list)

    thread = commands.add_parser(
        "thread",
        help="show where a thread stands",
        description="Show THREAD_ID's last sequence, next compaction index, last turn and "
        "when it was created and last written. Exit 1 (THREAD_NOT_FOUND) for a thread "
        "with no turns.",
    )
    thread.add_argument("thread_id", metavar="THREAD_ID")
    _json_option(thread)
    _connection_options(thread)
    thread.set_defaults(client_command=_thread)

    watch = commands.add_parser(
        "watch",
        help="follow a thread's turns live",
        description="Print every turn of THREAD_ID with a sequence above --after, in order, "
        "then each new turn as it is recorded, one line per turn, until Ctrl-C (exit 0). "
        "A broken stream (restart, lost connection) is resumed after the last turn printed, "
        "with backoff: no turn twice, none skipped. Once the watch has received every turn "
        "that existed at the start, `turnid watch: caught up` goes to stderr. --json: one "
        "JSON object per line (JSON lines).",
    )
    watch.add_argument("thread_id", metavar="THREAD_ID")
    watch.add_argument(
        "--after",
        type=int,
        default=0,
        metavar="N",
        help="start after sequence N (default 0: the whole history)",
    )
    watch.add_argument("--json", action="store_true", help="print JSON lines")
    _connection_options(watch, timeout_help="unused: a watch has no deadline")
    watch.set_defaults(client_command=_watch)

    health = commands.add_parser(
        "health",
        help="check that the service is serving (exit 0) or not (exit 1)",
        description="Ask the server's grpc.health.v1 Check for --service and print its "
        "status. Exit 0 when SERVING; 1 when NOT_SERVING (e.g. draining), unknown, or "
        "unreachable within --timeout. For container HEALTHCHECKs and load-balancer scripts.",
    )
    health.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help='the service to check: "" (default) for the whole server, or turnid.v1.TurnIdService',
    )
    _connection_options(
        health,
        timeout=HEALTH_TIMEOUT,
        timeout_help=f"give up (exit 1) after SECONDS (default {HEALTH_TIMEOUT:g})",
    )
    health.set_defaults(client_command=_health)

    parse = commands.add_parser(
        "parse",
        help="tell what a turn id is (no server needed)",
        description="Tell a UUIDv7 (and its timestamp), an auto-compact-N (and N) and any other "
        "turn id apart. Needs no server.",
    )
    parse.add_argument("turn_ids", nargs="+", metavar="TURN_ID")
    _json_option(parse)
    parse.set_defaults(client_command=_parse)


def _condition_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--expected-last-sequence",
        type=int,
        default=None,
        metavar="N",
        help="write only if the thread's last sequence is still N (0: no turns yet); "
        "otherwise fail THREAD_ADVANCED",
    )


def run_client_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    command: Command = args.client_command
    try:
        return command(args, out or sys.stdout)
    except UsageError as error:
        print(f"turnid {args.command}: {error}", file=sys.stderr)
        return 2
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
    try:
        return TurnIdClient(
            args.target,
            timeout=args.timeout,
            token=args.token or None,
            tls=args.tls,
            root_certificates=_read(args.root_certs),
            certificate_chain=_read(args.client_cert),
            private_key=_read(args.client_key),
            insecure=args.insecure,
        )
    except ValueError as error:  # e.g. a token over plaintext; --timeout 0
        raise UsageError(str(error)) from None


# -- the commands -----------------------------------------------------------------------------


def _allocate(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        condition = args.expected_last_sequence
        if args.count == 1:
            turn = client.allocate(
                args.thread_id,
                args.kind,
                request_id=args.request_id,
                expected_last_sequence=condition,
            )
            _print_turns([turn], args.json, out, single=True)
        else:
            turns = client.allocate_batch(
                args.thread_id,
                args.kind,
                args.count,
                request_id=args.request_id,
                expected_last_sequence=condition,
            )
            _print_turns(turns, args.json, out)
    return 0


def _claim(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        turn = client.claim(
            args.thread_id,
            args.turn_id,
            args.kind,
            request_id=args.request_id,
            expected_last_sequence=args.expected_last_sequence,
        )
    _print_turns([turn], args.json, out, single=True)
    return 0


def _get(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        turn = client.get(args.thread_id, args.turn_id)
    _print_turns([turn], args.json, out, single=True)
    return 0


def _list(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        pages = client.list_pages(args.thread_id, page_size=args.page_size or 0)
        if args.json:  # JSON lines: one turn per line, each page flushed as it arrives
            for page in pages:
                for turn in page:
                    print(json.dumps(turn_json(turn)), file=out)
                out.flush()
            return 0
        widths: list[int] | None = None
        for page in pages:
            rows = [_turn_row(turn) for turn in page]
            if widths is None:  # the first page sets the columns; later rows keep them
                rows.insert(0, TURN_HEADER)
                widths = _widths(rows)
            _print_rows(rows, out, widths)
            out.flush()
    return 0


def _thread(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        thread = client.get_thread(args.thread_id)
    if args.json:
        print(json.dumps(thread_json(thread)), file=out)
        return 0
    last = thread.last_turn
    rows: list[tuple[str, ...]] = [
        ("thread_id", thread.thread_id),
        ("last_sequence", str(thread.last_sequence)),
        ("next_compaction_index", str(thread.next_compaction_index)),
        ("last_turn", f"{last.turn_id} ({last.kind.label})" if last is not None else "-"),
        ("create_time", _time(thread.create_time)),
        ("update_time", _time(thread.update_time)),
    ]
    _print_rows(rows, out)
    return 0


def _watch(args: argparse.Namespace, out: TextIO) -> int:
    client = _client(args)

    def caught_up() -> None:
        print(f"turnid watch: caught up; following {args.thread_id}", file=sys.stderr, flush=True)

    try:
        with client, client.watch(args.thread_id, args.after, on_caught_up=caught_up) as watch:
            for turn in watch:
                text = json.dumps(turn_json(turn)) if args.json else "  ".join(_turn_row(turn))
                print(text, file=out, flush=True)
    except KeyboardInterrupt:
        return 0
    return 0


def _health(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        status = client.check_health(args.service)
    print(status, file=out)
    return 0 if status == "SERVING" else 1


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


def thread_json(thread: Thread) -> dict[str, Any]:
    last = thread.last_turn
    return {
        "thread_id": thread.thread_id,
        "last_sequence": thread.last_sequence,
        "next_compaction_index": thread.next_compaction_index,
        "last_turn": turn_json(last) if last is not None else None,
        "create_time": _time(thread.create_time),
        "update_time": _time(thread.update_time),
    }


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
    rows: list[tuple[str, ...]] = [TURN_HEADER]
    rows += [_turn_row(turn) for turn in turns]
    _print_rows(rows, out)


TURN_HEADER = ("SEQUENCE", "TURN_ID", "KIND", "CREATE_TIME", "REQUEST_ID", "CLAIMED")


def _turn_row(turn: Turn) -> tuple[str, ...]:
    return (
        str(turn.sequence),
        turn.turn_id,
        turn.kind.label,
        _time(turn.create_time),
        turn.request_id or "-",
        "yes" if turn.claimed else "no",
    )


def _widths(rows: list[tuple[str, ...]]) -> list[int]:
    return [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]


def _print_rows(rows: list[tuple[str, ...]], out: TextIO, widths: list[int] | None = None) -> None:
    if not rows:
        return
    widths = widths or _widths(rows)
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip(), file=out)
