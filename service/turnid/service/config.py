"""Service configuration: every `turnid serve` setting, from flags, environment, a TOML file.

`ServerConfig` is the one frozen value that holds every setting. `SETTINGS` describes each one
once (its flag, its `TURNID_*` environment variable, its TOML key, its type and help), and
`load_serve_config` resolves them with the precedence flags > environment > config file >
defaults, remembering where each value came from so that a bad value names its source.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from turnid.service.stores import StoreOptions

DEFAULT_LISTEN = "127.0.0.1:50051"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def redact_url(url: str) -> str:
    """The database URL for logs and messages: password masked, query (may hold one) dropped."""
    parts = urlsplit(url)
    if parts.password is None and not parts.query:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc, query=""))


def data_dir_database_url() -> str:
    """`sqlite://$XDG_DATA_HOME/turnid/turnid.db`, XDG_DATA_HOME defaulting to ~/.local/share."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite://{Path(data_home) / 'turnid' / 'turnid.db'}"


def default_database_url() -> str:
    """TURNID_DATABASE, else a SQLite file in the user's data directory (`turnid migrate`)."""
    return os.environ.get("TURNID_DATABASE") or data_dir_database_url()


class ConfigError(ValueError):
    """A setting with a value that cannot work; `setting` is the ServerConfig field."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def check_host_port(value: str, what: str = "listen address") -> None:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{what} {value!r} is not HOST:PORT with PORT 0-65535")


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of `turnid serve`. Defaults are the product's; nothing here reads the
    environment (`load_serve_config` does), so in-process servers get exactly what they ask."""

    listen: str = DEFAULT_LISTEN
    database: str = dataclasses.field(default_factory=data_dir_database_url)
    # After SIGTERM/SIGINT: health says NOT_SERVING and calls are still served for
    # `drain_seconds` (load balancers take the replica out), then new calls are refused
    # (UNAVAILABLE/SHUTTING_DOWN, clients retry elsewhere) and in-flight ones get
    # `grace_seconds` to finish before they are cancelled.
    grace_seconds: float = 10.0
    drain_seconds: float = 5.0
    migrate: bool = True  # PostgreSQL: apply migrations at start (else refuse an old schema)
    workers: int = 1
    # SO_REUSEPORT lets several processes share one port (`--workers` sets it for its workers);
    # off otherwise, so that binding a port that is taken fails instead of splitting traffic.
    reuse_port: bool = False
    log_level: str = "INFO"
    log_format: str = "text"
    # Limits (gRPC core channel arguments; see server_options in server.py).
    max_concurrent_rpcs: int = 0  # 0: no limit. WatchTurns streams count against it.
    max_message_bytes: int = 64 * 1024  # largest request accepted; requests are sub-kilobyte
    keepalive_time_seconds: float = 60.0  # the server pings an idle connection this often
    keepalive_timeout_seconds: float = 20.0  # and closes it if the ping is not answered
    keepalive_min_ping_interval_seconds: float = 10.0  # clients may ping at most this often
    keepalive_permit_without_calls: bool = True  # clients may ping with no call in flight
    max_ping_strikes: int = 2  # pings too early before GOAWAY (0: unlimited)
    max_connection_age_seconds: float = 0.0  # 0: off; else GOAWAY after about this long
    max_connection_age_grace_seconds: float = 10.0  # then calls get this long to finish
    # Security (auth.py): TLS files, tokens file.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_tokens: str | None = None
    # Prometheus /metrics on HOST:PORT (None: off).
    metrics_listen: str | None = None
    # PostgreSQL store (ignored by other stores).
    pg_pool_min: int = 2
    pg_pool_max: int = 10
    # Every wait of a call on the server is shorter than the client's default deadline (10 s),
    # so a call that waits can still come back and be retried in time (invariant 9).
    pg_pool_timeout_seconds: float = 3.0  # wait for a pooled connection
    pg_connect_timeout_seconds: float = 5.0  # unless the URL sets connect_timeout
    pg_statement_timeout_seconds: float = 3.0
    pg_lock_timeout_seconds: float = 2.0  # wait for a thread's row lock
    # SQLite store: wait this long for another process's write lock.
    sqlite_busy_timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        try:
            check_host_port(self.listen)
        except ValueError as error:
            raise ConfigError("listen", str(error)) from None
        if self.metrics_listen is not None:
            try:
                check_host_port(self.metrics_listen, "metrics listen address")
            except ValueError as error:
                raise ConfigError("metrics_listen", str(error)) from None
        for name in (
            "grace_seconds",
            "drain_seconds",
            "max_connection_age_seconds",
            "max_connection_age_grace_seconds",
        ):
            _require(self, name, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
        for name in (
            "keepalive_time_seconds",
            "keepalive_timeout_seconds",
            "keepalive_min_ping_interval_seconds",
            "pg_pool_timeout_seconds",
            "pg_connect_timeout_seconds",
            "pg_statement_timeout_seconds",
            "pg_lock_timeout_seconds",
            "sqlite_busy_timeout_seconds",
        ):
            _require(self, name, lambda v: math.isfinite(v) and v > 0, "a number > 0")
        _require(self, "workers", lambda v: v >= 1, "at least 1")
        _require(self, "max_concurrent_rpcs", lambda v: v >= 0, "0 (no limit) or more")
        _require(self, "max_message_bytes", lambda v: v >= 1024, "at least 1024")
        _require(self, "max_ping_strikes", lambda v: v >= 0, "0 (unlimited) or more")
        _require(self, "pg_pool_min", lambda v: v >= 0, "0 or more")
        _require(self, "pg_pool_max", lambda v: v >= 1, "at least 1")
        if self.pg_pool_max < self.pg_pool_min:
            raise ConfigError("pg_pool_max", f"must be at least pg-pool-min ({self.pg_pool_min})")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError("log_format", f"must be one of {', '.join(LOG_FORMATS)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise ConfigError(missing, "--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca", "needs --tls-cert and --tls-key (mTLS is TLS)")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def store_options(config: ServerConfig) -> StoreOptions:
    """The store settings of a server configuration."""
    return StoreOptions(
        sqlite_busy_timeout_s=config.sqlite_busy_timeout_seconds,
        pg_pool_min=config.pg_pool_min,
        pg_pool_max=config.pg_pool_max,
        pg_pool_timeout_s=config.pg_pool_timeout_seconds,
        pg_connect_timeout_s=config.pg_connect_timeout_seconds,
        pg_statement_timeout_s=config.pg_statement_timeout_seconds,
        pg_lock_timeout_s=config.pg_lock_timeout_seconds,
    )


def _require(config: ServerConfig, name: str, ok: Any, what: str) -> None:
    value = getattr(config, name)
    if not ok(value):
        raise ConfigError(name, f"must be {what}, not {value!r}")


# --- the settings of `turnid serve`, each with its flag, environment variable and TOML key ---


@dataclass(frozen=True)
class Setting:
    field: str  # ServerConfig field
    flag: str  # "--max-concurrent-rpcs"
    kind: str  # "str", "optional", "int", "float", "bool", "choice"
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The TOML key: the flag without dashes, `-` as `_` (`max_concurrent_rpcs`)."""
        return self.flag[2:].replace("-", "_")

    @property
    def env(self) -> str:
        return "TURNID_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "--listen", "str", "address to listen on; port 0 picks a free one",
            "HOST:PORT"),
    Setting("database", "--database", "str",
            "memory:, sqlite:///path/to/file.db or postgresql://...", "URL"),
    Setting("drain_seconds", "--drain", "float",
            "after SIGTERM/SIGINT, seconds to keep serving with health NOT_SERVING so load "
            "balancers stop sending calls", "SECONDS"),
    Setting("grace_seconds", "--grace", "float",
            "then, seconds in-flight calls may take to finish (new calls are refused "
            "UNAVAILABLE/SHUTTING_DOWN) before they are cancelled", "SECONDS"),
    Setting("migrate", "--migrate", "bool",
            "PostgreSQL: apply pending schema migrations at start; with --no-migrate, refuse "
            "to start unless `turnid migrate` has run"),
    Setting("workers", "--workers", "int",
            "service processes sharing the port (SO_REUSEPORT); needs sqlite: or postgresql:",
            "N"),
    Setting("reuse_port", "--reuse-port", "bool",
            "bind with SO_REUSEPORT so other processes can share the port"),
    Setting("log_level", "--log-level", "choice", "log level", "LEVEL", LOG_LEVELS),
    Setting("log_format", "--log-format", "choice",
            "text, or json: one object per line (time, level, logger, message, extras)",
            "FORMAT", LOG_FORMATS),
    Setting("max_concurrent_rpcs", "--max-concurrent-rpcs", "int",
            "calls (WatchTurns streams included) served at once per process; more are refused "
            "RESOURCE_EXHAUSTED; 0 for no limit", "N"),
    Setting("max_message_bytes", "--max-message-bytes", "int",
            "largest request message accepted (RESOURCE_EXHAUSTED beyond)", "BYTES"),
    Setting("keepalive_time_seconds", "--keepalive-time", "float",
            "ping an idle connection this often to find dead peers", "SECONDS"),
    Setting("keepalive_timeout_seconds", "--keepalive-timeout", "float",
            "close a connection whose ping is not answered within this", "SECONDS"),
    Setting("keepalive_min_ping_interval_seconds", "--keepalive-min-ping-interval", "float",
            "clients may ping no more often than this (too many early pings: GOAWAY)",
            "SECONDS"),
    Setting("keepalive_permit_without_calls", "--keepalive-permit-without-calls", "bool",
            "let clients keep an idle connection alive with pings"),
    Setting("max_ping_strikes", "--max-ping-strikes", "int",
            "early pings tolerated before GOAWAY too_many_pings; 0 for unlimited", "N"),
    Setting("max_connection_age_seconds", "--max-connection-age", "float",
            "send GOAWAY after a connection has lived about this long, so clients behind an "
            "L4 balancer reconnect and rebalance; 0 for never", "SECONDS"),
    Setting("max_connection_age_grace_seconds", "--max-connection-age-grace", "float",
            "then calls on that connection get this long to finish", "SECONDS"),
    Setting("tls_cert", "--tls-cert", "optional", "serve TLS with this certificate chain (PEM)",
            "FILE"),
    Setting("tls_key", "--tls-key", "optional", "the certificate's private key (PEM)", "FILE"),
    Setting("tls_client_ca", "--tls-client-ca", "optional",
            "require client certificates signed by these CAs (mTLS)", "FILE"),
    Setting("auth_tokens", "--auth-tokens", "optional",
            "turn authentication on: NAMESPACE sha256:HEX lines; SIGHUP reloads it", "FILE"),
    Setting("metrics_listen", "--metrics-listen", "optional",
            "serve Prometheus metrics at http://HOST:PORT/metrics", "HOST:PORT"),
    Setting("pg_pool_min", "--pg-pool-min", "int", "PostgreSQL: connections kept open", "N"),
    Setting("pg_pool_max", "--pg-pool-max", "int", "PostgreSQL: most connections", "N"),
    Setting("pg_pool_timeout_seconds", "--pg-pool-timeout", "float",
            "PostgreSQL: wait this long for a pooled connection (then UNAVAILABLE)", "SECONDS"),
    Setting("pg_connect_timeout_seconds", "--pg-connect-timeout", "float",
            "PostgreSQL: connect timeout unless the URL sets connect_timeout", "SECONDS"),
    Setting("pg_statement_timeout_seconds", "--pg-statement-timeout", "float",
            "PostgreSQL: statement_timeout of every statement", "SECONDS"),
    Setting("pg_lock_timeout_seconds", "--pg-lock-timeout", "float",
            "PostgreSQL: lock_timeout (the wait for a thread's row lock)", "SECONDS"),
    Setting("sqlite_busy_timeout_seconds", "--sqlite-busy-timeout", "float",
            "SQLite: wait this long for another process's write lock", "SECONDS"),
)  # fmt: skip
_BY_FIELD = {setting.field: setting for setting in SETTINGS}
_BY_NAME = {setting.name: setting for setting in SETTINGS}
CONFIG_ENV = "TURNID_CONFIG"


def _default_text(setting: Setting) -> str:
    default = _defaults()[setting.field]
    if setting.kind == "bool":
        return "on" if default else "off"
    if default is None:
        return "unset"
    if setting.field == "max_concurrent_rpcs" and default == 0:
        return "0, no limit"
    if setting.field == "max_connection_age_seconds" and not default:
        return "0, never"
    return str(default)


def _defaults() -> dict[str, Any]:
    return {f.name: getattr(ServerConfig(), f.name) for f in dataclasses.fields(ServerConfig)}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag (raw strings: `load_serve_config` converts and checks them)."""
    defaults = _defaults()
    for setting in SETTINGS:
        extra = f"(env {setting.env}; default {_default_text(setting)})".replace("%", "%%")
        if setting.kind == "bool":
            parser.add_argument(
                setting.flag,
                dest=setting.field,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{setting.help} {extra}",
            )
            continue
        if setting.field == "database":
            extra = (
                f"(env {setting.env}; default sqlite://$XDG_DATA_HOME/turnid/turnid.db, "
                f"here {defaults['database']})"
            ).replace("%", "%%")
        parser.add_argument(
            setting.flag,
            dest=setting.field,
            default=argparse.SUPPRESS,
            metavar=setting.metavar,
            help=f"{setting.help} {extra}",
        )
    parser.add_argument(
        "--config",
        dest="config_file",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"read settings from a TOML file (keys: the flag names, e.g. max_concurrent_rpcs "
        f"= 100); flags and environment variables override it (env {CONFIG_ENV})",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration (with where each value came from) and exit",
    )


@dataclass(frozen=True)
class LoadedConfig:
    config: ServerConfig
    sources: Mapping[str, str]  # field -> "flag --x", "env TURNID_X", "file PATH", "default"
    config_file: str | None


def _convert(setting: Setting, raw: object, source: str) -> Any:
    """A raw value (string from a flag or the environment; TOML value from a file) as the
    setting's type; ConfigError naming the setting and source when it is not one."""

    def bad(what: str) -> ConfigError:
        return ConfigError(setting.field, f"{raw!r} is not {what}")

    from_text = isinstance(raw, str) and not source.startswith("file")
    if setting.kind == "bool":
        if isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str):
            if raw.strip().lower() in _TRUE:
                return True
            if raw.strip().lower() in _FALSE:
                return False
        raise bad("a boolean (1/0, true/false, yes/no, on/off)")
    if setting.kind == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise bad("an integer")
    if setting.kind == "float":
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            value = float(raw)
        elif from_text and isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise bad("a number") from None
        else:
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return value
    if not isinstance(raw, str):
        raise bad("a string")
    if setting.kind == "choice":
        choice = raw.strip().upper() if setting.field == "log_level" else raw.strip().lower()
        if choice not in setting.choices:
            raise ConfigError(setting.field, f"{raw!r} is not one of {', '.join(setting.choices)}")
        return choice
    if setting.kind == "optional":
        return raw or None
    return raw


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        raise ConfigError("config_file", f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("config_file", f"{path} is not valid TOML: {error}") from None
    return data


def load_serve_config(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Resolve every setting: flags > environment > config file > defaults.

    Raises ConfigError whose message names the setting and where its value came from.
    """
    env = os.environ if environ is None else environ
    given = vars(args)
    config_file: str | None = given.get("config_file") or env.get(CONFIG_ENV) or None
    file_source = "flag --config" if given.get("config_file") else f"env {CONFIG_ENV}"
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = _read_file(config_file)
        except ConfigError as error:
            raise ConfigError("config_file", f"--config: {error} (from {file_source})") from None
        for key, value in data.items():
            setting = _BY_NAME.get(key.replace("-", "_"))
            if setting is None:
                raise ConfigError(
                    "config_file", f"--config: {config_file}: unknown setting {key!r}"
                )
            file_values[setting.field] = value

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        if setting.field in given:
            raw, source = given[setting.field], f"flag {setting.flag}"
        elif env.get(setting.env, "") != "":
            raw, source = env[setting.env], f"env {setting.env}"
        elif setting.field in file_values:
            raw, source = file_values[setting.field], f"file {config_file}"
        else:
            continue
        try:
            values[setting.field] = _convert(setting, raw, source)
        except ConfigError as error:
            raise ConfigError(setting.field, f"{setting.flag}: {error} (from {source})") from None
        sources[setting.field] = source
    try:
        config = ServerConfig(**values)
    except ConfigError as error:
        setting = _BY_FIELD[error.setting]
        source = sources.get(error.setting, "default")
        raise ConfigError(error.setting, f"{setting.flag}: {error} (from {source})") from None
    for field in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens"):
        path = getattr(config, field)
        if path is not None and not os.access(path, os.R_OK):
            reason = "no such file" if not os.path.exists(path) else "not readable"
            raise ConfigError(
                field, f"{_BY_FIELD[field].flag}: {path}: {reason} (from {sources[field]})"
            )
    all_sources = {s.field: sources.get(s.field, "default") for s in SETTINGS}
    return LoadedConfig(config, all_sources, config_file)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def render_config(loaded: LoadedConfig) -> str:
    """The effective configuration as TOML (usable as --config), each value's source beside it;
    the database password masked."""
    lines = ["# turnid serve: effective configuration (flags > env > config file > defaults)"]
    if loaded.config_file:
        lines.append(f"# config file: {loaded.config_file}")
    for setting in SETTINGS:
        value = getattr(loaded.config, setting.field)
        source = loaded.sources[setting.field]
        if value is None:
            lines.append(f"# {setting.name} = (unset)  # {source}")
            continue
        if setting.field == "database":
            value = redact_url(value)
        lines.append(f"{setting.name} = {_toml_value(value)}  # {source}")
    return "\n".join(lines) + "\n"
