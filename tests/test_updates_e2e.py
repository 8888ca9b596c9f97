"""End to end: changed tensors stored as deltas through real git (clean, smudge, rebase, cherry-pick,
forced and user-supplied updates, corrupt chains, ls-files -v)."""

import json
import random

import numpy as np

from git_theta.manifest import Manifest

from conftest import save_safetensors

NAME = "model.safetensors"


def base_model(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "attn.weight": (rng.standard_normal((96, 48)) * 0.05).astype(np.float32),
        "mlp.weight": (rng.standard_normal((320, 256)) * 0.05).astype(np.float32),  # > sample size
        "mlp.bias": (rng.standard_normal(256) * 0.01).astype(np.float32),
        "head.weight": (rng.standard_normal((16, 40)) * 0.05).astype(np.float32).astype(np.float16),
        "step": np.array(0, dtype=np.int64),
    }


def manifest(repo, spec=f"HEAD:{NAME}"):
    data = repo.show(spec)
    assert data.startswith((b"git-theta manifest v1\n", b"git-theta manifest v2\n", b"git-theta manifest v3\n"))
    return Manifest.parse(data)


def sparse_change(model, rng, fraction=0.01):
    out = {k: v.copy() for k, v in model.items()}
    for key in ("mlp.weight", "attn.weight"):
        flat = out[key].reshape(-1)
        idx = rng.choice(flat.size, max(1, int(flat.size * fraction)), replace=False)
        flat[idx] += rng.standard_normal(idx.size).astype(np.float32) * 0.01
    return out


def low_rank_change(model, rng):
    out = {k: v.copy() for k, v in model.items()}
    w = out["attn.weight"]
    out["attn.weight"] = (w + rng.standard_normal((96, 2)) @ rng.standard_normal((2, 48)) * 0.01).astype(np.float32)
    return out


def small_steps(model, rng):
    out = {k: v.copy() for k, v in model.items()}
    for key in ("mlp.weight", "mlp.bias", "attn.weight"):
        out[key] = (out[key] * (1 + 1e-4 * rng.standard_normal(out[key].shape))).astype(np.float32)
    out["head.weight"] = (out["head.weight"] + np.float16(0.001)).astype(np.float16)
    out["step"] = np.array(out["step"] + 1, dtype=np.int64)
    return out


def special_values(model, rng):
    out = {k: v.copy() for k, v in model.items()}
    bits = out["mlp.bias"].view(np.uint32)
    bits[0] = 0x7FC0BEEF  # NaN with a payload
    bits[1] = 0x80000000  # -0.0
    bits[2] = 0xFF800000  # -inf
    return out


def write(repo, model):
    save_safetensors(repo.file(NAME), model)
    return repo.file(NAME).read_bytes()


def manifests(repo, specs):
    """Parsed manifests of many ``REV:PATH`` specs with one ``git cat-file --batch``."""
    out = repo.run("git", "cat-file", "--batch", input="".join(f"{s}\n" for s in specs).encode()).stdout
    result, pos = [], 0
    for _ in specs:
        header_end = out.index(b"\n", pos)
        size = int(out[pos:header_end].split()[2])
        data = out[header_end + 1 : header_end + 1 + size]
        assert data.startswith((b"git-theta manifest v1\n", b"git-theta manifest v2\n", b"git-theta manifest v3\n"))
        result.append(Manifest.parse(data))
        pos = header_end + 1 + size + 1
    return result


def side_loaded_change(model, rng, path):
    """attn.weight += R @ C and mlp.bias *= ia3, with the side-load file describing it."""
    r = rng.standard_normal((96, 2)).astype(np.float32)
    c = (rng.standard_normal((2, 48)) * 0.01).astype(np.float32)
    ia3 = (1 + 0.01 * rng.standard_normal(256)).astype(np.float32)
    save_safetensors(path, {"attn.weight/R": r, "attn.weight/C": c, "mlp.bias/ia3": ia3})
    out = dict(model)
    out["attn.weight"] = (model["attn.weight"] + r @ c).astype(np.float32)
    out["mlp.bias"] = (model["mlp.bias"] * ia3).astype(np.float32)
    return out


