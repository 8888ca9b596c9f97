"""End to end: real git in a temporary repository, safetensors checkpoints, everyday workflows.

Every test checks both sides: what git stores is a manifest, the checked-out file is byte-identical,
and ``git status`` is clean.
"""

import json
import struct

import numpy as np
import pytest

from conftest import random_state_dict, save_safetensors

pytestmark = pytest.mark.e2e


def store_objects(repo):
    root = repo.path / ".git" / "theta" / "objects"
    return {p.name for p in root.glob("??/??/*")} if root.exists() else set()


def assert_manifest(repo, spec):
    stored = repo.show(spec)
    assert stored.startswith((b"git-theta manifest v1\n", b"git-theta manifest v2\n", b"git-theta manifest v3\n")), (
        stored[:80]
    )
    return stored.decode()


def test_quickstart_round_trip(repo):
    f = repo.file("model.safetensors")
    save_safetensors(f, random_state_dict(0), metadata={"step": "0"})
    v1 = f.read_bytes()
    repo.commit("base", "model.safetensors")
    state = random_state_dict(0)
    state["head.weight"] += 1
    save_safetensors(f, state, metadata={"step": "1000"})
    v2 = f.read_bytes()
    repo.commit("step 1000", "model.safetensors")
    manifest = assert_manifest(repo, "HEAD:model.safetensors")
    assert manifest.count("\ntensor ") == 4 and 'field metadata {"step":"1000"}' in manifest
    repo.git("checkout", "HEAD~1", "--", "model.safetensors")
    assert f.read_bytes() == v1
    repo.git("checkout", "HEAD", "--", "model.safetensors")
    assert f.read_bytes() == v2
    assert repo.status() == ""


