"""`make breaking` (what CI runs) in a throw-away git repository holding a copy of the repo's
Makefile, buf.yaml and protos/: a wire-breaking change to turnid.v1 fails it, a compatible one
passes, and a clone with no earlier commit (or a shallow one) is handled."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.cross_language.conftest import BUF, REPO, checked, run

PROTO = Path("protos/turnid/v1/turnid.proto")


def git_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    return {
        **env,
        "GIT_AUTHOR_NAME": "turnid tests",
        "GIT_AUTHOR_EMAIL": "tests@turnid.invalid",
        "GIT_COMMITTER_NAME": "turnid tests",
        "GIT_COMMITTER_EMAIL": "tests@turnid.invalid",
        "GIT_CONFIG_NOSYSTEM": "1",
    }


def make_breaking(repo: Path) -> tuple[int, str]:
    # -o node-install: the toolchain is the tree's own node_modules (symlinked), already there.
    result = run(
        ["make", "--no-print-directory", "-o", "node-install", "breaking"], repo, git_env()
    )
    return result.returncode, result.stdout + result.stderr


def edit(repo: Path, old: str, new: str) -> None:
    path = repo / PROTO
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def commit(repo: Path, message: str) -> None:
    checked(["git", "add", "-A"], repo, git_env())
    checked(["git", "commit", "--quiet", "-m", message], repo, git_env())


@pytest.fixture
def proto_repo(node_toolchain: Path, tmp_path: Path) -> Path:
    """A git repository whose only commit holds the repo's protos/, buf.yaml and Makefile."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("Makefile", "buf.yaml"):
        shutil.copy2(REPO / name, repo / name)
    shutil.copytree(REPO / "protos", repo / "protos")
    (repo / "node_modules").symlink_to(node_toolchain, target_is_directory=True)
    (repo / ".gitignore").write_text("node_modules\n")
    checked(["git", "init", "--quiet", "--initial-branch=main"], repo, git_env())
    commit(repo, "protos")
    return repo


BREAKING_CHANGES: dict[str, tuple[str, str, str]] = {
    # name: (old text, new text, what buf's message names)
    "field type": ("int64 sequence = 4;", "int32 sequence = 4;", "sequence"),
    "field deleted": ("  bool claimed = 7;\n", "", "claimed"),
    "field renumbered": (
        "  string request_id = 3;\n  // Conditional",
        "  string request_id = 9;\n  // Conditional",
        "request_id",
    ),
    "rpc deleted": (
        "  rpc GetTurn(GetTurnRequest) returns (GetTurnResponse);\n",
        "",
        "GetTurn",
    ),
    "enum value renamed": ("TURN_KIND_USER_INPUT = 3;", "TURN_KIND_HUMAN_INPUT = 3;", "3"),
}


def test_one_commit_history_is_skipped_with_a_message(proto_repo: Path) -> None:
    status, output = make_breaking(proto_repo)
    assert status == 0, output
    assert "SKIPPED: no commit HEAD~1" in output


def test_compatible_change_passes(proto_repo: Path) -> None:
    edit(
        proto_repo,
        "  bool claimed = 7;\n",
        "  bool claimed = 7;\n  // A new field: compatible.\n  string note = 8;\n",
    )
    commit(proto_repo, "add a field")
    status, output = make_breaking(proto_repo)
    assert status == 0, output
    assert "breaking: protos/ against HEAD~1" in output


@pytest.mark.parametrize("change", BREAKING_CHANGES, ids=list(BREAKING_CHANGES))
def test_breaking_change_fails(proto_repo: Path, change: str) -> None:
    old, new, named = BREAKING_CHANGES[change]
    edit(proto_repo, old, new)
    commit(proto_repo, f"break: {change}")
    status, output = make_breaking(proto_repo)
    assert status != 0, output
    assert "turnid/v1/turnid.proto" in output
    assert named in output


def test_shallow_clone_is_deepened_and_still_catches_it(
    proto_repo: Path, node_toolchain: Path, tmp_path: Path
) -> None:
    edit(proto_repo, *BREAKING_CHANGES["field type"][:2])
    commit(proto_repo, "break: field type")
    clone = tmp_path / "clone"
    checked(
        ["git", "clone", "--quiet", "--depth=1", proto_repo.as_uri(), clone], tmp_path, git_env()
    )
    assert checked(["git", "rev-parse", "--is-shallow-repository"], clone).strip() == "true"
    (clone / "node_modules").symlink_to(node_toolchain, target_is_directory=True)
    status, output = make_breaking(clone)
    assert "shallow clone, fetching one more commit" in output
    assert status != 0, output
    assert "sequence" in output


def test_buf_breaking_on_two_plain_copies(tmp_path: Path, node_toolchain: Path) -> None:
    """The same check without git: `buf breaking NEW --against OLD` on two directories."""
    old, new = tmp_path / "old", tmp_path / "new"
    for copy in (old, new):
        shutil.copytree(REPO / "protos", copy)
    text = (new / "turnid/v1/turnid.proto").read_text()
    (new / "turnid/v1/turnid.proto").write_text(
        text.replace("string turn_id = 2;", "bytes turn_id = 2;", 1)
    )
    # Plain directories (no buf.yaml in them) are checked with buf's default rules, which are FILE.
    result = run([BUF, "breaking", new, "--against", old], tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "turn_id" in result.stdout + result.stderr


def test_the_repo_protos_pass_buf_lint(node_toolchain: Path) -> None:
    result = run([BUF, "lint"], REPO)
    assert result.returncode == 0, result.stdout + result.stderr
