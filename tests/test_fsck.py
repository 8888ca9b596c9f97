"""git theta fsck: finds missing, corrupt and undecodable objects everywhere history can reach."""

import json

import numpy as np

from conftest import random_state_dict, save_safetensors
from git_theta.manifest import Manifest


def _objects(repo, spec):
    return {ref.oid: ref for ref in Manifest.parse(repo.show(spec)).all_objects()}


def _object_path(repo, oid):
    return repo.path / ".git" / "theta" / "objects" / oid[:2] / oid[2:4] / oid


def _fsck(repo, *args):
    proc = repo.theta("fsck", "--json", *args, check=False)
    return proc.returncode, json.loads(proc.stdout)


def _commit_version(repo, seed, name="model.safetensors"):
    save_safetensors(repo.file(name), random_state_dict(seed))
    return repo.commit(f"v{seed}", name)


def test_fsck_clean_repository_is_ok(repo):
    _commit_version(repo, 1)
    _commit_version(repo, 2)
    code, report = _fsck(repo, "--all")
    assert code == 0 and report["ok"] and report["problems"] == []
    assert report["manifests"] == 2
    assert report["tensors"] == 8  # 4 tensors x 2 versions, all different
    assert report["objects"] == len(
        _objects(repo, "HEAD:model.safetensors") | _objects(repo, "HEAD~1:model.safetensors")
    )
    assert repo.status() == ""


def test_fsck_reports_missing_and_corrupt_objects_with_file_tensor_commit(repo):
    repo.git("config", "theta.packThreshold", "0")  # loose objects, one per tensor (packs: test_packs.py)
    old = _commit_version(repo, 1)
    _commit_version(repo, 2)
    manifest = Manifest.parse(repo.show(f"{old}:model.safetensors"))
    missing = manifest.tensors["head.weight"].objects[0].oid
    corrupt = manifest.tensors["embed.weight"].objects[0].oid
    _object_path(repo, missing).unlink()
    path = _object_path(repo, corrupt)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))

    # HEAD and the index do not use the old version: the default check passes...
    assert _fsck(repo)[0] == 0
    # ...a full check finds both problems, each named precisely.
    code, report = _fsck(repo, "--all")
    assert code == 1 and not report["ok"]
    by_oid = {p["oid"]: p for p in report["problems"]}
    assert set(by_oid) == {missing, corrupt}
    assert by_oid[missing]["kind"] == "missing" and by_oid[missing]["tensor"] == "head.weight"
    assert by_oid[corrupt]["kind"] == "corrupt" and by_oid[corrupt]["tensor"] == "embed.weight"
    for problem in by_oid.values():
        assert problem["path"] == "model.safetensors" and problem["commit"] == old
    text = repo.theta("fsck", "--all", check=False)
    assert text.returncode == 1
    assert f"missing: model.safetensors: tensor 'head.weight' (commit {old[:12]})" in text.stdout
    assert "fsck --repair" in text.stderr


def test_fsck_decodes_tensors_against_their_digest(repo, tmp_path):
    """A manifest whose objects are intact but whose digest lies is caught by decoding."""
    repo.git("config", "theta.packThreshold", "0")  # a raw object's id is its digest: it cannot lie
    _commit_version(repo, 1)
    text = repo.show("HEAD:model.safetensors").decode()
    manifest = Manifest.parse(text.encode())
    entry = manifest.tensors["layer.0.bias"]
    tampered = text.replace(entry.digest, "0" * 64)
    blob = repo.git("hash-object", "-w", "--stdin", input=tampered).stdout.strip()
    repo.git("update-index", "--cacheinfo", f"100644,{blob},model.safetensors")
    code, report = _fsck(repo)
    assert code == 1
    [problem] = report["problems"]
    assert problem["kind"] == "bad-tensor" and problem["tensor"] == "layer.0.bias"
    assert problem["where"] == "index" and problem["oid"] == entry.objects[0].oid
    assert "digest" in problem["message"]


def test_fsck_all_covers_stash_reflog_and_bad_manifests(repo):
    _commit_version(repo, 1)
    save_safetensors(repo.file("model.safetensors"), random_state_dict(5))
    repo.git("stash", "-q")
    stashed = _objects(repo, "stash@{0}:model.safetensors")
    gone = next(iter(set(stashed) - set(_objects(repo, "HEAD:model.safetensors"))))
    _object_path(repo, gone).unlink()
    # a truncated manifest on a branch of its own
    repo.git("checkout", "-q", "-b", "broken")
    blob = repo.git(
        "hash-object", "-w", "--stdin", input="git-theta manifest v1\nformat safetensors\ntensor x"
    ).stdout.strip()
    repo.git("update-index", "--add", "--cacheinfo", f"100644,{blob},other.safetensors")
    repo.git("commit", "-q", "-m", "broken manifest")
    repo.git("checkout", "-q", "main")
    assert _fsck(repo)[0] == 0
    code, report = _fsck(repo, "--all")
    kinds = {p["kind"]: p for p in report["problems"]}
    assert code == 1 and set(kinds) == {"missing", "bad-manifest"}
    assert kinds["missing"]["oid"] == gone
    assert kinds["bad-manifest"]["path"] == "other.safetensors" and "truncated" in kinds["bad-manifest"]["message"]


def test_fsck_repair_without_a_remote_is_one_clear_error(repo):
    _commit_version(repo, 1)
    oid = next(iter(_objects(repo, "HEAD:model.safetensors")))
    _object_path(repo, oid).unlink()
    proc = repo.theta("fsck", "--repair", check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("error:") == 1 and "remote" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fsck_shared_objects_are_checked_once(repo):
    tensors = random_state_dict(3)
    save_safetensors(repo.file("a.safetensors"), tensors)
    save_safetensors(repo.file("b.safetensors"), tensors)
    repo.commit("same tensors twice")
    code, report = _fsck(repo, "--all")
    assert code == 0 and report["tensors"] == 4 and report["manifests"] == 1  # identical manifests: one blob
    assert np.array_equal(
        np.frombuffer(repo.file("a.safetensors").read_bytes(), np.uint8),
        np.frombuffer(repo.file("b.safetensors").read_bytes(), np.uint8),
    )


def test_fsck_repair_fetches_bad_objects_from_the_remote(repo, make_repo):
    repo.git("config", "theta.packThreshold", "0")  # loose objects, one per tensor (packs: test_packs.py)
    _commit_version(repo, 1)
    bare = make_repo("origin.git", init=False)
    bare.git("init", "-q", "--bare")
    repo.git("remote", "add", "origin", str(bare.path))
    repo.git("push", "-q", "origin", "main")  # the pre-push hook uploads the objects
    oids = sorted(_objects(repo, "HEAD:model.safetensors"))
    _object_path(repo, oids[0]).unlink()
    path = _object_path(repo, oids[1])
    path.write_bytes(path.read_bytes()[:-1])
    code, report = _fsck(repo, "--repair")
    assert code == 0 and report["ok"] and sorted(report["repaired"]) == oids[:2]
    assert (repo.path / ".git" / "theta" / "quarantine" / oids[1]).is_file()  # the damaged copy, set aside
    assert _fsck(repo)[0] == 0
