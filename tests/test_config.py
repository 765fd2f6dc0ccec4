"""`turnid serve` configuration: flags > TURNID_* environment > --config TOML file > defaults;
--print-config; bad values are one line naming the setting and its source, exit 2."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from turnid.service import cli
from turnid.service.config import (
    SETTINGS,
    ConfigError,
    LoadedConfig,
    ServerConfig,
    load_serve_config,
)


@pytest.fixture(autouse=True)
def keep_signal_handlers() -> Iterator[None]:
    """`turnid serve` installs handlers; in-process runs must leave pytest's in place."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    after = {s: signal.getsignal(s) for s in before}
    for signum, handler in before.items():
        signal.signal(signum, handler)
    assert after == before


def load(*flags: str, env: dict[str, str] | None = None) -> LoadedConfig:
    args = cli._parser().parse_args(["serve", *flags])
    return load_serve_config(args, env or {})


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    loaded = load()
    assert loaded.config == ServerConfig()
    assert set(loaded.sources.values()) == {"default"}


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    config_file = write(
        tmp_path / "turnid.toml",
        "grace = 3.0\ndrain = 2\nworkers = 4\nlog_format = 'json'\n",
    )
    env = {"TURNID_CONFIG": config_file, "TURNID_DRAIN": "1.5", "TURNID_WORKERS": "3"}
    loaded = load("--workers", "2", env=env)
    assert loaded.config.workers == 2
    assert loaded.sources["workers"] == "flag --workers"
    assert loaded.config.drain_seconds == 1.5
    assert loaded.sources["drain_seconds"] == "env TURNID_DRAIN"
    assert loaded.config.grace_seconds == 3.0
    assert loaded.sources["grace_seconds"] == f"file {config_file}"
    assert loaded.config.log_format == "json"
    assert loaded.config.max_message_bytes == 64 * 1024
    assert loaded.sources["max_message_bytes"] == "default"
    # --config beats TURNID_CONFIG, and an empty variable counts as unset.
    other = write(tmp_path / "other.toml", "grace = 7\n")
    loaded = load("--config", other, env={**env, "TURNID_GRACE": ""})
    assert loaded.config.grace_seconds == 7.0
    assert loaded.config_file == other


def test_every_setting_has_a_flag_an_env_var_and_a_toml_key_shown_in_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fields = {f.name for f in dataclasses.fields(ServerConfig)}
    assert {s.field for s in SETTINGS} == fields
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for setting in SETTINGS:
        assert setting.flag in shown
        assert setting.env in shown, setting.env
        assert setting.env == "TURNID_" + setting.name.upper()
    assert "TURNID_CONFIG" in shown


def test_booleans_from_flags_env_and_file(tmp_path: Path) -> None:
    assert load("--no-migrate").config.migrate is False
    assert load(env={"TURNID_MIGRATE": "off"}).config.migrate is False
    assert load(env={"TURNID_MIGRATE": "0"}).config.migrate is False
    assert load(env={"TURNID_REUSE_PORT": "yes"}).config.reuse_port is True
    config_file = write(tmp_path / "c.toml", "keepalive_permit_without_calls = false\n")
    assert load("--config", config_file).config.keepalive_permit_without_calls is False
    # Dashes work in TOML keys too.
    config_file = write(tmp_path / "d.toml", "max-concurrent-rpcs = 7\n")
    assert load("--config", config_file).config.max_concurrent_rpcs == 7


