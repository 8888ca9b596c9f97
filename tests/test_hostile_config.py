"""A cloned repository's .gitattributes and .lfsconfig may only choose among what the user installed."""

import pytest

from conftest import random_state_dict, save_safetensors
from git_theta.git.allowlist import ATTRIBUTES, check_attribute, check_lfs_url, lfsconfig_key_allowed, read_lfsconfig
from git_theta.errors import ConfigError


def test_unknown_theta_attributes_are_ignored_and_nothing_runs(repo, tmp_path):
    marker = tmp_path / "pwned"
    (repo.path / ".gitattributes").write_text(
        "[attr]theta-evil theta-exec=sh\n"
        "*.safetensors filter=theta diff=theta merge=theta -text theta-evil "
        f"theta-hook=touch%20{marker} theta-update-command=x theta-url=http://evil.invalid\n"
    )
    save_safetensors(repo.file("model.safetensors"), random_state_dict(1))
    good = repo.file("model.safetensors").read_bytes()
    repo.commit("with odd attributes")
    assert repo.show("HEAD:model.safetensors").startswith(b"git-theta manifest")
    repo.file("model.safetensors").unlink()
    repo.git("checkout", "--", "model.safetensors")
    assert repo.file("model.safetensors").read_bytes() == good
    assert not marker.exists()  # nothing was executed
    assert repo.status() == ""


@pytest.mark.parametrize("value", ["../../evil", "$(id)", "Torch", "set"])
def test_theta_format_must_be_a_plugin_name(repo, value):
    attr = "theta-format" if value == "set" else f"theta-format={value}"
    (repo.path / ".gitattributes").write_text(f"*.safetensors filter=theta diff=theta merge=theta -text {attr}\n")
    save_safetensors(repo.file("model.safetensors"), random_state_dict(1))
    proc = repo.git("add", "model.safetensors", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and "theta-format" in errors[0]
        and ("not a valid name" in errors[0] or "needs a value" in errors[0])
    )
    assert "Traceback" not in proc.stderr
    assert repo.git("ls-files", "--", "model.safetensors").stdout == ""


def test_theta_format_naming_an_installed_plugin_is_honoured(repo):
    (repo.path / ".gitattributes").write_text(
        "*.ckpt filter=theta diff=theta merge=theta -text theta-format=safetensors\n"
    )
    save_safetensors(repo.file("model.ckpt"), random_state_dict(2))
    repo.commit("forced format", "model.ckpt")
    assert b"\nformat safetensors\n" in repo.show("HEAD:model.ckpt")


def test_attribute_allow_list():
    assert set(ATTRIBUTES) == {"theta-format", "theta-merge"}
    assert check_attribute("theta-merge", "ties") == "ties"
    with pytest.raises(ConfigError):
        check_attribute("theta-merge", "a b")


@pytest.mark.parametrize(
    "key,allowed",
    [
        ("lfs.url", True),
        ("lfs.pushurl", True),
        ("remote.origin.lfsurl", True),
        ("remote.origin.lfspushurl", True),
        ("core.sshCommand", False),
        ("lfs.standalonetransferagent", False),
        ("lfs.customtransfer.x.path", False),
        ("credential.helper", False),
        ("include.path", False),
        ("http.proxy", False),
        ("lfs.url.evil", False),
    ],
)
def test_lfsconfig_keys(key, allowed):
    assert lfsconfig_key_allowed(key) is allowed


@pytest.mark.parametrize(
    "url",
    [
        "file:///home/me/.ssh",
        "/etc",
        "ext::sh -c touch% /tmp/pwned",
        "ssh://host/x",
        "https://user:secret@example.com/x",
        "https://example.com/a\nb",
        "https://example.com/\x1b[31m",
        "https:///nohost",
    ],
)
def test_lfsconfig_urls_refused(url):
    with pytest.raises(ConfigError):
        check_lfs_url(url)


def test_read_lfsconfig_keeps_only_allowed_keys(tmp_path):
    (tmp_path / ".lfsconfig").write_text(
        "[lfs]\n\turl = https://lfs.example.com/repo\n\tcustomtransfer = x\n"
        "[core]\n\tsshCommand = touch /tmp/pwned\n"
        "[include]\n\tpath = /etc/gitconfig\n"
        '[remote "origin"]\n\tlfsurl = http://mirror.example.com/r\n'
    )
    allowed, ignored = read_lfsconfig(tmp_path)
    assert allowed == {"lfs.url": "https://lfs.example.com/repo", "remote.origin.lfsurl": "http://mirror.example.com/r"}
    assert set(ignored) == {"lfs.customtransfer", "core.sshcommand", "include.path"}
    (tmp_path / ".lfsconfig").write_text("[lfs]\n\turl = file:///srv/objects\n")
    with pytest.raises(ConfigError, match="not an http"):
        read_lfsconfig(tmp_path)


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_lfsconfig_cannot_point_transfers_at_a_local_directory(repo, make_repo, tmp_path, form):
    """A cloned .lfsconfig naming a local directory would make 'push' write wherever it likes."""
    target = tmp_path / "attacker-chosen"
    url = str(target) if form == "path" else f"file://{target}"
    (repo.path / ".lfsconfig").write_text(f"[lfs]\n\turl = {url}\n")
    save_safetensors(repo.file("model.safetensors"), random_state_dict(1))
    repo.commit("with .lfsconfig")
    bare = make_repo("origin.git", init=False)
    bare.git("init", "-q", "--bare")
    repo.git("remote", "add", "origin", str(bare.path))
    proc = repo.theta("push", "origin", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ".lfsconfig" in errors[0] and "Traceback" not in proc.stderr
    assert not target.exists()
    # the user's own config may name a directory remote
    repo.git("config", "theta.remote.origin.url", str(target))
    repo.theta("push", "origin")
    assert any(target.rglob("*"))
