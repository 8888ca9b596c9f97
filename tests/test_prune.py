"""git theta prune: deletes exactly the unreachable, old, pushed-or-allowed objects, and nothing else."""

import json
import os
import time

import pytest

from conftest import random_state_dict, save_safetensors
from git_theta.updates import chain as codec
from git_theta.errors import ConfigError
from git_theta.manifest import Manifest
from git_theta.store.objects import ObjectStore
from git_theta.porcelain.prune import _delete, parse_expire
from git_theta.updates.base import TensorData


def _oids(repo, spec):
    return {ref.oid for ref in Manifest.parse(repo.show(spec)).all_objects()}


def _store_oids(repo):
    return set(ObjectStore(repo.path / ".git" / "theta" / "objects").iter_oids())


def _version(repo, seed, name="model.safetensors", commit=True):
    save_safetensors(repo.file(name), random_state_dict(seed))
    if commit:
        return repo.commit(f"v{seed}", name)
    repo.git("add", name)


def _prune(repo, *args, cwd=None):
    return json.loads(repo.theta("prune", "--json", *args, cwd=cwd).stdout)


def test_prune_deletes_only_what_nothing_references(repo, tmp_path):
    _version(repo, 1)
    _version(repo, 2)
    dropped = _version(repo, 3)
    dropped_oids = _oids(repo, f"{dropped}:model.safetensors") - _oids(repo, "HEAD~1:model.safetensors")
    repo.git("checkout", "-q", "-b", "side", "HEAD~2")
    _version(repo, 4)  # a branch
    repo.git("checkout", "-q", "main")
    repo.git("reset", "-q", "--hard", "HEAD~1")  # drop v3 from main...
    repo.git("reflog", "expire", "--expire=now", "--all")  # ...and from the reflog
    (repo.path / ".git" / "ORIG_HEAD").unlink()
    _version(repo, 5, commit=False)
    repo.git("stash", "-q")  # the stash
    repo.git("worktree", "add", "-q", str(tmp_path / "wt2"), "side")
    save_safetensors(tmp_path / "wt2" / "model.safetensors", random_state_dict(6))
    repo.git("add", "model.safetensors", cwd=tmp_path / "wt2")  # staged in the other worktree only
    keep = set()
    for spec in ("main", "main~1", "side", "stash@{0}"):
        keep |= _oids(repo, f"{spec}:model.safetensors")
    wt2_index = repo.run("git", "cat-file", "-p", ":model.safetensors", cwd=tmp_path / "wt2").stdout.encode()
    keep |= {r.oid for r in Manifest.parse(wt2_index).all_objects()}
    before = _store_oids(repo)
    assert dropped_oids and dropped_oids <= before and not dropped_oids & keep

    dry = _prune(repo, "--expire=now", "--include-unpushed", "--dry-run")
    assert set(dry["oids"]) == dropped_oids and _store_oids(repo) == before
    result = _prune(repo, "--expire=now", "--include-unpushed")
    assert set(result["oids"]) == dropped_oids
    assert result["deleted"] == len(dropped_oids) and result["bytes_freed"] > 0
    assert _store_oids(repo) == before - dropped_oids
    assert keep <= _store_oids(repo)
    assert json.loads(repo.theta("fsck", "--all", "--json").stdout)["ok"]
    # every remaining version still checks out byte for byte
    repo.git("checkout", "-q", "--detach", "side")
    assert repo.file("model.safetensors").read_bytes() == _bytes(tmp_path, 4)
    assert repo.status() == ""
    assert repo.theta("prune", "--expire=now", "--include-unpushed").stdout.startswith("deleted 0 object(s)")


def _bytes(tmp_path, seed):
    path = tmp_path / f"expected-{seed}.safetensors"
    save_safetensors(path, random_state_dict(seed))
    return path.read_bytes()


def test_prune_keeps_recent_and_unpushed_objects(repo):
    _version(repo, 1)
    dropped = _version(repo, 2)
    gone = _oids(repo, f"{dropped}:model.safetensors") - _oids(repo, "HEAD~1:model.safetensors")
    repo.git("reset", "-q", "--hard", "HEAD~1")
    repo.git("reflog", "expire", "--expire=now", "--all")
    (repo.path / ".git" / "ORIG_HEAD").unlink()
    before = _store_oids(repo)
    # default grace period: objects written a moment ago may belong to a running 'git add'
    result = _prune(repo, "--include-unpushed")
    assert result["deleted"] == 0 and result["kept_recent"] == len(gone)
    # unpushed objects are kept unless asked: nothing records what the remote has yet
    repo.git("config", "theta.pruneExpire", "now")
    result = _prune(repo)
    assert result["deleted"] == 0 and result["kept_unpushed"] == len(gone)
    assert _store_oids(repo) == before
    assert _prune(repo, "--all")["deleted"] == len(gone)