def test_tls_and_token_files_and_postgres_settings(tmp_path: Path) -> None:
    cert, key, tokens = (write(tmp_path / name, "x") for name in ("c.pem", "k.pem", "tokens"))
    loaded = load(
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        env={"TURNID_AUTH_TOKENS": tokens, "TURNID_PG_POOL_MAX": "20"},
    )
    assert (loaded.config.tls_cert, loaded.config.tls_key) == (cert, key)
    assert loaded.config.auth_tokens == tokens
    assert loaded.config.pg_pool_max == 20
    assert loaded.config.tls


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        (("--workers", "many"), {}, "--workers: 'many' is not an integer (from flag --workers)"),
        ((), {"TURNID_WORKERS": "0"}, "--workers: must be at least 1, not 0 (from env TURNID_"),
        ((), {"TURNID_GRACE": "-1"}, "--grace: must be a number >= 0, not -1.0 (from env"),
        ((), {"TURNID_GRACE": "nan"}, "--grace: 'nan' is not a finite number (from env"),
        (("--log-level", "loud"), {}, "--log-level: 'loud' is not one of DEBUG, INFO"),
        ((), {"TURNID_LOG_FORMAT": "xml"}, "--log-format: 'xml' is not one of text, json"),
        ((), {"TURNID_MIGRATE": "maybe"}, "--migrate: 'maybe' is not a boolean"),
        (("--listen", "nowhere"), {}, "--listen: listen address 'nowhere' is not HOST:PORT"),
        (("--max-message-bytes", "10"), {}, "--max-message-bytes: must be at least 1024"),
        (("--pg-pool-min", "5", "--pg-pool-max", "2"), {}, "--pg-pool-max: must be at least"),
        (("--tls-cert", "c.pem"), {}, "--tls-key: --tls-cert and --tls-key go together"),
        (("--metrics-listen", "9090"), {}, "--metrics-listen: metrics listen address '9090'"),
    ],
)
def test_bad_values_name_the_setting_and_the_source(
    flags: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(*flags, env=env)
    assert str(caught.value).startswith(expected), str(caught.value)
    assert "\n" not in str(caught.value)


def test_bad_values_in_the_file_name_the_file(tmp_path: Path) -> None:
    config_file = write(tmp_path / "c.toml", 'workers = "2"\n')
    with pytest.raises(ConfigError, match=r"--workers: '2' is not an integer \(from file "):
        load("--config", config_file)
    config_file = write(tmp_path / "u.toml", "wrokers = 2\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'wrokers'"):
        load("--config", config_file)
    config_file = write(tmp_path / "t.toml", "workers = \n")
    with pytest.raises(ConfigError, match=r"is not valid TOML"):
        load("--config", config_file)
    with pytest.raises(ConfigError, match=r"cannot read .*missing.toml.*\(from env TURNID_CONFIG"):
        load_serve_config(
            cli._parser().parse_args(["serve"]), {"TURNID_CONFIG": str(tmp_path / "missing.toml")}
        )


def test_missing_tls_file_is_refused_with_its_source(tmp_path: Path) -> None:
    key = write(tmp_path / "k.pem", "x")
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError) as caught:
        load("--tls-key", key, env={"TURNID_TLS_CERT": missing})
    assert str(caught.value) == f"--tls-cert: {missing}: no such file (from env TURNID_TLS_CERT)"


def test_cli_bad_value_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TURNID_MAX_CONCURRENT_RPCS", "-3")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "turnid serve: --max-concurrent-rpcs: must be 0 (no limit) or more, not -3 "
        "(from env TURNID_MAX_CONCURRENT_RPCS)\n"
    )


def test_cli_unsupported_database_is_exit_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--database", "mysql://x", "--listen", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("turnid serve: --database: unsupported database URL 'mysql://x'")
    assert err.endswith("(from flag --database)\n") and err.count("\n") == 1


def test_print_config_masks_the_password_and_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TURNID_DATABASE", "postgresql://turnid:s3cret@db.internal/turnid")
    monkeypatch.setenv("TURNID_DRAIN", "2.5")
    config_file = write(tmp_path / "c.toml", "max_connection_age = 300\n")
    assert cli.main(["serve", "--print-config", "--workers", "3", "--config", config_file]) == 0
    printed = capsys.readouterr().out
    assert "s3cret" not in printed
    assert (
        'database = "postgresql://turnid:***@db.internal/turnid"  # env TURNID_DATABASE' in printed
    )
    assert "workers = 3  # flag --workers" in printed
    assert "drain = 2.5  # env TURNID_DRAIN" in printed
    assert f"max_connection_age = 300.0  # file {config_file}" in printed
    assert "# tls_cert = (unset)  # default" in printed
    # It is a config file: reading it back gives the same settings.
    parsed = tomllib.loads(printed)
    again = write(tmp_path / "printed.toml", printed)
    monkeypatch.delenv("TURNID_DATABASE")
    monkeypatch.delenv("TURNID_DRAIN")
    reloaded = load("--config", again).config
    expected = load("--workers", "3", "--config", config_file, env={"TURNID_DRAIN": "2.5"}).config
    assert dataclasses.replace(reloaded, database="x") == dataclasses.replace(
        expected, database="x"
    )
    assert parsed["database"] == "postgresql://turnid:***@db.internal/turnid"


def test_print_config_through_the_real_command(tmp_path: Path) -> None:
    from tests.e2e.serve_process import serve_command

    result = subprocess.run(
        serve_command("--print-config", "--database", "postgresql://u:pw@h/db?password=pw"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "pw" not in result.stdout.replace("pg_", "")
    assert 'database = "postgresql://u:***@h/db"  # flag --database' in result.stdout
