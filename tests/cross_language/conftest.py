"""Fixtures for the cross-language tests: the npm toolchain and `turnid serve` in a subprocess."""

from __future__ import annotations

import os
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


NO_NODE = "Node.js/npm is not installed"


@pytest.fixture(scope="session")
def node_toolchain() -> Path:
    """The repo's node_modules, installed by `make node-install` (`make test` does that when npm is
    on PATH; CI runs it itself).

    Without node, npm or the installed node_modules the cross-language tests skip with the reason
    "Node.js/npm is not installed", so `make test` on a machine with Python alone runs every other
    test. Under CI (`CI` set, as `.ci/run` runs) they fail instead: CI must run them.
    """
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        why = f"{NO_NODE}: {' and '.join(missing)} not on PATH (the tests need Node.js 20+)"
    elif not (BUF.exists() and TSC.exists()):
        why = f"{NO_NODE}: {NODE_MODULES} lacks buf and tsc (run `make node-install`: npm ci)"
    else:
        return NODE_MODULES
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run the cross-language tests")
    pytest.skip(why)


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
