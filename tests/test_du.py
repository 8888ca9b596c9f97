"""One meaning of "stored" (the bytes a version adds to the object store) in ls-files and
ls-files -v, and ``git theta du``: the store in total, reachable, unreachable and per file."""

import json

import numpy as np
from conftest import random_state_dict, save_safetensors

from git_theta.manifest import Manifest

MODEL = "model.safetensors"


def _ls(repo, *args):
    return {f["path"]: f for f in json.loads(repo.theta("ls-files", *args, "--json").stdout)["files"]}


def _refs(repo, spec):
    return {r.oid: r.size for r in Manifest.parse(repo.show(spec)).all_objects()}


def test_stored_is_what_a_version_adds(repo):
    repo.git("config", "theta.packThreshold", "0")  # one object per tensor: sizes compare exactly
    tensors = random_state_dict(1)
    save_safetensors(repo.file(MODEL), tensors)
    repo.commit("v1", MODEL)
    changed = dict(tensors)
    name = sorted(changed)[0]
    changed[name] = (changed[name] + np.float32(1)).astype(changed[name].dtype)
    save_safetensors(repo.file(MODEL), changed)
    repo.commit("v2", MODEL)

    v1, v2 = _refs(repo, f"HEAD~1:{MODEL}"), _refs(repo, f"HEAD:{MODEL}")
    new = {oid: size for oid, size in v2.items() if oid not in v1}
    assert len(new) == 1  # one tensor changed: one new object
    first, second = _ls(repo, "HEAD~1")[MODEL], _ls(repo, "HEAD")[MODEL]
    assert first["stored_bytes"] == sum(v1.values())  # the first version adds everything
    assert second["stored_bytes"] == sum(new.values())  # the second only its new object
    assert second["chain_bytes"] >= sum(v2.values()) - sum(size for oid, size in v2.items() if oid not in new)
    assert _ls(repo)[MODEL]["stored_bytes"] == 0  # the index holds what HEAD has: nothing added

    (verbose,) = json.loads(repo.theta("ls-files", "-v", "HEAD", "--json").stdout)["files"]
    rows = {r["name"]: r for r in verbose["tensor_list"]}
    assert rows[name]["stored_bytes"] == sum(new.values())
    assert all(r["stored_bytes"] == 0 for n, r in rows.items() if n != name)
    assert verbose["stored_bytes"] == second["stored_bytes"]
    text = repo.theta("ls-files", "HEAD").stdout.splitlines()
    assert text[0].split() == ["tensors", "logical", "stored", "chain", "local", "path"]

    # git theta log --stat: the same number per commit and file, without loading a tensor
    log = json.loads(repo.theta("log", "--stat", "--json").stdout)["commits"]
    assert [c["files"][0]["stored_bytes"] for c in log] == [second["stored_bytes"], first["stored_bytes"]]
    text = repo.theta("log", "--stat").stdout
    assert text.count("stored ") == 2


def test_du_splits_reachable_and_unreachable(repo):
    save_safetensors(repo.file(MODEL), random_state_dict(1))
    repo.commit("v1", MODEL)
    save_safetensors(repo.file("other.safetensors"), random_state_dict(2))
    repo.git("add", "other.safetensors")
    staged = _refs(repo, ":other.safetensors")
    repo.git("reset", "-q")  # unstaged: its objects are referenced by nothing now

    du = json.loads(repo.theta("du", "--json").stdout)
    assert du["total"]["objects"] == du["reachable"]["objects"] + du["unreachable"]["objects"]
    assert du["total"]["bytes"] == du["reachable"]["bytes"] + du["unreachable"]["bytes"]
    assert du["unreachable"]["objects"] == len(set(staged) - set(_refs(repo, f"HEAD:{MODEL}")))
    files = {f["path"]: f for f in du["files"]}
    assert set(files) == {MODEL} and files[MODEL]["objects"] == len(_refs(repo, f"HEAD:{MODEL}"))
    assert files[MODEL]["bytes"] == du["reachable"]["bytes"]

    repo.theta("prune", "--expire=now", "--include-unpushed")  # never pushed: kept by default
    after = json.loads(repo.theta("du", "--json").stdout)
    assert after["unreachable"] == {"objects": 0, "bytes": 0}
    assert after["reachable"] == du["reachable"]
    assert "unreachable" in repo.theta("du").stdout