def test_chain_of_ten_versions_checked_out_in_random_order(repo, tmp_path):
    """Ten versions mixing every update type (automatic, forced, side-loaded), depth bounded."""
    repo.git("config", "theta.maxChainDepth", "3")
    repo.git("config", "theta.keyframePercent", "1000")  # the chain rules here, not the cost rule (test_keyframes.py)
    repo.git("config", "theta.maxChainPercent", "100000")  # nor the bound on a chain's bytes
    rng = np.random.default_rng(7)
    model = base_model()
    side_file = tmp_path / "update.safetensors"
    steps = [
        None,
        sparse_change,
        low_rank_change,
        small_steps,
        special_values,
        "side-load",
        small_steps,
        sparse_change,
        "forced",
        sparse_change,
    ]
    expected = []
    for i, step in enumerate(steps):
        if step == "forced":
            model = small_steps(model, rng)
        elif step == "side-load":
            model = side_loaded_change(model, rng, side_file)
        elif step is not None:
            model = step(model, rng)
        expected.append(write(repo, model))
        if step == "forced":
            repo.theta("add", NAME, "--update-type", "sparse")
        elif step == "side-load":
            repo.theta("add", NAME, "--update-data", str(side_file))
        else:
            repo.git("add", NAME)
        repo.git("commit", "-q", "-m", f"v{i}")
    revs = repo.git("rev-list", "--reverse", "HEAD").stdout.split()[1:]  # skip the .gitattributes commit
    assert len(revs) == 10
    found = manifests(repo, [f"{rev}:{NAME}" for rev in revs])
    updates = {e.update for m in found for e in m.tensors.values()}
    assert {"dense", "sparse", "int-delta", "low-rank", "ia3"} <= updates
    assert max(e.chain_depth for m in found for e in m.tensors.values()) == 3  # then a keyframe
    # the forced version: sparse except where the depth limit asked for a keyframe
    assert {e.update for n, e in found[8].tensors.items() if n != "step" and e.chain_depth} == {"sparse"}
    assert found[1].tensors["mlp.weight"].update == "sparse"
    assert found[1].tensors["mlp.weight"].objects[0].size < 0.05 * found[0].tensors["mlp.weight"].objects[0].size
    assert found[2].tensors["attn.weight"].update == "low-rank"

    order = list(range(len(revs)))
    random.Random(11).shuffle(order)
    for i in order:
        repo.git("checkout", "-q", revs[i])
        assert repo.file(NAME).read_bytes() == expected[i], f"version {i}"
    assert repo.status() == ""


def test_rebase_and_cherry_pick_keep_deltas_valid(repo):
    rng = np.random.default_rng(1)
    model = base_model()
    write(repo, model)
    repo.commit("v0", NAME)
    repo.git("checkout", "-q", "-b", "feature")
    v1 = write(repo, sparse_change(model, rng))
    repo.commit("v1 sparse", NAME)
    delta_commit = repo.git("rev-parse", "HEAD").stdout.strip()
    before = repo.show(f"HEAD:{NAME}")
    assert manifest(repo).tensors["mlp.weight"].update == "sparse"
    repo.git("checkout", "-q", "main")
    repo.file("notes.txt").write_text("unrelated\n")
    repo.commit("notes", "notes.txt")
    repo.git("branch", "pick", "main")
    # rebase: the delta names its base by digest, so the rewritten commit keeps the same manifest
    repo.git("checkout", "-q", "feature")
    repo.git("rebase", "-q", "main")
    assert repo.show(f"HEAD:{NAME}") == before
    assert repo.file("notes.txt").exists() and repo.file(NAME).read_bytes() == v1
    assert repo.status() == ""
    # cherry-pick onto another branch
    repo.git("checkout", "-q", "pick")
    repo.git("cherry-pick", delta_commit)
    assert repo.show(f"HEAD:{NAME}") == before
    repo.file(NAME).unlink()
    repo.git("checkout", "--", NAME)
    assert repo.file(NAME).read_bytes() == v1
    assert repo.status() == ""


