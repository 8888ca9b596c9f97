"""Crash safety: SIGKILL git-theta at every crash point of ``git add`` and checkout.

The test hook ``GIT_THETA_TEST_KILL_AT=N`` (git_theta/testhooks.py) makes the filter process kill
itself at its N-th crash point: after an object's temp file is written, after it is renamed into
place, after smudge hands a tensor to git. That is deterministic (no timing, no sleeps) and visits
every point. After each kill the repository must be consistent: every stored object hashes to its
name, the index only references objects that are present, the work-tree file is one whole version
(never a torn one), and running the command again succeeds.
"""

import hashlib
import os
import subprocess
import sys

import pytest

from conftest import random_state_dict, save_safetensors
from git_theta.manifest import Manifest, is_manifest

TENSORS = 4  # random_state_dict() has 4 tensors: 2 crash points each in clean, 1 each in smudge


def _store(repo):
    return repo.path / ".git" / "theta" / "objects"


def _assert_store_sound(repo):
    """Every object under a real name hashes to that name (temp files may be left in tmp/)."""
    root = _store(repo)
    count = 0
    for dirpath, _dirs, files in os.walk(root):
        if os.path.basename(dirpath) == "tmp":
            continue
        for name in files:
            data = open(os.path.join(dirpath, name), "rb").read()
            assert hashlib.sha256(data).hexdigest() == name, f"corrupt object under a real name: {name}"
            count += 1
    return count


def _assert_index_sound(repo, path="model.safetensors"):
    staged = repo.show(f":{path}")
    assert is_manifest(staged), "the index must hold a manifest, never the raw checkpoint"
    for ref in Manifest.parse(staged).all_objects():
        obj = _store(repo) / ref.oid[:2] / ref.oid[2:4] / ref.oid
        assert obj.is_file(), f"index references missing object {ref.oid}"
    return staged


def _killing(repo, n):
    env = dict(repo.env, GIT_THETA_TEST_KILL_AT=str(n), GIT_THETA_THREADS="1")
    return env


def _killed_at(repo, n, *command):
    """Run ``command`` with git-theta killed at crash point ``n``; it must have died there."""
    proc = subprocess.run(list(command), cwd=repo.path, env=_killing(repo, n), capture_output=True)
    assert proc.returncode != 0, f"{' '.join(command)}: kill point {n} was not reached"


def test_sigkill_during_git_add_at_every_crash_point(repo):
    repo.git("config", "theta.packThreshold", "0")  # loose objects, one per tensor (packs: test_packs.py)
    save_safetensors(repo.file("model.safetensors"), random_state_dict(0))
    repo.commit("v0", "model.safetensors")
    for n in range(1, 2 * TENSORS + 1):
        save_safetensors(repo.file("model.safetensors"), random_state_dict(n))
        before = repo.show(":model.safetensors")
        _killed_at(repo, n, "git", "add", "model.safetensors")
        _assert_store_sound(repo)
        assert _assert_index_sound(repo) == before  # the failed add left the index alone
        repo.git("add", "model.safetensors")  # running it again succeeds
        after = _assert_index_sound(repo)
        assert after != before
        repo.git("commit", "-q", "-m", f"v{n}")
        assert repo.status() == ""
    # beyond the last crash point the same command simply succeeds
    save_safetensors(repo.file("model.safetensors"), random_state_dict(99))
    proc = subprocess.run(
        ["git", "add", "model.safetensors"], cwd=repo.path, env=_killing(repo, 2 * TENSORS + 1), capture_output=True
    )
    assert proc.returncode == 0
    assert repo.theta("fsck", "--all").returncode == 0


@pytest.mark.parametrize("n", [1, TENSORS])  # the first and the last tensor
def test_sigkill_during_checkout_never_leaves_a_torn_file(repo, n, tmp_path):
    versions = {}
    for seed in (1, 2):
        save_safetensors(repo.file("model.safetensors"), random_state_dict(seed))
        versions[seed] = repo.file("model.safetensors").read_bytes()
        repo.commit(f"v{seed}", "model.safetensors")
    repo.git("tag", "v1", "HEAD~1")
    _killed_at(repo, n, "git", "checkout", "-q", "v1")
    _assert_store_sound(repo)
    _assert_index_sound(repo)
    path = repo.file("model.safetensors")
    if path.exists():
        assert path.read_bytes() in (versions[1], versions[2]), "a torn checkpoint under the real name"
    repo.git("checkout", "-q", "v1")  # running it again succeeds
    assert path.read_bytes() == versions[1]
    assert repo.status() == ""


@pytest.mark.parametrize("n", [1, TENSORS])  # the first and the last tensor
def test_sigkill_during_git_theta_checkout_leaves_old_or_new_file(repo, n):
    """'git theta checkout' writes a temp file and renames it: killed at any tensor, the path holds
    the old content (here the manifest a skip-smudge checkout left) or the whole new file."""
    save_safetensors(repo.file("model.safetensors"), random_state_dict(1))
    wanted = repo.file("model.safetensors").read_bytes()
    repo.commit("v1", "model.safetensors")
    repo.git("tag", "v1")
    save_safetensors(repo.file("model.safetensors"), random_state_dict(2))
    repo.commit("v2", "model.safetensors")
    repo.git("-c", "theta.skipSmudge=true", "checkout", "-q", "v1")
    path = repo.file("model.safetensors")
    old = path.read_bytes()
    assert is_manifest(old)
    _killed_at(repo, n, sys.executable, "-m", "git_theta", "checkout", "model.safetensors")
    assert path.read_bytes() in (old, wanted), "a torn checkpoint under the real name"
    assert repo.theta("checkout", "model.safetensors").returncode == 0  # running it again succeeds
    assert path.read_bytes() == wanted
    # the killed run's hidden temp file is gone (the next checkout of the path removes it)
    assert repo.status().strip() == ""


