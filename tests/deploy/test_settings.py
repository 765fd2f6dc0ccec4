"""Every TURNID_* setting that deploy/ sets (the image's ENV, the Kubernetes ConfigMap, the
systemd unit and the examples in its env file) is one `turnid serve` knows and accepts:
`turnid serve --print-config` with that environment exits 0 and names each as taken from the
environment. Also `make test` without npm skips the Node packages instead of failing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.files import (
    DEPLOY,
    KUBERNETES,
    REPO,
    UNIT,
    env_file_settings,
    parse_dockerfile,
    parse_unit,
    unit_environment,
)


def settings_sets() -> dict[str, dict[str, str]]:
    configmap = yaml.safe_load((KUBERNETES / "configmap.yaml").read_text())["data"]
    unit = unit_environment(parse_unit(UNIT)["Service"])
    return {
        "Dockerfile ENV": parse_dockerfile()[-1].env,
        "kubernetes ConfigMap": {
            **configmap,
            "TURNID_DATABASE": "postgresql://turnid@postgres:5432/turnid",  # from the Secret
        },
        "systemd unit": unit,
        "systemd unit + env file examples": {**unit, **env_file_settings()},
    }


@pytest.mark.parametrize("name", list(settings_sets()))
def test_turnid_serve_accepts_every_setting(name: str, tmp_path: Path) -> None:
    settings = {k: v for k, v in settings_sets()[name].items() if k.startswith("TURNID_")}
    if "TURNID_AUTH_TOKENS" in settings:  # --print-config checks that the file exists
        tokens = tmp_path / "tokens"
        tokens.write_text("")
        settings["TURNID_AUTH_TOKENS"] = str(tokens)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNID_")}
    result = subprocess.run(
        [sys.executable, "-m", "turnid.service.cli", "serve", "--print-config"],
        env={**env, **settings},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    taken = set(re.findall(r"# env (TURNID_[A-Z0-9_]+)", result.stdout))
    assert set(settings) - taken == set(), result.stdout


def test_every_turnid_variable_named_anywhere_in_deploy_is_a_serve_setting() -> None:
    """Also the ones only in comments (TLS, for instance)."""
    help_text = subprocess.run(
        [sys.executable, "-m", "turnid.service.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    known = set(re.findall(r"TURNID_[A-Z0-9_]+", help_text.replace("\n", "").replace(" ", "")))
    named = {
        name
        for path in DEPLOY.rglob("*")
        if path.is_file()
        for name in re.findall(r"TURNID_[A-Z0-9_]*[A-Z0-9]", path.read_text())
    }
    assert named and named - known == set()


def test_make_test_without_npm_skips_the_node_install(tmp_path: Path) -> None:
    """`make -n test` (print, do not run) on a PATH without node and npm."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            if entry.name in ("node", "npm", "npx", "corepack") or (bin_dir / entry.name).exists():
                continue
            (bin_dir / entry.name).symlink_to(entry.path)
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", "test"],
        cwd=REPO,
        env={**os.environ, "PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "npm ci" not in result.stdout
    assert "npm is not on PATH" in result.stdout
    assert "-m pytest" in result.stdout
