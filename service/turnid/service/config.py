"""Service configuration: flags, with environment variables as defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DEFAULT_LISTEN = "127.0.0.1:50051"


def redact_url(url: str) -> str:
    """The database URL for logs and messages: password masked, query (may hold one) dropped."""
    parts = urlsplit(url)
    if parts.password is None and not parts.query:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc, query=""))


def default_database_url() -> str:
    """TURNID_DATABASE, else a SQLite file in the user's data directory.

    The file is `$XDG_DATA_HOME/turnid/turnid.db`, with XDG_DATA_HOME defaulting to
    `~/.local/share` (the XDG base directory spec).
    """
    configured = os.environ.get("TURNID_DATABASE")
    if configured:
        return configured
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite://{Path(data_home) / 'turnid' / 'turnid.db'}"


@dataclass(frozen=True)
class ServerConfig:
    listen: str = field(default_factory=lambda: os.environ.get("TURNID_LISTEN", DEFAULT_LISTEN))
    database: str = field(default_factory=default_database_url)
    # How long in-flight calls may run on after SIGTERM/SIGINT before they are cancelled.
    grace_seconds: float = 10.0
    # SO_REUSEPORT lets several worker processes share one port (`--workers`); off otherwise,
    # so that binding a port that is taken fails instead of silently splitting traffic.
    reuse_port: bool = False

    def __post_init__(self) -> None:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"listen address {self.listen!r} is not HOST:PORT with PORT 0-65535")
