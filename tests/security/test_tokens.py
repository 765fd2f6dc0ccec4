"""The tokens file (parsing, loading, reload) and `turnid token create`."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import stat
from pathlib import Path

import pytest

from tests.security.conftest import TOKEN_A, TOKEN_A2, TOKEN_B, WRONG_TOKEN, tokens_text
from turnid.service.auth import (
    NAMESPACE_PATTERN,
    TOKEN_PREFIX,
    Authenticator,
    add_token_commands,
    hash_token,
    parse_tokens,
    run_token_command,
)

HEX_A = hashlib.sha256(TOKEN_A.encode()).hexdigest()


def test_hash_is_lower_case_sha256_of_the_utf8_bytes() -> None:
    assert hash_token("tök") == "sha256:" + hashlib.sha256("tök".encode()).hexdigest()
    assert hash_token(TOKEN_A) == f"sha256:{HEX_A}"


def test_good_file_with_comments_blank_lines_tabs_and_a_rotation() -> None:
    tokens = parse_tokens(tokens_text())
    assert sorted(tokens.values()) == ["team-a", "team-a", "team-b"]
    assert tokens[bytes.fromhex(HEX_A)] == "team-a"
    assert parse_tokens("") == {}
    assert parse_tokens("# only a comment\n\n   \n  # indented comment\n") == {}
    assert parse_tokens(f"team-a sha256:{HEX_A}") == {bytes.fromhex(HEX_A): "team-a"}  # no \n
    assert parse_tokens(f"team-a sha256:{HEX_A}\r\n") == {bytes.fromhex(HEX_A): "team-a"}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (f"team-a sha256:{HEX_A.upper()}", "64 lower-case hex digits"),
        (f"team-a sha256:{HEX_A[:-1]}", "64 lower-case hex digits"),
        (f"team-a sha256:{HEX_A}0", "64 lower-case hex digits"),
        (f"team-a sha256:{HEX_A[:-1]}g", "64 lower-case hex digits"),
        (f"team-a SHA256:{HEX_A}", "64 lower-case hex digits"),
        (f"team-a sha512:{HEX_A}", "never tokens"),
        (f"team-a {HEX_A}", "never tokens"),
        (f"team-a {TOKEN_A}", "never tokens"),
        (TOKEN_A, "found 1 field"),
        (f"team-a sha256:{HEX_A} # a comment", "found 5 fields"),
        (f"Team-A sha256:{HEX_A}", "namespace must be"),
        (f"-team sha256:{HEX_A}", "namespace must be"),
        (f"{'a' * 65} sha256:{HEX_A}", "namespace must be"),
        (f"team/a sha256:{HEX_A}", "namespace must be"),
        (f"tëam sha256:{HEX_A}", "namespace must be"),
    ],
)
def test_bad_lines_name_file_and_line_and_never_quote_it(line: str, problem: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_tokens(f"# header\n\nteam-b {hash_token(TOKEN_B)}\n{line}\n", "/etc/turnid/tokens")
    message = str(raised.value)
    assert message.startswith("/etc/turnid/tokens:4: "), message
    assert problem in message
    assert "\n" not in message
    assert HEX_A not in message and HEX_A.upper() not in message and TOKEN_A not in message


def test_the_same_hash_twice_is_refused_even_for_the_same_namespace() -> None:
    with pytest.raises(ValueError, match=r"^f:3: the same hash as line 1$"):
        parse_tokens(f"team-a sha256:{HEX_A}\n\nteam-b sha256:{HEX_A}\n", "f")


def test_namespace_syntax() -> None:
    for good in ("a", "0", "team-a", "voice.prod", "a_b", "x" * 64):
        assert NAMESPACE_PATTERN.fullmatch(good), good
    for bad in ("", "-a", ".a", "_a", "A", "a b", "x" * 65, "a/b", "a:b"):
        assert not NAMESPACE_PATTERN.fullmatch(bad), bad


def test_authenticator_reads_the_file(tokens_file: Path) -> None:
    authenticator = Authenticator(str(tokens_file))
    assert authenticator.enabled
    assert authenticator.namespaces == {"team-a", "team-b"}
    assert authenticator.namespace_for_token([("authorization", f"Bearer {TOKEN_A2}")]) == "team-a"


@pytest.mark.parametrize(
    "content",
    [b"team-a sha256:nothex\n", b"\xff\xfe not utf-8\n"],
    ids=["bad hex", "not utf-8"],
)
def test_a_bad_file_is_a_one_line_value_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tokens"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{path}:1: ") as raised:
        Authenticator(str(path))
    assert "\n" not in str(raised.value)


def test_a_missing_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read tokens file .*missing.*: No such file"):
        Authenticator(str(tmp_path / "missing"))


def test_an_empty_file_refuses_everyone_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    path.write_text("# nobody yet\n")
    path.chmod(0o600)
    caplog.set_level(logging.INFO, "turnid.auth")
    authenticator = Authenticator(str(path))
    assert authenticator.enabled and not authenticator.namespaces
    assert "every call will be refused" in caplog.text


def test_a_file_others_can_write_is_warned_about(
    tokens_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens_file.chmod(0o666)
    caplog.set_level(logging.WARNING, "turnid.auth")
    Authenticator(str(tokens_file))
    assert "writable by group or others" in caplog.text


def test_reload_good_and_bad(tokens_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    authenticator = Authenticator(str(tokens_file))
    header = [("authorization", f"Bearer {TOKEN_B}")]
    assert authenticator.namespace_for_token(header) == "team-b"

    tokens_file.write_text(f"team-c {hash_token(TOKEN_B)}\n")
    assert authenticator.reload()
    assert authenticator.namespace_for_token(header) == "team-c"
    assert authenticator.namespaces == {"team-c"}

    caplog.set_level(logging.INFO, "turnid.auth")
    tokens_file.write_text(f"team-d {hash_token(TOKEN_B)}\nteam-d {TOKEN_A}\n")
    assert not authenticator.reload()
    assert authenticator.namespace_for_token(header) == "team-c"  # the old set stays
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert f"{tokens_file}:2" in errors[0].getMessage()
    assert TOKEN_A not in caplog.text and TOKEN_B not in caplog.text

    tokens_file.unlink()
    assert not authenticator.reload()
    assert authenticator.namespace_for_token(header) == "team-c"
    assert not Authenticator(client_cert_namespaces=True).reload()  # nothing to reload


def _token_command(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="turnid")
    add_token_commands(parser.add_subparsers(dest="command", required=True))
    return run_token_command(parser.parse_args(argv))


def test_token_create_makes_the_file_0600_and_prints_the_token_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens"
    assert _token_command("token", "create", "team-a", "--auth-tokens", str(path)) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n"  # stdout is the token alone: TOKEN=$(turnid token create ...)
    assert token.startswith(TOKEN_PREFIX) and len(token) >= len(TOKEN_PREFIX) + 43
    assert token not in err and "shown only this once" in err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert token not in text
    assert f"team-a {hash_token(token)}\n" in text
    authenticator = Authenticator(str(path))
    assert authenticator.namespace_for_token([("authorization", f"Bearer {token}")]) == "team-a"

    # A second token for the namespace (rotation) and one for another; both append.
    assert _token_command("token", "create", "team-a", "--auth-tokens", str(path)) == 0
    second = capsys.readouterr().out.strip()
    assert _token_command("token", "create", "team-b", "--auth-tokens", str(path)) == 0
    third = capsys.readouterr().out.strip()
    assert len({token, second, third}) == 3
    assert authenticator.reload()
    for presented, namespace in ((token, "team-a"), (second, "team-a"), (third, "team-b")):
        header = [("authorization", f"Bearer {presented}")]
        assert authenticator.namespace_for_token(header) == namespace


def test_token_create_keeps_an_existing_files_mode_and_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# ours\nteam-a {hash_token(TOKEN_A)}")  # no final newline
    path.chmod(0o640)
    monkeypatch.setenv("TURNID_AUTH_TOKENS", str(path))
    assert _token_command("token", "create", "team-b") == 0  # the file from the environment
    token = capsys.readouterr().out.strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# ours", f"team-a {hash_token(TOKEN_A)}"]
    assert lines[-1] == f"team-b {hash_token(token)}"


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (("Team-A",), 2, "the namespace must be"),
        (("",), 2, "the namespace must be"),
        (("team-a", "--auth-tokens", ""), 2, "no tokens file"),
    ],
)
def test_token_create_refuses(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: tuple[str, ...],
    code: int,
    message: str,
) -> None:
    monkeypatch.setenv("TURNID_AUTH_TOKENS", str(tmp_path / "tokens"))
    assert _token_command("token", "create", *argv) == code
    out, err = capsys.readouterr()
    assert out == "" and message in err
    assert not (tmp_path / "tokens").exists()


def test_token_create_without_a_file_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TURNID_AUTH_TOKENS", raising=False)
    assert _token_command("token", "create", "team-a") == 2
    assert "pass --auth-tokens FILE or set TURNID_AUTH_TOKENS" in capsys.readouterr().err


def test_token_create_leaves_a_broken_file_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens"
    broken = f"team-a {WRONG_TOKEN}\n"
    path.write_text(broken)
    assert _token_command("token", "create", "team-a", "--auth-tokens", str(path)) == 1
    out, err = capsys.readouterr()
    assert out == "" and f"{path}:1:" in err and "nothing was added" in err
    assert WRONG_TOKEN not in err
    assert path.read_text() == broken


def test_token_create_cannot_open_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "no-such-dir" / "tokens"
    assert _token_command("token", "create", "team-a", "--auth-tokens", str(path)) == 1
    assert "cannot open" in capsys.readouterr().err
    assert not os.path.exists(path)