def test_a_checkout_keeps_the_temp_file_of_a_running_writer(repo):
    """Only temp files whose writer is dead are removed: a live pid's file may be mid-write."""
    save_safetensors(repo.file("model.safetensors"), random_state_dict(1))
    repo.commit("v1", "model.safetensors")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = repo.file(f".model.safetensors.theta-{dead.pid}-abc")
    live = repo.file(f".model.safetensors.theta-{os.getppid()}-def")
    other = repo.file(f".other.safetensors.theta-{dead.pid}-abc")
    for leftover in (stale, live, other):
        leftover.write_bytes(b"partial")
    repo.file("model.safetensors").unlink()
    assert repo.theta("checkout", "model.safetensors").returncode == 0
    assert not stale.exists()
    assert live.exists() and other.exists()


def test_two_processes_cleaning_the_same_checkpoint_into_one_store(repo):
    """Two single-shot cleans of the same big-ish checkpoint at once: both succeed, same manifest."""
    shapes = {f"layer.{i}.weight": (64, 64) for i in range(12)}
    save_safetensors(repo.file("model.safetensors"), random_state_dict(7, shapes))
    procs = []
    for _ in range(2):
        with open(repo.file("model.safetensors"), "rb") as stdin:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "git_theta", "clean", "model.safetensors"],
                    cwd=repo.path,
                    env=dict(repo.env, GIT_THETA_STAT_CACHE="false"),
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
    outputs = [p.communicate() for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err.decode()
    assert outputs[0][0] == outputs[1][0] and is_manifest(outputs[0][0])
    manifest = Manifest.parse(outputs[0][0])
    assert _assert_store_sound(repo) >= len(manifest.all_objects())
    repo.git("add", "model.safetensors")
    assert repo.show(":model.safetensors") == outputs[0][0]


def _store_files(root):
    return {p.name for p in root.rglob("*") if p.is_file() and p.parent.name != "tmp"} if root.exists() else set()


def test_sigkill_during_push_and_fetch(repo, make_repo):
    """Transfers write through the same temp-and-rename path: a kill leaves both stores sound."""
    repo.git("config", "theta.packThreshold", "0")  # loose objects, one per tensor (packs: test_packs.py)
    save_safetensors(repo.file("model.safetensors"), random_state_dict(3))
    repo.commit("v", "model.safetensors")
    bare = make_repo("origin.git", init=False)
    bare.git("init", "-q", "--bare")
    repo.git("remote", "add", "origin", str(bare.path))
    remote_store = bare.path / "theta" / "objects"
    wanted = {r.oid for r in Manifest.parse(repo.show("HEAD:model.safetensors")).all_objects()}
    for n in (1, 2 * TENSORS - 1):  # the first and a late crash point
        _killed_at(repo, n, "git", "theta", "push", "origin")
        for name in _store_files(remote_store):
            data = (remote_store / name[:2] / name[2:4] / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == name
    repo.theta("push", "origin")
    assert wanted <= _store_files(remote_store)
    local = _store(repo)
    for n in (1, 2 * TENSORS - 1):
        for path in [p for p in local.rglob("*") if p.is_file()]:
            path.unlink()
        _killed_at(repo, n, "git", "theta", "fetch", "origin")
        _assert_store_sound(repo)
        repo.theta("fetch", "origin")  # running it again succeeds
        assert wanted <= _store_files(local)
    assert repo.theta("fsck").returncode == 0


def _assert_all_index_stages_sound(repo):
    """Every manifest in the index (conflict stages included) references only present objects."""
    for line in repo.git("ls-files", "-s").stdout.splitlines():
        oid = line.split()[1]
        data = repo.show(oid)
        if is_manifest(data):
            for ref in Manifest.parse(data).all_objects():
                assert (_store(repo) / ref.oid[:2] / ref.oid[2:4] / ref.oid).is_file(), line


@pytest.mark.parametrize("n", [1, 3])
def test_sigkill_during_a_merge_driver_run(repo, n):
    """Both sides change the same tensors, so the driver stores merged tensors: kill it there."""
    import numpy as np

    base = random_state_dict(10)
    ours = {k: (v + np.float32(0.01)) if k.endswith("weight") else v for k, v in base.items()}
    theirs = {k: (v - np.float32(0.02)) if k.endswith("weight") else v for k, v in base.items()}
    save_safetensors(repo.file("model.safetensors"), base)
    repo.commit("base", "model.safetensors")
    repo.git("checkout", "-q", "-b", "theirs")
    save_safetensors(repo.file("model.safetensors"), theirs)
    repo.commit("theirs", "model.safetensors")
    repo.git("checkout", "-q", "main")
    save_safetensors(repo.file("model.safetensors"), ours)
    repo.commit("ours", "model.safetensors")
    repo.git("config", "theta.merge.operator", "linear")
    _killed_at(repo, n, "git", "merge", "--no-edit", "theirs")
    _assert_store_sound(repo)
    _assert_all_index_stages_sound(repo)
    repo.git("merge", "--abort")
    assert repo.status() == ""
    repo.git("merge", "-q", "--no-edit", "theirs")  # running it again succeeds
    _assert_index_sound(repo)
    assert repo.status() == "" and repo.theta("fsck").returncode == 0
