"""deploy/systemd/turnid.service and its example env file.

`systemd-analyze verify` and `systemd-analyze security --offline` check the unit where
systemd-analyze is installed (Debian's systemd package; skipped, saying so, without it). The e2e
test serves and allocates under what of the unit's sandbox a process can impose on itself here:
an unprivileged uid with no capabilities and no_new_privs, the kernel's refuse-exec-gain
(PR_SET_MDWE, the mechanism behind MemoryDenyWriteExecute=), and strace to check that every
system call and socket family it used is one the unit's SystemCallFilter= and
RestrictAddressFamilies= allow, and that it wrote only in its state directory.

Not tested (no systemd as PID 1 here): starting it under systemd (DynamicUser=, the mount
namespaces of ProtectSystem=/ProtectHome=/PrivateTmp=, the seccomp filter itself), Restart=,
`systemctl reload` and the stop timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.deploy.files import (
    SERVING,
    UNIT,
    Server,
    env_file_settings,
    parse_unit,
    unit_environment,
    unit_values,
)

SECTIONS = parse_unit()
SERVICE = SECTIONS["Service"]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)
TURNID = Path(sys.executable).parent / "turnid"


def one(key: str) -> str:
    [value] = unit_values(SERVICE, key)
    return value


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_restart_reload_and_stop_timeout_cover_drain_and_grace() -> None:
    assert one("Restart") == "on-failure"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("KillSignal") == "SIGTERM"
    assert unit_values(SERVICE, "EnvironmentFile") == ["-/etc/turnid/turnid.env"]
    assert unit_values(SECTIONS["Unit"], "StartLimitIntervalSec") == ["0"]
    env = unit_environment(SERVICE)
    # The env file may change drain and grace: its examples must fit the timeout too.
    for settings in (env, {**env, **env_file_settings()}):
        drain, grace = float(settings["TURNID_DRAIN"]), float(settings["TURNID_GRACE"])
        assert seconds(one("TimeoutStopSec")) > drain + grace
    assert one("ExecStart").split()[1:] == ["serve"]


def test_hardening() -> None:
    expected = {
        "DynamicUser": "yes",
        "StateDirectory": "turnid",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
    }
    assert {key: one(key) for key in expected} == expected
    assert "@system-service" in unit_values(SERVICE, "SystemCallFilter")
    # The SQLite file is in the state directory, the one place the unit can write.
    database = unit_environment(SERVICE)["TURNID_DATABASE"]
    assert Path(database.removeprefix("sqlite://")).parent == Path("/var/lib/turnid")


def test_env_file_sets_nothing_by_default_and_holds_no_secret() -> None:
    assert env_file_settings(commented=False) == {}
    examples = env_file_settings()
    assert examples["PGPASSWORD"] == ""
    assert ":" not in examples["TURNID_DATABASE"].split("@")[0].removeprefix("postgresql://")


def unit_for_here(tmp_path: Path) -> Path:
    """The unit with ExecStart= at this venv's turnid (verify checks that the binary exists)."""
    unit = tmp_path / "turnid.service"
    unit.write_text(UNIT.read_text().replace("/opt/turnid/bin/turnid", str(TURNID)))
    return unit


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    result = subprocess.run(
        [ANALYZE, "verify", unit_for_here(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Unknown or misplaced keys are only warnings: any word about the unit fails the test.
    assert result.returncode == 0 and "turnid" not in result.stdout + result.stderr, (
        result.stdout + result.stderr
    )


@needs_analyze
def test_systemd_analyze_security_rates_it_ok(tmp_path: Path) -> None:
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--threshold=15", unit_for_here(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "Overall exposure level for turnid.service" in result.stdout


def syscall_groups() -> dict[str, list[str]]:
    assert ANALYZE is not None
    out = subprocess.run(
        [ANALYZE, "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def allowed_syscalls() -> set[str]:
    """The set the unit's SystemCallFilter= lines leave (allow lists, then ~deny lists)."""
    groups = syscall_groups()

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        return set().union(*(expand(member) for member in groups[name]))

    allowed: set[str] = set()
    for value in unit_values(SERVICE, "SystemCallFilter"):
        if value.startswith("~"):
            allowed -= set().union(*(expand(name) for name in value[1:].split()))
        else:
            allowed |= set().union(*(expand(name) for name in value.split()))
    return allowed


# Sets PR_SET_MDWE (65) with PR_MDWE_REFUSE_EXEC_GAIN (1), then runs `turnid serve` in the same
# process (before grpc or any extension module is loaded): from then on no memory can be mapped
# writable and executable, nor made executable once written.
MDWE_SERVE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_MDWE): {os.strerror(ctypes.get_errno())}")
from turnid.service.cli import main
sys.exit(main(["serve"]))
"""


@pytest.mark.e2e
@needs_analyze
@pytest.mark.skipif(
    not (shutil.which("strace") and shutil.which("setpriv")),
    reason="needs strace and setpriv (Debian: apt-get install strace util-linux)",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged uid needs root")
def test_serves_and_allocates_within_the_units_sandbox() -> None:
    from turnid.v1 import turnid_pb2, turnid_pb2_grpc

    nobody = 65534
    as_nobody = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups"]
    readable = [*as_nobody, sys.executable, "-c", "import turnid.service.cli"]
    if subprocess.run(readable, capture_output=True, check=False).returncode != 0:
        pytest.skip("an unprivileged user cannot read this checkout's venv")
    # pytest's tmp_path is root's alone (0700): the service user gets a directory in /tmp.
    with tempfile.TemporaryDirectory(prefix="turnid-unit-") as scratch:
        root = Path(scratch)
        root.chmod(0o755)
        state = root / "state"  # stands in for /var/lib/turnid, the service user's own
        state.mkdir()
        os.chown(state, nobody, nobody)
        serve_sandboxed(state, root / "trace", as_nobody, turnid_pb2, turnid_pb2_grpc)


def serve_sandboxed(
    state: Path, trace: Path, as_nobody: list[str], turnid_pb2: Any, turnid_pb2_grpc: Any
) -> None:
    env = {
        **unit_environment(SERVICE),
        "TURNID_LISTEN": "127.0.0.1:0",
        "TURNID_DATABASE": f"sqlite://{state}/turnid.db",
        "TURNID_DRAIN": "0",
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
    }
    # strace (as root) follows setpriv, which drops to the service user and execs the wrapper.
    command = [
        "strace",
        "-f",
        "-qq",
        "-o",
        str(trace),
        *as_nobody,
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        sys.executable,
        "-c",
        MDWE_SERVE,
    ]
    with Server(command, env, cwd=state, timeout=60) as server:
        assert server.health() == SERVING
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = turnid_pb2_grpc.TurnIdServiceStub(channel)
            request = turnid_pb2.AllocateTurnIdRequest(
                thread_id="sandbox", kind=turnid_pb2.TURN_KIND_AUTO_COMPACTION
            )
            turn = stub.AllocateTurnId(request, timeout=30).turn
            assert turn.turn_id == "auto-compact-0"
        [traced] = server.children()  # setpriv, then python: the server
        assert server.stop(pid=traced) == 0, "".join(server.log)
    lines = trace.read_text().splitlines()
    # From the exec of the wrapper on: what setpriv did before is not the service's.
    [start] = [n for n, line in enumerate(lines) if f'execve("{sys.executable}"' in line]
    lines = lines[start:]

    # Every system call is in the unit's filter (with the MDWE wrapper's own prctl and execve).
    used = {match.group(1) for line in lines if (match := re.match(r"\d+ +([a-z0-9_]+)\(", line))}
    assert {"bind", "listen", "fdatasync"} <= used, "strace saw too little"
    assert used - allowed_syscalls() == set()
    # ... every socket family is one RestrictAddressFamilies= allows ...
    families = set(re.findall(r"\bsocket\((AF_[A-Z0-9]+)", "\n".join(lines)))
    assert families and families <= set(one("RestrictAddressFamilies").split())
    # ... and it wrote nowhere but its state directory (ProtectSystem=strict, ProtectHome=).
    written = {
        match.group(1)
        for line in lines
        if (
            match := re.search(
                r'open(?:at)?\((?:AT_FDCWD, )?"([^"]+)", [^)]*O_(?:WRONLY|RDWR|CREAT)', line
            )
        )
        and "= -1" not in line
    }
    assert written and all(Path(path).is_relative_to(state) for path in written), written
    # MDWE was on, and nothing asked for executable memory that it refused.
    assert [line for line in lines if re.search(r"prctl\((PR_SET_MDWE|0x41)\b.*= 0$", line)]
    refused = [line for line in lines if "PROT_EXEC" in line and re.search(r"= -1 E", line)]
    assert not refused, refused
    crashes = [line for line in lines if re.match(r"\d+ +(---|\+\+\+) .*(SIGSEGV|killed)", line)]
    assert not crashes, crashes