def test_prune_never_deletes_the_base_of_a_reachable_delta(repo):
    """Only the delta's manifest references the keyframe (listed in its chain): it must stay."""
    import numpy as np

    store = ObjectStore(repo.path / ".git" / "theta" / "objects")
    base_arr = np.arange(64, dtype=np.float32)
    new_arr = base_arr.copy()
    new_arr[3] += 1
    base = TensorData("w", "F32", (64,), base_arr.tobytes(), codec.tensor_digest(base_arr.tobytes()))
    new = TensorData("w", "F32", (64,), new_arr.tobytes(), codec.tensor_digest(new_arr.tobytes()))
    base_entry = codec.encode_tensor(store, base)
    entry = codec.encode_tensor(store, new, "int-delta", base, base_entry)
    assert entry is not None and len(entry.objects) == 2
    manifest = Manifest("safetensors", tensors={"w": entry})
    blob = repo.git("hash-object", "-w", "--stdin", input=manifest.serialize().decode()).stdout.strip()
    repo.git("update-index", "--add", "--cacheinfo", f"100644,{blob},delta.safetensors")
    repo.git("commit", "-q", "-m", "a delta")
    result = _prune(repo, "--expire=now", "--all")
    assert result["deleted"] == 0
    assert store.has(base_entry.objects[0].oid)
    assert codec.decode_tensor(store, entry) == new_arr.tobytes()


def test_prune_puts_back_an_object_freshened_while_it_was_moved(tmp_path):
    """The race with a concurrent writer: the re-check after the move sees the new mtime."""
    store = ObjectStore(tmp_path / "objects")
    ref = store.put_bytes(b"payload")
    path = store.path(ref.oid)
    old = time.time() - 7200
    os.utime(path, (old, old))
    cutoff = time.time() - 3600
    store.freshen(ref.oid)  # a writer reuses it after prune's scan
    assert _delete(path, tmp_path / "trash", ref.oid, cutoff) is False
    assert store.read(ref.oid, verify=True) == b"payload"
    assert list((tmp_path / "trash").iterdir()) == []
    # untouched, it goes
    os.utime(path, (old, old))
    assert _delete(path, tmp_path / "trash", ref.oid, cutoff) is True
    assert not store.has(ref.oid)
    # a writer that finds it gone stores its own copy instead of trusting the old one
    assert store.freshen(ref.oid) is False
    assert store.put_bytes(b"payload") == ref and store.has(ref.oid)


@pytest.mark.parametrize(
    "text,seconds", [("now", 0), ("never", None), ("90", 90), ("1.hour", 3600), ("2.weeks.ago", 1209600), ("30m", 1800)]
)
def test_parse_expire(text, seconds):
    assert parse_expire(text) == seconds


def test_parse_expire_rejects_garbage():
    with pytest.raises(ConfigError):
        parse_expire("soon")


def test_prune_and_fsck_follow_chunked_objects(repo):
    """With a tiny theta.maxObjectSize, tensors are stored as parts + a chunk index: the manifest
    names only the index, yet its parts are reachable, verified, and reported when missing."""
    repo.git("config", "theta.packThreshold", "0")  # loose objects, one per tensor (packs: test_packs.py)
    repo.git("config", "theta.maxObjectSize", "1024")
    _version(repo, 1)
    store = ObjectStore(repo.path / ".git" / "theta" / "objects")
    named = _oids(repo, "HEAD:model.safetensors")
    parts = {
        ref.oid
        for ref in store.chunk_parts([r for r in Manifest.parse(repo.show("HEAD:model.safetensors")).all_objects()])
    }
    assert parts and not parts & named
    assert _prune(repo, "--expire=now", "--all")["deleted"] == 0
    assert parts | named <= _store_oids(repo)
    report = json.loads(repo.theta("fsck", "--json").stdout)
    assert report["ok"] and report["objects"] == len(named | parts)
    victim = sorted(parts)[0]
    store.path(victim).unlink()
    proc = repo.theta("fsck", "--json", check=False)
    [problem] = json.loads(proc.stdout)["problems"]
    assert proc.returncode == 1 and problem["kind"] == "missing" and problem["oid"] == victim
    assert problem["index"] in named and problem["path"] == "model.safetensors"


