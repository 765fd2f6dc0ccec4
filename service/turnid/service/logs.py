"""Logging for `turnid serve`: text or JSON lines on stderr, and the per-call access log.

`configure(level, fmt)` sets up the root logger. In `json` format every record is one JSON
object on one line with the stable keys `time` (RFC 3339, UTC, milliseconds), `level`, `logger`,
`message` and `pid`, plus every `extra=` field of the record as a top-level key (and `exception`
when there is one). In `text` format extras follow the message as `key=value` (quoted and
escaped when they hold spaces, quotes or control characters, so a request_id cannot forge a
line; empty ones left out).

`access_log(...)` is called once per call by the servicer. Failed calls are logged at INFO
(caller errors: bad input, not found, conflicts, auth, cancelled, deadline) or WARNING (the
service's own trouble: INTERNAL, UNKNOWN, UNAVAILABLE other than SHUTTING_DOWN,
RESOURCE_EXHAUSTED, DATA_LOSS, UNIMPLEMENTED), so every failed call shows at the default level;
successful calls only at DEBUG. It checks `isEnabledFor` before doing any work: it is on the hot
path. It takes no token and no credentials, so none can be logged.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Protocol, TextIO

ACCESS_LOGGER = "turnid.access"
_access = logging.getLogger(ACCESS_LOGGER)

# Codes that mean the service is in trouble (WARNING); any other failure is the caller's (INFO).
_SERVER_FAULTS = frozenset(
    {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DATA_LOSS", "UNIMPLEMENTED"}
)
_MAX_FIELD = 256  # a request_id or thread id that was refused for its length stays readable

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRS and not key.startswith("_")
    }


def _rfc3339(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def _text_value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and text.isprintable() and not any(c in text for c in ' "='):
        return text
    return json.dumps(text)  # quoted, with newlines and control characters escaped


class TextFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: MESSAGE key=value ...` (extras appended, quoted when needed)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if not extras:
            return line
        fields = " ".join(
            f"{key}={_text_value(value)}" for key, value in extras.items() if value != ""
        )
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {fields}{newline}{rest}"


def configure(
    level: str = "INFO", fmt: str = "text", *, stream: TextIO | None = None, tag_pid: bool = False
) -> None:
    """Send every log record to `stream` (stderr) in `fmt` ("text" or "json") at `level`.

    `tag_pid` adds the process id after the logger name in text (worker processes)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        tag = f"[{os.getpid()}]" if tag_pid else ""
        handler.setFormatter(TextFormatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())


def _clip(value: str) -> str:
    return value if len(value) <= _MAX_FIELD else value[:_MAX_FIELD] + "..."


def access_log(
    *,
    method: str,
    code: str,
    reason: str,
    request_id: str,
    namespace: str,
    peer: str,
    duration_s: float,
    correlation_id: str = "",
) -> None:
    """One access line for a finished call (see the module's docstring for levels)."""
    if code.startswith("StatusCode."):  # a grpc.StatusCode passed through str()
        code = code[len("StatusCode.") :]
    if code == "OK":
        level = logging.DEBUG
    elif code in _SERVER_FAULTS and reason != "SHUTTING_DOWN":
        level = logging.WARNING
    else:
        level = logging.INFO
    if not _access.isEnabledFor(level):
        return
    fields: dict[str, object] = {
        "method": method,
        "code": code,
        "reason": reason,
        "request_id": _clip(request_id),
        "namespace": _clip(namespace),
        "peer": peer,
        "duration_s": round(duration_s, 6),
        "correlation_id": correlation_id,
    }
    _access.log(level, "%s %s", method, code, extra=fields)


class _CallRecord(Protocol):
    method: str
    code: str
    reason: str
    request_id: str
    namespace: str
    duration_s: float
    correlation_id: str

    @property
    def peer(self) -> str: ...


def log_call(record: _CallRecord) -> None:
    """The servicer's call observer: `access_log` of the record, reading the peer (a call
    into gRPC) only when the line is going to be written."""
    code = record.code
    if code == "OK" and not _access.isEnabledFor(logging.DEBUG):
        return
    access_log(
        method=record.method,
        code=code,
        reason=record.reason,
        request_id=record.request_id,
        namespace=record.namespace,
        peer=record.peer,
        duration_s=record.duration_s,
        correlation_id=record.correlation_id,
    )