def test_forced_update_types_and_base(repo):
    repo.git("config", "theta.maxChainPercent", "100000")  # deltas even where a keyframe is as cheap to read
    rng = np.random.default_rng(2)
    model = base_model()
    write(repo, model)
    repo.commit("v0", NAME)
    changed = small_steps(model, rng)
    expected = write(repo, changed)
    repo.git("add", NAME)  # automatic choice first: small steps everywhere -> int-delta
    assert manifest(repo, f":{NAME}").tensors["mlp.weight"].update == "int-delta"
    # forcing re-encodes the version already in the index, against HEAD's
    repo.theta("add", NAME, "--update-type", "sparse")
    m = manifest(repo, f":{NAME}")
    assert m.tensors["mlp.weight"].update == "sparse" and m.tensors["mlp.weight"].chain_depth == 1
    repo.theta("add", NAME, "--update-type", "low-rank")  # not low rank: falls back to the automatic choice
    m = manifest(repo, f":{NAME}")
    assert m.tensors["mlp.bias"].update == "int-delta"
    repo.git("commit", "-q", "-m", "v1")
    # a new file stored as a delta of another path's version
    save_safetensors(repo.file("copy.safetensors"), sparse_change(changed, rng))
    repo.theta("add", "copy.safetensors", "--base", f"HEAD:{NAME}")
    copy = manifest(repo, ":copy.safetensors")
    assert copy.tensors["mlp.weight"].update == "sparse"
    repo.git("commit", "-q", "-m", "copy")
    for path in (NAME, "copy.safetensors"):
        data = repo.file(path).read_bytes()
        repo.file(path).unlink()
        repo.git("checkout", "--", path)
        assert repo.file(path).read_bytes() == data
    assert repo.file(NAME).read_bytes() == expected
    assert repo.status() == ""
    bad = repo.theta("add", NAME, "--update-type", "no-such-type", check=False)
    assert bad.returncode != 0 and "no-such-type" in bad.stderr


def peft_adapter(tmp_path, model, rng, alpha=8, rank=4):
    a = (rng.standard_normal((rank, 48)) * 0.1).astype(np.float32)
    b = (rng.standard_normal((96, rank)) * 0.1).astype(np.float32)
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    save_safetensors(
        folder / "adapter_model.safetensors",
        {"base_model.model.attn.lora_A.weight": a, "base_model.model.attn.lora_B.weight": b},
    )
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": alpha, "peft_type": "LORA"}))
    merged = dict(model)
    # merged the way PEFT does it, in float32: W + (B @ A) * scale
    merged["attn.weight"] = model["attn.weight"] + (b @ a) * np.float32(alpha / rank)
    return folder / "adapter_model.safetensors", merged


def test_peft_adapter_stored_exactly_and_wrong_adapter_rejected(repo, tmp_path):
    rng = np.random.default_rng(3)
    model = base_model()
    write(repo, model)
    repo.commit("v0", NAME)
    adapter, merged = peft_adapter(tmp_path, model, rng)
    expected = write(repo, merged)
    repo.theta("add", NAME, "--update-type", "low-rank", "--update-path", str(adapter))
    entry = manifest(repo, f":{NAME}").tensors["attn.weight"]
    assert entry.update == "low-rank" and entry.chain_depth == 1
    repo.git("commit", "-q", "-m", "merged lora")
    repo.file(NAME).unlink()
    repo.git("checkout", "--", NAME)
    assert repo.file(NAME).read_bytes() == expected
    # wrong scaling: the adapter does not explain the change -> error naming the tensor, index untouched
    (adapter.parent / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 32}))
    other = dict(merged)
    other["attn.weight"] = merged["attn.weight"] + np.float32(0.5)
    write(repo, other)
    index_before = repo.show(f":{NAME}")
    bad = repo.theta("add", NAME, "--update-path", str(adapter), check=False)
    assert bad.returncode != 0
    assert "attn.weight" in bad.stderr and "does not explain" in bad.stderr
    assert repo.show(f":{NAME}") == index_before


