"""install / uninstall (git config) and track / untrack (.gitattributes)."""

import os
import shutil

import pytest
from conftest import GIT_THETA, random_state_dict, save_safetensors

pytestmark = pytest.mark.e2e


def config(repo, scope="--global"):
    out = repo.git("config", scope, "--list", check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_install_is_idempotent_and_uninstall_removes_only_its_own(make_repo):
    r = make_repo("plain", init=False)
    r.git("config", "--global", "filter.other.clean", "cat")
    r.git("config", "--global", "core.autocrlf", "false")
    first = r.theta("install")
    assert "installed" in first.stdout
    cfg = config(r)
    assert os.path.isabs(GIT_THETA)
    assert cfg["filter.theta.process"] == f"{GIT_THETA} filter-process"
    assert cfg["filter.theta.required"] == "true"
    assert cfg["filter.theta.clean"] == f"{GIT_THETA} clean %f"
    assert cfg["filter.theta.smudge"] == f"{GIT_THETA} smudge %f"
    assert "already up to date" in r.theta("install").stdout
    assert config(r) == cfg
    r.git("config", "--global", "filter.theta.smudge", "my-own-smudge %f")  # a user edit
    out = r.theta("uninstall")
    left = config(r)
    assert "filter.theta.process" not in left and "filter.theta.required" not in left
    assert left["filter.theta.smudge"] == "my-own-smudge %f"  # left alone
    assert "left filter.theta.smudge alone" in out.stderr
    assert left["filter.other.clean"] == "cat" and left["core.autocrlf"] == "false"


def test_local_install_outside_a_repository_is_a_clear_error(make_repo):
    r = make_repo("nowhere", init=False)
    proc = r.theta("install", "--local", check=False)
    assert proc.returncode == 128
    assert proc.stderr.startswith("error: not a git repository")


def test_track_rewrites_lfs_lines_and_untrack_removes_ours(make_repo):
    r = make_repo("attrs")
    attrs = r.file(".gitattributes")
    attrs.write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text lockable\n*.txt text\n")
    r.theta("track", "*.safetensors", "*.pt", "my model.bin")
    lines = attrs.read_text().splitlines()
    assert lines[0] == "*.safetensors filter=theta diff=theta merge=theta -text lockable"
    assert lines[1] == "*.txt text"
    assert lines[2] == "*.pt filter=theta diff=theta merge=theta -text"
    assert lines[3] == '"my model.bin" filter=theta diff=theta merge=theta -text'
    out = r.git("check-attr", "filter", "--", "my model.bin").stdout
    assert out.strip().endswith("filter: theta")
    assert "Already tracking" in r.theta("track", "*.pt").stdout
    r.theta("untrack", "*.safetensors", "*.pt")
    assert attrs.read_text().splitlines() == ["*.safetensors lockable", "*.txt text", lines[3]]


def _without_venv(env):
    """``env`` with the directory of the git-theta under test taken off PATH (a deactivated venv)."""
    venv_bin = os.path.dirname(GIT_THETA)
    path = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if os.path.abspath(d or ".") != venv_bin)
    return dict(env, PATH=path)


def test_git_works_on_tracked_files_with_the_venv_inactive(repo):
    """install records the absolute path of git-theta, so git finds it (filter, hook) off PATH."""
    save_safetensors(repo.path / "model.safetensors", random_state_dict(1))
    repo.env = _without_venv(repo.env)
    assert shutil.which("git-theta", path=repo.env["PATH"]) != GIT_THETA
    repo.git("add", "model.safetensors")
    repo.git("commit", "-q", "-m", "v1")
    assert repo.show("HEAD:model.safetensors").startswith(b"git-theta manifest v")
    (repo.path / "model.safetensors").unlink()
    repo.git("checkout", "--", "model.safetensors")
    assert repo.git("status", "--porcelain").stdout == ""
    # the pre-push hook runs the recorded git-theta too
    remote = repo.path.parent / "remote.git"
    repo.git("init", "-q", "--bare", str(remote))
    repo.git("remote", "add", "origin", str(remote))
    push = repo.git("push", "-q", "origin", "main")
    assert "not installed" not in push.stderr


def test_portable_install_records_the_bare_command_and_uninstall_removes_either(make_repo):
    r = make_repo("portable", init=False)
    r.theta("install", "--portable")
    assert config(r)["filter.theta.process"] == "git-theta filter-process"
    assert "installed" in r.theta("install").stdout  # portable -> absolute path: a change
    assert config(r)["filter.theta.process"] == f"{GIT_THETA} filter-process"
    r.theta("install", "--portable")
    r.theta("uninstall")
    assert "filter.theta.process" not in config(r)
    r.theta("install")
    r.theta("uninstall")
    assert not any(key.startswith(("filter.theta", "merge.theta")) for key in config(r))


def test_the_filter_places_its_hooks_where_core_hooks_path_says(repo):
    """A repository whose hooks live elsewhere (core.hooksPath, relative to the work tree, as
    husky and pre-commit set it) gets the pre-push hook there from its first filter run."""
    default = repo.path / ".git" / "hooks" / "pre-push"
    default.unlink(missing_ok=True)  # placed by the fixture's first filter run
    repo.git("config", "core.hooksPath", "tools/hooks")
    save_safetensors(repo.path / "model.safetensors", random_state_dict(seed=3))
    repo.git("add", "model.safetensors")
    placed = repo.path / "tools" / "hooks" / "pre-push"
    assert "git-theta pre-push hook" in placed.read_text()
    assert not default.exists()
