"""deploy/Dockerfile: its shape (stages, user, health check, volume, ports, no secrets), and its
build and install steps run for real in temporary directories.

Not tested here (no container engine on the test machines): the image build itself (BuildKit's
--mount handling, the base image, layer contents), the container runtime (the HEALTHCHECK
scheduling, STOPSIGNAL delivery to PID 1, the volume's ownership, --read-only), and the user
creation step (it needs root and would change the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.deploy.files import (
    DOCKERFILE,
    KUBERNETES,
    REPO,
    SERVING,
    Server,
    Stage,
    expand,
    healthcheck_command,
    parse_dockerfile,
    parse_run,
    port_of,
)

STAGES = parse_dockerfile()
BUILDER, RUNTIME = STAGES if len(STAGES) == 2 else (None, None)
SECRET_NAME = re.compile(r"PASSWORD|TOKEN(?!S$)|SECRET|(?<!TLS_)KEY|PGPASS", re.IGNORECASE)
# The RUN step of the runtime stage that the e2e test cannot run here.
USER_CREATION = re.compile(r"^groupadd .*&& useradd ")


def runtime() -> Stage:
    assert RUNTIME is not None, "the Dockerfile has a builder and a runtime stage"
    return RUNTIME


def builder() -> Stage:
    assert BUILDER is not None, "the Dockerfile has a builder and a runtime stage"
    return BUILDER


def test_two_stages_builder_then_slim_runtime() -> None:
    assert [stage.name for stage in STAGES] == ["builder", "runtime"]
    assert builder().base == runtime().base
    assert "slim" in runtime().base
    # The runtime stage gets only the wheel from the builder, by a bind mount (not a layer).
    assert not runtime().all("COPY"), "the runtime stage copies nothing: the wheel is mounted"
    mounts = [m for i in runtime().all("RUN") for m in parse_run(i).mounts if m["type"] == "bind"]
    assert mounts == [{"type": "bind", "from": "builder", "source": "/wheels", "target": "/wheels"}]
    assert builder().args["WHEELS"] == runtime().args["WHEELS"] == "/wheels"


def test_builder_copies_only_what_the_wheel_needs_and_the_dockerignore_allows() -> None:
    copied = [i.text.split()[:-1] for i in builder().all("COPY")]
    sources = [source.rstrip("/") for sources in copied for source in sources]
    assert sources == ["pyproject.toml", "README.md", "client", "service"]
    for source in sources:
        assert (REPO / source).exists(), source
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") :].count("*") == 1
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == set(sources)


def test_runs_as_a_fixed_non_root_uid_that_the_kubernetes_manifests_use() -> None:
    user = expand(runtime().one("USER").text, runtime().args)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000, user
    assert gid == uid
    pods = []
    for path in KUBERNETES.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] in ("Deployment", "Job"):
                pods.append(doc["spec"]["template"]["spec"]["securityContext"])
    assert pods and all(pod["runAsUser"] == int(uid) for pod in pods)
    assert all(pod["runAsGroup"] == int(gid) for pod in pods)


def test_container_settings_health_volume_ports_signal() -> None:
    env = runtime().env
    assert runtime().one("STOPSIGNAL").text == "SIGTERM"
    assert "turnid health" in healthcheck_command(runtime())
    assert expand(runtime().one("ENTRYPOINT").text, env) == '["turnid"]'
    assert runtime().one("CMD").text == '["serve"]'
    # The SQLite file is in the volume, which is also the working directory.
    database = env["TURNID_DATABASE"]
    assert database.startswith("sqlite:///")
    volume = runtime().one("VOLUME").text.strip('[]"')
    assert Path(database.removeprefix("sqlite://")).parent == Path(volume)
    assert runtime().one("WORKDIR").text == volume
    exposed = {int(port) for port in runtime().one("EXPOSE").text.split()}
    assert exposed == {port_of(env["TURNID_LISTEN"]), port_of(env["TURNID_METRICS_LISTEN"])}
    assert env["PATH"].startswith(f"{runtime().args['VENV']}/bin:")


def test_no_secret_is_baked_in() -> None:
    for stage in STAGES:
        for name, value in {**stage.args, **stage.env}.items():
            assert not (SECRET_NAME.search(name) and value), f"{name} has a value in the image"
        assert "@" not in stage.env.get("TURNID_DATABASE", ""), "a database URL with a user"
        for instruction in stage.all("COPY"):
            assert not re.search(r"\.(pem|key|crt)\b|tokens|\.env\b", instruction.text)


@dataclass
class Installed:
    """What the Dockerfile's steps installed, and how the image would start it."""

    bin: Path  # the venv's bin directory (the image's /opt/turnid/bin)
    data: Path  # stands in for the volume, /var/lib/turnid
    env: dict[str, str]  # the image's ENV, paths moved here, listen/metrics on port 0
    command: list[str]  # ENTRYPOINT + CMD, with the venv's turnid

    def healthcheck(self, port: int, timeout: float) -> int:
        """The HEALTHCHECK command, as Docker runs it (/bin/sh -c, the container's env)."""
        try:
            return subprocess.run(
                ["/bin/sh", "-c", healthcheck_command(runtime())],
                env={**self.env, "TURNID_LISTEN": f"0.0.0.0:{port}"},
                capture_output=True,
                timeout=timeout,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            return -1  # Docker's --timeout would count it as a failed check


def run_steps(stage: Stage, cwd: Path, paths: dict[str, Path], search_path: str) -> list[str]:
    """Runs the stage's shell-form RUN steps but the user creation; returns the scripts run."""
    ran = []
    variables = {**stage.args, **stage.env, **{k: str(v) for k, v in paths.items()}}
    for instruction in stage.all("RUN"):
        step = parse_run(instruction)
        if USER_CREATION.search(step.script):
            continue
        result = subprocess.run(
            ["/bin/sh", "-ec", step.script],
            cwd=cwd,
            env={**os.environ, **variables, "PATH": search_path},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"{step.script}\n{result.stdout}\n{result.stderr}"
        ran.append(step.script)
    return ran


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The Dockerfile's RUN steps as shell scripts, its ARG paths moved into a temporary
    directory: the builder's `pip wheel` on a copy of what it COPYs, then the runtime's install
    of that wheel with the postgres extra into a fresh venv. pip's cache is this machine's (the
    image build uses a cache mount instead). The user creation step is not run (root only)."""
    root = tmp_path_factory.mktemp("image")
    paths = {"WHEELS": root / "wheels", "VENV": root / "opt" / "turnid"}
    data = root / "var-lib-turnid"
    data.mkdir()
    # The base image's interpreter: a fresh venv of this Python, with nothing installed.
    base_python = root / "base-python"
    venv.create(base_python, with_pip=True)
    search_path = f"{base_python / 'bin'}:{os.environ['PATH']}"

    workdir = root / "src"  # the builder's WORKDIR, filled as its COPY lines say
    workdir.mkdir()
    for instruction in builder().all("COPY"):
        *sources, destination = instruction.text.split()
        for source in sources:
            target = workdir / (Path(source).name if destination == "./" else destination)
            if (REPO / source).is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(REPO / source, target, ignore=ignore)
            else:
                shutil.copy2(REPO / source, target)
    assert len(run_steps(builder(), workdir, paths, search_path)) == 1
    wheels = list(paths["WHEELS"].glob("turnid-*.whl"))
    assert len(wheels) == 1, wheels

    ran = run_steps(runtime(), root, paths, search_path)
    assert len(ran) == len(runtime().all("RUN")) - 1, "only the user creation is left out"
    venv_bin = paths["VENV"] / "bin"

    env = {
        key: value.replace(runtime().args["VENV"], str(paths["VENV"])).replace(
            "/var/lib/turnid", str(data)
        )
        for key, value in runtime().env.items()
    }
    env["TURNID_LISTEN"] = "127.0.0.1:0"
    if "TURNID_METRICS_LISTEN" in env:
        env["TURNID_METRICS_LISTEN"] = "127.0.0.1:0"
    env["PATH"] = f"{venv_bin}:{os.environ['PATH']}"
    # Nothing from the test's environment: only what the container would have.
    env = {**env, "HOME": str(data), "LANG": "C.UTF-8"}
    command = json.loads(runtime().one("ENTRYPOINT").text) + json.loads(runtime().one("CMD").text)
    assert command == ["turnid", "serve"]
    return Installed(venv_bin, data, env, [str(venv_bin / "turnid"), *command[1:]])


@pytest.mark.e2e
def test_the_dockerfile_steps_install_a_turnid_that_serves(installed: Installed) -> None:
    """`turnid --help` from the venv the steps made, then `turnid serve` with the image's ENV
    until grpc.health.v1 says SERVING, and a SIGTERM stop (STOPSIGNAL) that exits 0 and leaves
    the SQLite file in the volume directory."""
    help_text = subprocess.run(
        [installed.bin / "turnid", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "serve" in help_text
    with Server(installed.command, installed.env, cwd=installed.data) as server:
        assert server.health() == SERVING
        assert server.stop() == 0, "".join(server.log)
    assert (installed.data / "turnid.db").is_file(), "the SQLite file is not in the volume"


@pytest.mark.e2e
def test_the_healthcheck_command_passes_while_serving_and_fails_after(
    installed: Installed,
) -> None:
    """The HEALTHCHECK's shell command (the port taken from TURNID_LISTEN) exits 0 against the
    serving server, and 1 while it drains after SIGTERM (health NOT_SERVING, calls still served)
    and once it is gone: Docker reads 0 healthy, 1 unhealthy (2 is reserved)."""
    with Server(installed.command, installed.env, cwd=installed.data) as server:
        assert installed.healthcheck(server.port, timeout=15) == 0, "".join(server.log)
        server.process.send_signal(signal.SIGTERM)
        server.wait_not_serving()
        assert installed.healthcheck(server.port, timeout=8) in (1, -1)
        assert server.process.wait(60) == 0, "".join(server.log)
    assert installed.healthcheck(server.port, timeout=8) in (1, -1)


def test_the_python_the_image_pins_is_one_the_project_supports() -> None:
    version = runtime().base.split(":")[1].split("-")[0]
    requires = re.search(r'requires-python = ">=(\d+\.\d+)"', (REPO / "pyproject.toml").read_text())
    assert requires is not None
    assert tuple(map(int, version.split("."))) >= tuple(map(int, requires.group(1).split(".")))
    assert sys.version_info >= (3, 11)