def test_every_dtype_is_byte_identical(repo):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 3, generator=g)
    tensors = {
        "f64": base.double(),
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "e4m3": base.to(torch.float8_e4m3fn),
        "e5m2": base.to(torch.float8_e5m2),
        "c64": torch.complex(base, -base),
        "i64": torch.arange(7),
        "i32": torch.arange(7, dtype=torch.int32),
        "i16": torch.arange(7, dtype=torch.int16),
        "i8": torch.arange(-3, 4, dtype=torch.int8),
        "u8": torch.arange(7, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
    }
    if hasattr(torch, "float8_e8m0fnu"):
        tensors["e8m0"] = torch.tensor([1.0, 2.0, 0.5]).to(torch.float8_e8m0fnu)
    f = repo.file("all.safetensors")
    save_file(tensors, str(f), metadata={"format": "pt"})
    original = f.read_bytes()
    repo.commit("all dtypes", "all.safetensors")
    assert_manifest(repo, "HEAD:all.safetensors")
    f.unlink()
    repo.git("checkout", "--", "all.safetensors")
    assert f.read_bytes() == original
    assert repo.status() == ""


def write_raw_safetensors(path, tensors, order, pad=b" "):
    """A valid safetensors file the library would not write: our own tensor order and padding."""
    header, offset, body = {}, 0, b""
    for name in order:
        data = tensors[name]
        header[name] = {"dtype": "F32", "shape": [len(data) // 4], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        body += data
    raw = json.dumps(header, indent=1).encode()
    raw += pad * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def test_non_canonical_header_is_kept_byte_for_byte(repo):
    f = repo.file("odd.safetensors")
    tensors = {"b": np.ones(3, np.float32).tobytes(), "a": np.zeros(2, np.float32).tobytes()}
    write_raw_safetensors(f, tensors, ["b", "a"])
    original = f.read_bytes()
    repo.commit("odd", "odd.safetensors")
    assert "blob header" in assert_manifest(repo, "HEAD:odd.safetensors")
    f.unlink()
    repo.git("checkout", "--", "odd.safetensors")
    assert f.read_bytes() == original
    assert repo.status() == ""


def test_unchanged_tensors_cost_no_new_objects(repo):
    f = repo.file("model.safetensors")
    state = random_state_dict(1)
    save_safetensors(f, state)
    repo.commit("v1", "model.safetensors")
    before = store_objects(repo)
    state["layer.0.bias"] = state["layer.0.bias"] + 1
    save_safetensors(f, state)
    repo.commit("v2", "model.safetensors")
    assert len(store_objects(repo) - before) == 1
    # the same tensors in another file, another branch: nothing new either
    repo.git("checkout", "-q", "-b", "other")
    save_safetensors(repo.file("copy.safetensors"), state)
    before = store_objects(repo)
    repo.commit("copy", "copy.safetensors")
    assert store_objects(repo) == before


def test_branches_reset_stash_and_cherry_pick(repo):
    f = repo.file("model.safetensors")
    versions = {}
    save_safetensors(f, random_state_dict(2))
    versions["main"] = f.read_bytes()
    repo.commit("base", "model.safetensors")
    repo.git("checkout", "-q", "-b", "feature")
    save_safetensors(f, random_state_dict(3))
    versions["feature"] = f.read_bytes()
    feature = repo.commit("feature", "model.safetensors")
    repo.git("checkout", "-q", "main")
    assert f.read_bytes() == versions["main"]
    assert repo.status() == ""
    # reset --hard and checkout -- FILE restore the committed checkpoint
    f.write_bytes(b"garbage")
    repo.git("reset", "-q", "--hard")
    assert f.read_bytes() == versions["main"]
    save_safetensors(f, random_state_dict(4))
    repo.git("checkout", "--", "model.safetensors")
    assert f.read_bytes() == versions["main"]
    # stash keeps a work-in-progress checkpoint and gives it back
    save_safetensors(f, random_state_dict(5))
    wip = f.read_bytes()
    repo.git("stash", "-q")
    assert f.read_bytes() == versions["main"] and repo.status() == ""
    repo.git("stash", "pop", "-q")
    assert f.read_bytes() == wip
    repo.git("checkout", "--", "model.safetensors")
    # cherry-pick the feature's checkpoint change
    repo.git("cherry-pick", feature)
    assert f.read_bytes() == versions["feature"]
    assert_manifest(repo, "HEAD:model.safetensors")
    assert repo.status() == ""


def test_worktrees_share_the_object_store(repo, tmp_path):
    f = repo.file("model.safetensors")
    save_safetensors(f, random_state_dict(6))
    original = f.read_bytes()
    repo.commit("base", "model.safetensors")
    other = tmp_path / "wt"
    repo.git("worktree", "add", "-q", str(other), "-b", "wt")
    assert (other / "model.safetensors").read_bytes() == original
    assert not (other / ".git").is_dir()  # a worktree's .git is a file; objects stay in the common dir
    assert repo.run("git", "status", "--porcelain", cwd=other).stdout == ""


def test_touch_keeps_status_clean_and_the_manifest_unchanged(repo):
    f = repo.file("model.safetensors")
    save_safetensors(f, random_state_dict(7))
    repo.commit("base", "model.safetensors")
    stored = repo.show("HEAD:model.safetensors")
    f.touch()
    assert repo.status() == ""
    repo.git("add", "model.safetensors")
    assert repo.show(":model.safetensors") == stored


def test_stat_cache_never_hides_a_change_with_the_same_stat(repo):
    """Rewriting a file with other bytes but the same size and mtime is still seen."""
    import os

    f = repo.file("model.safetensors")
    state = random_state_dict(8)
    save_safetensors(f, state)
    repo.commit("base", "model.safetensors")
    st = os.stat(f)
    state["head.weight"][0, 0] += 1
    save_safetensors(f, state)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    repo.git("add", "model.safetensors")
    assert repo.show(":model.safetensors") != repo.show("HEAD:model.safetensors")


def test_single_shot_filters_work_without_the_process_filter(repo):
    repo.git("config", "--unset", "filter.theta.process")
    f = repo.file("model.safetensors")
    save_safetensors(f, random_state_dict(9))
    original = f.read_bytes()
    repo.commit("base", "model.safetensors")
    assert_manifest(repo, "HEAD:model.safetensors")
    f.unlink()
    repo.git("checkout", "--", "model.safetensors")
    assert f.read_bytes() == original


def test_clean_is_idempotent_on_a_manifest(repo):
    f = repo.file("model.safetensors")
    save_safetensors(f, random_state_dict(10))
    repo.commit("base", "model.safetensors")
    manifest = repo.show("HEAD:model.safetensors")
    out = repo.run("git-theta", "clean", "model.safetensors", input=manifest)
    assert out.stdout == manifest


def test_ls_files_reports_counts_and_sizes(repo):
    save_safetensors(repo.file("model.safetensors"), random_state_dict(11))
    repo.commit("base", "model.safetensors")
    listing = json.loads(repo.theta("ls-files", "HEAD", "--json").stdout)
    (row,) = listing["files"]
    assert row["path"] == "model.safetensors" and row["tensors"] == 4
    assert row["logical_bytes"] == (64 * 16 + 16 * 16 + 16 + 8 * 16) * 4
    assert 0 < row["stored_bytes"] and row["objects_local"] == row["objects"]
    assert "model.safetensors" in repo.theta("ls-files").stdout


def test_hugging_face_shards_store_a_moved_tensor_once(repo):
    state = random_state_dict(12)
    names = sorted(state)
    save_safetensors(repo.file("model-00001-of-00002.safetensors"), {n: state[n] for n in names[:2]})
    save_safetensors(repo.file("model-00002-of-00002.safetensors"), {n: state[n] for n in names[2:]})
    repo.commit("sharded")
    before = store_objects(repo)
    # re-shard: one tensor moves from shard 2 to shard 1
    save_safetensors(repo.file("model-00001-of-00002.safetensors"), {n: state[n] for n in names[:3]})
    save_safetensors(repo.file("model-00002-of-00002.safetensors"), {n: state[n] for n in names[3:]})
    repo.commit("resharded")
    assert store_objects(repo) == before
    assert repo.status() == ""