def test_prune_deletes_unreachable_objects_only_once_pushed(repo, make_repo):
    bare = make_repo("origin.git", init=False)
    bare.git("init", "-q", "--bare")
    repo.git("remote", "add", "origin", str(bare.path))
    _version(repo, 1)
    pushed = _version(repo, 2)
    repo.git("push", "-q", "origin", "main")
    local = _version(repo, 3)
    pushed_only = _oids(repo, f"{pushed}:model.safetensors") - _oids(repo, "HEAD~2:model.safetensors")
    local_only = _oids(repo, f"{local}:model.safetensors") - _oids(repo, f"{pushed}:model.safetensors")
    repo.git("reset", "-q", "--hard", "HEAD~2")
    repo.git("update-ref", "-d", "refs/remotes/origin/main")  # v2 now only on the server
    repo.git("reflog", "expire", "--expire=now", "--all")
    (repo.path / ".git" / "ORIG_HEAD").unlink()
    result = _prune(repo, "--expire=now")
    assert set(result["oids"]) == pushed_only  # the server has them: safe to drop here
    assert result["kept_unpushed"] == len(local_only) and local_only <= _store_oids(repo)


def test_prune_keeps_the_old_parts_of_a_recent_chunked_object(repo):
    repo.git("config", "theta.packThreshold", "0")  # loose objects, one per tensor (packs: test_packs.py)
    repo.git("config", "theta.maxObjectSize", "1024")
    store = ObjectStore(repo.path / ".git" / "theta" / "objects")
    _version(repo, 1)
    dropped = _version(repo, 2)
    manifest = Manifest.parse(repo.show(f"{dropped}:model.safetensors"))
    dropped_objects = [r for r in manifest.all_objects() if r.oid not in _oids(repo, "HEAD~1:model.safetensors")]
    parts = {ref.oid for ref in store.chunk_parts(dropped_objects)}
    assert parts
    repo.git("reset", "-q", "--hard", "HEAD~1")
    repo.git("reflog", "expire", "--expire=now", "--all")
    (repo.path / ".git" / "ORIG_HEAD").unlink()
    old = time.time() - 7200
    for oid in parts:  # the parts look old, the objects naming them were just written
        os.utime(store.path(oid), (old, old))
    result = _prune(repo, "--all")
    assert result["deleted"] == 0 and parts <= _store_oids(repo)
    assert len(_prune(repo, "--all", "--expire=now")["oids"]) == len(parts) + len(dropped_objects)


def test_prune_keeps_what_a_moved_worktree_stages(repo, tmp_path):
    """Issue 13: a checkpoint staged in a linked worktree whose folder was then moved (no
    'git worktree repair') stays referenced by that worktree's index; prune must not delete it."""
    _version(repo, 1)
    repo.git("worktree", "add", "-q", "-b", "side", str(tmp_path / "wt2"))
    save_safetensors(tmp_path / "wt2" / "model.safetensors", random_state_dict(7))
    repo.git("add", "model.safetensors", cwd=tmp_path / "wt2")
    staged = repo.run("git", "cat-file", "-p", ":model.safetensors", cwd=tmp_path / "wt2").stdout.encode()
    staged_oids = {r.oid for r in Manifest.parse(staged).all_objects()}
    (tmp_path / "wt2").rename(tmp_path / "moved")

    _prune(repo, "--expire=now", "--include-unpushed")
    assert staged_oids <= _store_oids(repo)
    # the moved worktree's next commit references objects that are all still there
    repo.run("git", "worktree", "repair", str(tmp_path / "moved"))
    repo.run("git", "commit", "-q", "-m", "staged", cwd=tmp_path / "moved")
    assert json.loads(repo.theta("fsck", "--all", "--json").stdout)["ok"]


def test_prune_keeps_everything_when_a_worktree_index_is_unreadable(repo, tmp_path):
    _version(repo, 1)
    dropped = _version(repo, 2)
    repo.git("reset", "-q", "--hard", "HEAD~1")  # v2 is referenced by nothing any more
    repo.git("reflog", "expire", "--expire=now", "--all")
    (repo.path / ".git" / "ORIG_HEAD").unlink()
    unreachable = _oids(repo, f"{dropped}:model.safetensors") - _oids(repo, "HEAD:model.safetensors")
    assert unreachable
    repo.git("worktree", "add", "-q", "-b", "side", str(tmp_path / "wt2"))
    index = repo.path / ".git" / "worktrees" / "wt2" / "index"
    index.write_bytes(b"DIRC garbage, not an index")
    before = _store_oids(repo)
    result = _prune(repo, "--expire=now", "--include-unpushed")
    assert result["deleted"] == 0 and "wt2" in result["kept_all"]
    assert _store_oids(repo) == before
    text = repo.theta("prune", "--expire=now", "--include-unpushed")
    assert "kept all" in text.stderr and "cannot read the index" in text.stderr and "hint:" in text.stderr
