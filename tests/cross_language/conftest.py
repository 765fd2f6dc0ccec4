"""Fixtures for the cross-language tests: the npm toolchain and `turnid serve` in a subprocess."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.serve_process import ServeProcess

REPO = Path(__file__).resolve().parents[2]
NODE_MODULES = REPO / "node_modules"
BUF = NODE_MODULES / ".bin" / "buf"
TSC = NODE_MODULES / ".bin" / "tsc"
TIMEOUT = 120  # seconds, for any one tool run


def run(
    command: list[str | Path], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs a tool to completion and returns what it printed; never raises on its exit status."""
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def checked(command: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Runs a tool that must succeed; returns its standard output."""
    result = run(command, cwd, env)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited {result.returncode}\n"
        f"{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="session")
def node_toolchain() -> Path:
    """The repo's node_modules, installed by `make node-install` (`make test` and CI do that)."""
    if shutil.which("node") is None:
        pytest.fail("node is not on PATH: the cross-language tests need Node.js 20 or later")
    if not (BUF.exists() and TSC.exists()):
        pytest.fail(
            "node_modules is not installed: run `make node-install` (npm ci), "
            "which `make test` and CI do before the tests"
        )
    return NODE_MODULES


@pytest.fixture(scope="session")
def node_example(node_toolchain: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/node/client.ts, built as `make example-node` builds it, in a private directory.

    buf generate and tsc write to a temporary copy (not the tree's gen/), so test runs in the
    same tree at the same time never see each other's half-written stubs.
    """
    root = tmp_path_factory.mktemp("node-example")
    for name in ("buf.yaml", "buf.gen.yaml", "package.json"):
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "protos", root / "protos")
    shutil.copytree(REPO / "examples" / "node", root / "examples" / "node")
    (root / "node_modules").symlink_to(node_toolchain, target_is_directory=True)
    checked([BUF, "generate"], root)
    checked([TSC, "-p", "examples/node"], root)
    built = root / "gen" / "node" / "examples" / "node" / "client.js"
    assert built.is_file(), f"tsc did not write {built}"
    return built


@pytest.fixture
def turnid_serve() -> Iterator[ServeProcess]:
    with ServeProcess("memory:") as server:
        yield server