def test_old_side_load_names(repo, tmp_path):
    """<param>/R|C, <param>/data|indices|indptr|shape and <param>/ia3 via --update-data."""
    rng = np.random.default_rng(4)
    model = base_model()
    write(repo, model)
    repo.commit("v0", NAME)
    r = rng.standard_normal((96, 2)).astype(np.float32)
    c = (rng.standard_normal((2, 48)) * 0.01).astype(np.float32)
    positions = np.sort(rng.choice(320 * 256, 50, replace=False)).astype(np.int32)
    values = (rng.standard_normal(50) * 0.01).astype(np.float32)
    ia3 = (1 + 0.01 * rng.standard_normal(256)).astype(np.float32)
    side = {
        "attn.weight/R": r,
        "attn.weight/C": c,
        "mlp.weight/data": values,
        "mlp.weight/indices": positions,
        "mlp.weight/indptr": np.array([0, 50], dtype=np.int32),
        "mlp.weight/shape": np.array([320, 256], dtype=np.int64),
        "mlp.bias/ia3": ia3,
    }
    save_safetensors(tmp_path / "update.safetensors", side)
    new = {k: v.copy() for k, v in model.items()}
    new["attn.weight"] = (model["attn.weight"] + r @ c).astype(np.float32)
    new["mlp.weight"].reshape(-1)[positions] += values
    new["mlp.bias"] = (model["mlp.bias"] * ia3).astype(np.float32)
    expected = write(repo, new)
    repo.theta("add", NAME, "--update-data", str(tmp_path / "update.safetensors"))
    m = manifest(repo, f":{NAME}")
    assert (m.tensors["attn.weight"].update, m.tensors["mlp.weight"].update, m.tensors["mlp.bias"].update) == (
        "low-rank",
        "sparse",
        "ia3",
    )
    repo.git("commit", "-q", "-m", "side-loaded")
    repo.file(NAME).unlink()
    repo.git("checkout", "--", NAME)
    assert repo.file(NAME).read_bytes() == expected
    assert repo.status() == ""


def test_ls_files_verbose_then_corrupt_base_object_names_tensor_and_chain(repo):
    repo.git("config", "theta.packThreshold", "0")  # loose objects: the test corrupts one file
    rng = np.random.default_rng(5)
    model = base_model()
    write(repo, model)
    repo.commit("v0", NAME)
    write(repo, sparse_change(model, rng))
    repo.commit("v1", NAME)
    m = manifest(repo)
    entry = m.tensors["mlp.weight"]
    assert entry.chain_depth == 1

    # ls-files -v: a line per tensor, a summary per file, the same in JSON
    # (of HEAD: "stored" is what a version added, and the index adds nothing to HEAD)
    lines = repo.theta("ls-files", "-v", "HEAD").stdout.strip().splitlines()
    assert any(x.split()[:2] == ["sparse", "1"] and x.endswith("mlp.weight") for x in lines)
    assert lines[-1].startswith(f"{NAME}: 5 tensors") and "max chain depth 1" in lines[-1]
    (f,) = json.loads(repo.theta("ls-files", "-v", "HEAD", "--json").stdout)["files"]
    rows = {r["name"]: r for r in f["tensor_list"]}
    assert rows["mlp.weight"]["update"] == "sparse" and rows["mlp.weight"]["depth"] == 1
    assert rows["mlp.weight"]["stored_bytes"] == entry.objects[0].size
    assert rows["step"]["update"] in ("dense", "raw") and f["stored_bytes"] == sum(
        r["stored_bytes"] for r in rows.values()
    )

    # flip bits in the keyframe the delta applies to: checkout names the tensor, chain and object
    keyframe = entry.objects[-1].oid
    obj = repo.path / ".git" / "theta" / "objects" / keyframe[:2] / keyframe[2:4] / keyframe
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[-100] ^= 0xFF
    obj.write_bytes(bytes(data))
    repo.file(NAME).unlink()
    result = repo.git("checkout", "--", NAME, check=False)
    assert result.returncode != 0
    assert "mlp.weight" in result.stderr and keyframe in result.stderr
    assert "keyframe of chain" in result.stderr and "breaks 1 delta" in result.stderr


