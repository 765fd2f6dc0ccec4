"""Readers for the files in deploy/ (Dockerfile, systemd unit, env file) and a `turnid serve`
subprocess started with an arbitrary command and environment, for tests/deploy."""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "systemd" / "turnid.service"
ENV_FILE = DEPLOY / "systemd" / "turnid.env"
KUBERNETES = DEPLOY / "kubernetes"

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(text: str, variables: dict[str, str]) -> str:
    """Dockerfile-style $VAR / ${VAR} substitution (unknown names become empty, as Docker does)."""
    return _VAR.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), text)


# --- Dockerfile -------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: RUN, COPY, ENV, ...
    text: str  # the arguments, continuation lines joined, comments dropped


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults in this stage
    env: dict[str, str] = field(default_factory=dict)  # ENV, expanded as Docker does

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        [instruction] = self.all(keyword)
        return instruction


def _instructions(text: str) -> list[Instruction]:
    result, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):  # comments (and the syntax directive), also inside continuations
            continue
        if not line and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        result.append(Instruction(keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def _assignments(text: str) -> dict[str, str]:
    """`ENV a=1 b="two words"` or `ARG name=default` pairs (shell-like quoting)."""
    pairs = {}
    for word in shlex.split(text):
        name, equals, value = word.partition("=")
        pairs[name] = value if equals else ""
    return pairs


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in _instructions(path.read_text()):
        if instruction.keyword == "FROM":
            words = instruction.text.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(expand(words[0], global_args), name))
            continue
        if not stages:
            assert instruction.keyword == "ARG", f"{instruction.keyword} before the first FROM"
            for key, value in _assignments(instruction.text).items():
                global_args[key] = expand(value, global_args)
            continue
        stage = stages[-1]
        stage.instructions.append(instruction)
        known = {**stage.args, **stage.env}
        if instruction.keyword == "ARG":
            for key, value in _assignments(instruction.text).items():
                stage.args[key] = expand(value or global_args.get(key, ""), known)
        elif instruction.keyword == "ENV":
            for key, value in _assignments(instruction.text).items():
                stage.env[key] = expand(value, {**known, **_BASE_IMAGE_ENV})
    return stages


# What the python:*-slim images set that the Dockerfile's ENV lines refer to.
_BASE_IMAGE_ENV = {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"}


@dataclass
class Run:
    mounts: list[dict[str, str]]  # RUN --mount=type=...,k=v options
    script: str  # what /bin/sh -c runs


def parse_run(instruction: Instruction) -> Run:
    assert instruction.keyword == "RUN"
    mounts, rest = [], instruction.text
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        name, _, value = option[2:].partition("=")
        assert name == "mount", f"unexpected RUN option {option}"
        mounts.append(dict(part.split("=", 1) for part in value.split(",")))
    assert not rest.startswith("["), "exec-form RUN: the test runs shell-form steps only"
    return Run(mounts, rest)


def healthcheck_command(stage: Stage) -> str:
    """The shell command of `HEALTHCHECK [OPTIONS] CMD command`."""
    words = stage.one("HEALTHCHECK").text
    options, _, command = words.partition("CMD ")
    assert options.strip() and command, words
    return command.strip()


def healthcheck_options(stage: Stage) -> dict[str, str]:
    options = stage.one("HEALTHCHECK").text.partition("CMD ")[0].split()
    return dict(option[2:].split("=", 1) for option in options)


# --- systemd unit and env file ----------------------------------------------------------------


def parse_unit(path: Path = UNIT) -> dict[str, list[tuple[str, str]]]:
    """Section -> (key, value) in order; systemd allows a key more than once."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{line!r} before any section"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in section if name == key]


def unit_environment(section: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in unit_values(section, "Environment"):
        env.update(_assignments(value))
    return env


def env_file_settings(path: Path = ENV_FILE, *, commented: bool = True) -> dict[str, str]:
    """VARIABLE=value lines; with commented, also the `#VARIABLE=value` examples."""
    settings = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if commented and re.match(r"#[A-Z_][A-Z0-9_]*=", line):
            line = line[1:]
        if re.match(r"[A-Z_][A-Z0-9_]*=", line):
            name, _, value = line.partition("=")
            settings[name] = value
    return settings


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# --- a `turnid serve` subprocess --------------------------------------------------------------

SERVING = health_pb2.HealthCheckResponse.SERVING
_READY = re.compile(r"turnid serving on (\S+?)[\s\"(,]")


class Server:
    """Starts COMMAND (some form of `turnid serve`) and waits for its `turnid serving on` line."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path, timeout: float = 30):
        self.process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.log: list[str] = []
        lines: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.log.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"not ready in {timeout} s: {''.join(self.log)}") from None
            if line is None:
                raise RuntimeError(f"exited {self.process.wait()}: {''.join(self.log)}")
            if match := _READY.search(line + " "):
                self.target = match.group(1)
                self.port = port_of(self.target)
                return

    def health(self, timeout: float = 10) -> int:
        """grpc.health.v1 Check of the whole server; the status enum value."""
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return int(response.status)

    def wait_not_serving(self, timeout: float = 10) -> None:
        """Until grpc.health.v1 Watch reports NOT_SERVING (or the server is gone)."""
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                for response in stub.Watch(health_pb2.HealthCheckRequest(), timeout=timeout):
                    if response.status != SERVING:
                        return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise

    def stop(self, timeout: float = 60, pid: int | None = None) -> int:
        """SIGTERM, as Docker, systemd and the kubelet stop it; the exit status. PID: signal that
        process instead (the server under a tracer that exits with it)."""
        os.kill(pid or self.process.pid, signal.SIGTERM)
        return self.process.wait(timeout)

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_: object) -> None:
        self.kill()
