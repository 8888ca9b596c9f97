"""install / uninstall (git config) and track / untrack (.gitattributes)."""

import pytest

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
    assert cfg["filter.theta.process"] == "git-theta filter-process"
    assert cfg["filter.theta.required"] == "true"
    assert cfg["filter.theta.clean"] == "git-theta clean %f"
    assert cfg["filter.theta.smudge"] == "git-theta smudge %f"
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