def test_whole_tensor_deltas_are_taken_against_the_keyframe(repo):
    """A chain stacks theta.maxFullDeltas whole-tensor deltas; cheap sparse ones still stack on top.

    So a checkout decodes a keyframe plus one full delta however many fine-tune steps were
    committed, and every version still checks out byte for byte.
    """
    repo.git("config", "theta.keyframePercent", "1000")  # the chain rules here, not the cost rule (test_keyframes.py)
    repo.git("config", "theta.maxChainPercent", "100000")  # nor the bound on a chain's bytes
    rng = np.random.default_rng(21)
    model = base_model()
    steps = [None, small_steps, small_steps, sparse_change, small_steps, small_steps]
    expected = []
    for i, step in enumerate(steps):
        if step is not None:
            model = step(model, rng)
        expected.append(write(repo, model))
        repo.git("add", NAME)
        repo.git("commit", "-q", "-m", f"v{i}")
    revs = repo.git("rev-list", "--reverse", "HEAD").stdout.split()[1:]
    found = manifests(repo, [f"{rev}:{NAME}" for rev in revs])
    keyframe = found[0].tensors["mlp.weight"].objects[-1]
    chains = [m.tensors["mlp.weight"] for m in found]
    assert [e.update for e in chains] == ["dense", "int-delta", "int-delta", "sparse", "int-delta", "int-delta"]
    assert [e.chain_depth for e in chains] == [0, 1, 1, 2, 1, 1]  # v3: sparse on v2's full delta
    assert all(e.objects[-1] == keyframe for e in chains)
    assert chains[2].objects[1:] == chains[0].objects  # v2 is a delta of v0, not of v1
    for i, rev in enumerate(revs):
        repo.git("checkout", "-q", rev)
        assert repo.file(NAME).read_bytes() == expected[i], f"version {i}"

    repo.git("checkout", "-q", "-")
    repo.git("checkout", "-q", revs[-1])
    repo.git("config", "theta.maxFullDeltas", "3")
    for _ in range(3):
        model = small_steps(model, rng)
        write(repo, model)
        repo.git("add", NAME)
        repo.git("commit", "-q", "-m", "more")
    depths = [m.tensors["mlp.weight"].chain_depth for m in manifests(repo, [f"HEAD~{k}:{NAME}" for k in (2, 1, 0)])]
    assert depths == [2, 3, 1]  # three full deltas stacked, then back to the keyframe


def test_forced_types_on_a_full_chain(repo):
    """On a chain full of whole-tensor deltas a forced sparse change stacks on the parent, a forced
    int-delta goes to the keyframe; both check out exactly."""
    repo.git("config", "theta.keyframePercent", "1000")  # the chain rules here, not the cost rule (test_keyframes.py)
    repo.git("config", "theta.maxChainPercent", "100000")  # nor the bound on a chain's bytes
    rng = np.random.default_rng(5)
    model = base_model()
    expected = []
    for i, (step, forced) in enumerate(
        [(None, None), (small_steps, None), (small_steps, "sparse"), (small_steps, "int-delta")]
    ):
        if step is not None:
            model = step(model, rng)
        expected.append(write(repo, model))
        if forced:
            repo.theta("add", NAME, "--update-type", forced)
        else:
            repo.git("add", NAME)
        repo.git("commit", "-q", "-m", f"v{i}")
    found = manifests(repo, [f"HEAD~{k}:{NAME}" for k in (3, 2, 1, 0)])
    chains = [m.tensors["mlp.weight"] for m in found]
    assert [(e.update, e.chain_depth) for e in chains] == [
        ("dense", 0),
        ("int-delta", 1),
        ("sparse", 2),
        ("int-delta", 1),
    ]
    assert chains[2].objects[1:] == chains[1].objects and chains[3].objects[1:] == chains[0].objects
    for k, data in zip((3, 2, 1, 0), expected):
        repo.git("checkout", "-q", f"HEAD~{k}", "--", NAME)
        assert repo.file(NAME).read_bytes() == data
