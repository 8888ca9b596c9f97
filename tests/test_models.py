"""Models, not files (issue 15): a sharded Hugging Face folder is one model for clean, diff, load,
ls-files and git theta add; PEFT adapters are shown with their base; bad layouts are clear errors.

Uses the real transformers/peft folders in tests/fixtures/hf (see its README) and sharded
folders written here the way transformers writes them (safetensors shards with ``{"format": "pt"}``
metadata and an indent-2 ``model.safetensors.index.json``).
"""

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from safetensors.numpy import load_file

import git_theta
from conftest import save_safetensors
from format_helpers import object_files
from test_diff import SCHEMA as DIFF_SCHEMA

HF = Path(__file__).parent / "fixtures" / "hf"


def put_folder(repo, source, dest="model"):
    """Replace the repository folder ``dest`` with a copy of ``source`` (as a re-save would)."""
    target = repo.file(dest)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, copy_function=shutil.copy)  # fresh mtimes: git must look
    for p in target.rglob("*"):
        p.chmod(0o644)


def save_sharded(folder, tensors, shards, prefix="model", index=True):
    """Write ``tensors`` as transformers does: ``model-0000k-of-0000n.safetensors`` files holding the
    names in ``shards`` (in that order) and (with ``index``) the index json; remove the folder's old
    shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{prefix}-*-of-*.safetensors"):
        old.unlink()
    weight_map = {}
    for k, members in enumerate(shards, start=1):
        name = f"{prefix}-{k:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(folder / name, {m: tensors[m] for m in members}, metadata={"format": "pt"})
        weight_map.update({m: name for m in members})
    if not index:
        return
    index = {
        "metadata": {
            "total_parameters": sum(t.size for t in tensors.values()),
            "total_size": sum(t.nbytes for t in tensors.values()),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def llama(seed=0, layers=4, hidden=32):
    rng = np.random.default_rng(seed)
    t = {
        "model.embed_tokens.weight": rng.standard_normal((64, hidden)),
        "lm_head.weight": rng.standard_normal((64, hidden)),
        "model.norm.weight": np.ones(hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{m}.weight"] = rng.standard_normal((hidden, hidden)) * 0.02
        t[p + "mlp.up_proj.weight"] = rng.standard_normal((2 * hidden, hidden)) * 0.02
        t[p + "input_layernorm.weight"] = np.ones(hidden)
    return {k: v.astype(np.float32) for k, v in t.items()}


def split(names, n):
    """``names`` cut into ``n`` consecutive shards."""
    return [list(part) for part in np.array_split(np.array(list(names), dtype=object), n)]


def manifests(repo, rev, folder="model"):
    """{tensor name: (file, update type, chain depth)} over the folder's stored manifests."""
    result = {}
    for path in repo.git("ls-tree", "--name-only", rev, f"{folder}/").stdout.split():
        if path.endswith(".safetensors"):
            for line in repo.show(f"{rev}:{path}").decode().splitlines():
                if line.startswith("tensor "):
                    parts = line.split(" ")
                    result[parts[1]] = (path, parts[5], len(parts) - 7)
    return result


def diff_json(repo, *args):
    """``git theta diff --json``, checked against the documented schema (version 2)."""
    result = json.loads(repo.theta("diff", "--json", *args).stdout)
    jsonschema.validate(result, DIFF_SCHEMA)
    return result


def folder_tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_transformers_resave_tune_and_reshard(repo):
    repo.git("config", "theta.packThreshold", "0")  # one object file per tensor: counted below
    # deltas for the fine-tune even though keyframe + delta (0.9 + 0.63 of raw) is more to read
    # than theta.maxChainPercent allows by default (test_keyframes.py covers that rule)
    repo.git("config", "theta.maxChainPercent", "1000")
    put_folder(repo, HF / "fresh")
    repo.commit("fresh")
    objects = set(object_files(repo))
    put_folder(repo, HF / "resaved")
    repo.commit("resaved: 27 of 30 tensors moved to another shard")
    assert set(object_files(repo)) == objects  # a re-save costs nothing
    stat = repo.theta("diff", "--stat", "HEAD~1", "HEAD").stdout
    assert "re-sharded 12 -> 12 files, 27 moved, 0 tensors changed" in stat
    assert " A " not in stat and " D " not in stat and "1 model changed" in stat

    put_folder(repo, HF / "tuned")
    repo.commit("tuned")
    stored = manifests(repo, "HEAD")
    changed = {n for n, (_, update, _) in stored.items() if update not in ("dense", "raw")}
    assert changed == {
        f"model.layers.0.{m}.weight"
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    # every changed tensor is a delta on its version in another shard, and small
    assert all(stored[n][2] == 1 for n in changed)
    new = set(object_files(repo)) - objects
    assert len(new) == 7
    sizes = sum((Path(repo.path) / ".git/theta/objects" / o).stat().st_size for o in new)
    assert sizes < 0.7 * sum(  # a delta (0.63 here); stored dense these are 0.9 of raw
        folder_tensors(HF / "tuned")[n].nbytes for n in changed
    )
    result = diff_json(repo, "HEAD~1", "HEAD")
    assert result["schema"] == 2 and result["by"] == "model" and len(result["files"]) == 1
    entry = result["files"][0]
    assert (entry["kind"], entry["path"], entry["index"]) == ("model", "model", "model/model.safetensors.index.json")
    assert entry["summary"]["changed"] == 7 and entry["summary"]["unchanged"] == 23
    assert all(t["stats"]["relative_change"] > 0 for t in entry["tensors"])
    assert entry["layout"] == {"files_old": 12, "files_new": 12, "moved": 0, "resharded": False}

    put_folder(repo, HF / "resharded")
    repo.commit("resharded to 4 files")
    assert len(set(object_files(repo)) - objects) == 7
    assert "re-sharded 12 -> 4 files, 0 tensors changed" in repo.theta("diff", "HEAD~1", "HEAD").stdout
    by_file = diff_json(repo, "--by-file", "--stat", "HEAD~1", "HEAD")
    assert by_file["by"] == "file" and {f["kind"] for f in by_file["files"]} == {"file"}
    assert sum(f["summary"]["added"] for f in by_file["files"]) > 0  # file by file, moves look like adds

    # load: the whole model from a folder or its index json, params across shards, bit-exact
    expected = folder_tensors(HF / "tuned")
    for spec in ("model", "model/", "model/model.safetensors.index.json"):
        loaded = git_theta.load(spec, rev="HEAD", repo=repo.path)
        assert loaded.keys() == expected.keys()
        assert all(np.array_equal(loaded[k], expected[k]) for k in expected)
    old = git_theta.load("model", rev="HEAD~1", repo=repo.path, params="model.layers.0.*")
    assert len(old) == 9 and all(np.array_equal(old[k], expected[k]) for k in old)
    api = git_theta.diff("model", "HEAD~2", "HEAD", repo=repo.path, stat=True)
    assert api["files"][0]["summary"]["changed"] == 7

    # checkout of the old layout gives the old files back, byte for byte
    repo.git("checkout", "-q", "HEAD~2")
    for f in (HF / "resaved").iterdir():
        assert repo.file(f"model/{f.name}").read_bytes() == f.read_bytes()
    assert repo.status() == ""


def test_real_peft_adapter_merged_into_a_sharded_model(repo):
    put_folder(repo, HF / "tuned", "tuned")
    put_folder(repo, HF / "adapter", "adapter")  # its config names "tuned" as the base
    repo.commit("tuned + its adapter")
    assert "adapter/  (1 file, adapter of tuned)" in repo.theta("ls-files").stdout
    put_folder(repo, HF / "lora-merged", "tuned")
    repo.theta("add", "tuned/", "--update-path", "adapter/")
    repo.git("commit", "-q", "-m", "merge_and_unload")
    stored = manifests(repo, "HEAD", "tuned")
    projections = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(3) for m in ("q_proj", "v_proj")}
    assert {n for n, (_, u, _) in stored.items() if u not in ("dense", "raw")} == projections
    assert all(stored[n][1:] == ("low-rank", 1) for n in projections)
    assert len({stored[n][0] for n in projections}) > 1  # the targets are spread over several shards
    expected = folder_tensors(HF / "lora-merged")
    loaded = git_theta.load("tuned", repo=repo.path)
    assert loaded.keys() == expected.keys() and all(np.array_equal(loaded[k], expected[k]) for k in expected)
    (entry,) = diff_json(repo, "--stat", "HEAD~1", "HEAD", "--", "tuned")["files"]
    assert entry["summary"]["changed"] == 6 and {t["name"] for t in entry["tensors"]} == projections


def test_reshard_more_and_fewer_files_and_a_changed_moved_tensor(repo):
    repo.git("config", "theta.packThreshold", "0")  # one object file per tensor: sizes checked below
    tensors = llama()
    names = list(tensors)
    save_sharded(repo.file("m"), tensors, split(names, 8))
    repo.commit("8 shards")
    objects = set(object_files(repo))
    save_sharded(repo.file("m"), tensors, split(reversed(names), 5))
    # before git add: the index json names shards that are only on disk; the diff still works
    assert "1 model changed" in repo.theta("diff", "--stat").stdout
    repo.commit("5 shards, reversed order")
    assert set(object_files(repo)) == objects
    assert "re-sharded 8 -> 5 files, 0 tensors changed" in repo.theta("diff", "--stat", "HEAD~1", "HEAD").stdout

    tuned = dict(tensors)
    target = "model.layers.1.self_attn.q_proj.weight"
    tuned[target] = tensors[target].copy()
    tuned[target][3, :5] += 0.01  # a sparse change
    save_sharded(repo.file("m"), tuned, split(sorted(names), 10))
    repo.commit("10 shards, one tensor tuned")
    stored = manifests(repo, "HEAD", "m")
    assert stored[target][1] == "sparse" and stored[target][2] == 1
    assert sum(1 for _, update, _ in stored.values() if update not in ("dense", "raw")) == 1
    (new,) = set(object_files(repo)) - objects
    assert (Path(repo.path) / ".git/theta/objects" / new).stat().st_size < 0.1 * tensors[target].nbytes  # 5 elements
    result = diff_json(repo, "HEAD~1", "HEAD")
    (entry,) = result["files"]
    assert entry["layout"]["files_old"] == 5 and entry["layout"]["files_new"] == 10 and entry["layout"]["resharded"]
    (record,) = entry["tensors"]
    assert record["name"] == target and record["status"] == "changed"
    assert record["stats"]["fraction_changed"] == pytest.approx(5 / tensors[target].size)
    text = repo.theta("diff", "HEAD~1", "HEAD").stdout
    assert "re-sharded 5 -> 10 files, 1 tensor changed" in text and "m (model, 10 files)" in text
    assert np.array_equal(git_theta.load("m", rev="HEAD~2", repo=repo.path)[target], tensors[target])

    # the log follows the model through its layouts: the re-shard changed no tensor
    log = json.loads(repo.theta("log", "--json", "--", "m").stdout)
    assert [c["subject"] for c in log["commits"]] == ["10 shards, one tensor tuned", "8 shards"]
    (newest,) = log["commits"][0]["files"]
    assert (newest["path"], newest["kind"], newest["summary"]["changed"]) == ("m", "model", 1)
    assert [t["name"] for t in newest["tensors"]] == [target]
    plot = repo.path / "change.png"
    repo.theta("diff", "HEAD~1", "HEAD", "--plot", str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_renames_pair_by_name_structure_within_the_model(repo):
    tensors = llama(layers=2)
    save_sharded(repo.file("m"), tensors, split(tensors, 3))
    repo.commit("v1")
    renamed = {
        k.replace("model.layers.1.input_layernorm", "model.layers.1.attention_norm"): v for k, v in tensors.items()
    }
    save_sharded(repo.file("m"), renamed, split(renamed, 2))
    repo.commit("renamed one norm (three norms are all ones)")
    (entry,) = diff_json(repo, "--stat", "HEAD~1", "HEAD")["files"]
    (record,) = entry["tensors"]
    assert record["status"] == "renamed"
    assert (record["old_name"], record["name"]) == (
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.attention_norm.weight",
    )


def adapter_for(folder, targets, rng, rank=2, alpha=4, hidden=32):
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for ``targets``;
    returns the deltas W += scale * B @ A."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays, deltas = {}, {}
    for t in targets:
        module = t[: -len(".weight")]
        a = (rng.standard_normal((rank, hidden)) * 0.1).astype(np.float32)
        b = (rng.standard_normal((hidden, rank)) * 0.1).astype(np.float32)
        arrays[f"base_model.model.{module}.lora_A.weight"] = a
        arrays[f"base_model.model.{module}.lora_B.weight"] = b
        deltas[t] = (b @ a) * np.float32(alpha / rank)
    save_safetensors(folder / "adapter_model.safetensors", arrays, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "base_model_name_or_path": "m",
        "target_modules": ["q_proj", "v_proj"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return deltas


def test_adapter_targets_span_shards_and_adapter_shown_with_its_base(repo, tmp_path):
    tensors = llama()
    names = list(tensors)
    save_sharded(repo.file("m"), tensors, split(names, 4))
    repo.commit("base")
    rng = np.random.default_rng(7)
    targets = ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.v_proj.weight"]
    deltas = adapter_for(repo.file("adapter"), targets, rng)
    merged = {k: (v + deltas[k] if k in deltas else v) for k, v in tensors.items()}
    save_sharded(repo.file("m"), merged, split(reversed(names), 3))  # merged and saved in a new layout
    repo.theta("add", "m", "--update-path", "adapter")
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "lora merged")
    stored = manifests(repo, "HEAD", "m")
    holders = {stored[t][0] for t in targets}
    assert len(holders) == 2  # the two targets are in different shards
    assert all(stored[t][1:] == ("low-rank", 1) for t in targets)
    assert sum(1 for _, u, _ in stored.values() if u not in ("dense", "raw")) == 2
    loaded = git_theta.load("m", repo=repo.path)
    assert all(np.array_equal(loaded[k], merged[k]) for k in merged)

    listing = repo.theta("ls-files").stdout
    assert "adapter/  (1 file, adapter of m)" in listing and "m/  (3 files)" in listing
    models = {m["model"]: m for m in json.loads(repo.theta("ls-files", "--json").stdout)["models"]}
    assert models["adapter"]["adapter_of"] == "m" and models["m"]["tensors"] == len(tensors)

    # two versions of the adapter diff like any model
    more = adapter_for(repo.file("adapter"), targets + ["model.layers.1.self_attn.q_proj.weight"], rng)
    assert len(more) == 3
    repo.commit("adapter v2")
    (entry,) = diff_json(repo, "--stat", "HEAD~1", "HEAD")["files"]
    assert (entry["kind"], entry["path"], entry["adapter_of"]) == ("model", "adapter", "m")
    assert entry["summary"]["changed"] == 4 and entry["summary"]["added"] == 2

    # a target that no shard holds is the error, naming the tensor; nothing is staged
    repo.file("bad").mkdir()
    adapter_for(repo.file("bad"), ["model.layers.9.self_attn.q_proj.weight"], rng)
    index_before = repo.git("ls-files", "-s").stdout
    bad = repo.theta("add", "m", "--update-path", "bad", check=False)
    assert bad.returncode != 0
    assert "model.layers.9.self_attn.q_proj.weight" in bad.stderr and "the 3 files given" in bad.stderr
    assert repo.git("ls-files", "-s").stdout == index_before


def test_bad_layouts_are_errors_naming_both(repo):
    tensors = llama(layers=1)
    save_sharded(repo.file("m"), tensors, split(tensors, 3))
    repo.commit("v1")
    # an index naming a shard that is not there
    index = json.loads(repo.file("m/model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    repo.file("m/model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    repo.commit("index names a missing shard")
    bad = repo.theta("diff", "--stat", "HEAD~1", "HEAD", check=False)
    assert bad.returncode != 0 and "internal error" not in bad.stderr
    assert "m/model.safetensors.index.json names shard m/model-00009-of-00009.safetensors" in bad.stderr
    bad = repo.theta("ls-files", check=False)
    assert bad.returncode != 0 and "model-00009-of-00009.safetensors" in bad.stderr

    # an index listing a tensor twice (json keeps the last silently)
    text = repo.file("m/model.safetensors.index.json").read_text()
    text = text.replace('"weight_map": {', '"weight_map": {\n    "lm_head.weight": "model-00002-of-00003.safetensors",')
    repo.file("m/model.safetensors.index.json").write_text(text)
    repo.git("add", "-A")
    message = error_of(lambda: git_theta.load("m", rev=None, repo=repo.path))
    assert (
        "lm_head.weight" in message
        and "model-00001-of-00003.safetensors" in message
        and "model-00002-of-00003" in message
    )

    # shards of a model without an index holding the same tensor twice
    repo.file("m/model.safetensors.index.json").unlink()
    held = [p.name for p in sorted(repo.file("m").glob("*.safetensors")) if "lm_head.weight" in load_file(str(p))]
    other = next(p.name for p in sorted(repo.file("m").glob("*.safetensors")) if p.name not in held)
    save_safetensors(repo.file(f"m/{other}"), {"lm_head.weight": tensors["lm_head.weight"]})
    repo.git("add", "-A")
    message = error_of(lambda: git_theta.load("m", rev=None, repo=repo.path))
    assert "'lm_head.weight' is in two files" in message
    assert f"m/{held[0]}" in message and f"m/{other}" in message


def test_two_indexes_in_one_folder_are_two_models(repo):
    a, b = llama(seed=1, layers=1), llama(seed=2, layers=1)
    save_sharded(repo.file("f"), a, split(a, 2), prefix="model")
    save_sharded(repo.file("f"), b, split(b, 3), prefix="reward")
    repo.commit("two models in one folder")
    result = diff_json(repo, "--stat", "HEAD~1", "HEAD")
    assert sorted(f["path"] for f in result["files"]) == ["f/model.safetensors", "f/reward.safetensors"]
    assert [len(f["shards_new"]) for f in sorted(result["files"], key=lambda f: f["path"])] == [2, 3]
    loaded = git_theta.load("f/reward.safetensors.index.json", repo=repo.path)
    assert all(np.array_equal(loaded[k], b[k]) for k in b)
    message = error_of(lambda: git_theta.load("f", repo=repo.path))
    assert "names no single model" in message and "f/reward.safetensors" in message


def error_of(call):
    from git_theta.errors import GitThetaError

    with pytest.raises(GitThetaError) as info:
        call()
    return info.value.message


def test_merge_where_one_branch_resharded(repo):
    tensors = llama()
    names = list(tensors)
    save_sharded(repo.file("m"), tensors, split(names, 4))
    repo.commit("base: 4 shards")
    repo.git("checkout", "-q", "-b", "reshard")
    save_sharded(repo.file("m"), tensors, [names[i::3] for i in range(3)])  # interleaved: no shard resembles an old one
    repo.commit("re-shard to 3 files")
    repo.git("checkout", "-q", "main")
    tuned = dict(tensors)
    target = "model.layers.0.self_attn.q_proj.weight"
    tuned[target] = tensors[target] + np.float32(0.01)
    save_sharded(repo.file("m"), tuned, split(names, 4))
    repo.commit("tune one tensor")

    plain = repo.git("merge", "--no-edit", "reshard", check=False)
    assert plain.returncode != 0  # git sees a shard deleted on one side and modified on the other
    repo.git("merge", "--abort")

    out = repo.theta("merge", "reshard")
    assert "Merge made by git theta merge" in out.stdout
    assert repo.status() == ""
    files = sorted(p.name for p in repo.file("m").glob("*.safetensors"))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]  # the re-sharded layout
    index = json.loads(repo.file("m/model.safetensors.index.json").read_text())
    on_disk = {n: f for f in files for n in load_file(str(repo.file(f"m/{f}")))}
    assert index["weight_map"] == on_disk and len(on_disk) == len(names)
    loaded = folder_tensors(repo.file("m"))
    assert all(np.array_equal(loaded[k], tuned[k]) for k in names)
    assert repo.git("rev-list", "--count", "HEAD^@").stdout.strip() == "4"  # two parents, a merge
    (entry,) = diff_json(repo, "--stat", "HEAD^1", "HEAD")["files"]
    assert entry["summary"]["changed"] == 0 and entry["layout"]["resharded"]
    (entry,) = diff_json(repo, "--stat", "HEAD^2", "HEAD")["files"]
    assert [t["name"] for t in entry["tensors"]] == [target] and not entry["layout"]["resharded"]


def test_merge_when_both_sides_resharded_keeps_the_base_layout(repo):
    tensors = llama(layers=2)
    names = list(tensors)
    save_sharded(repo.file("m"), tensors, split(names, 3))
    repo.commit("base: 3 shards")
    base_files = sorted(p.name for p in repo.file("m").glob("*.safetensors"))
    repo.git("checkout", "-q", "-b", "other")
    a = dict(tensors, **{"lm_head.weight": tensors["lm_head.weight"] * 2})
    save_sharded(repo.file("m"), a, split(names, 2))
    repo.commit("theirs: 2 shards, head doubled")
    repo.git("checkout", "-q", "main")
    b = dict(tensors, **{"model.norm.weight": tensors["model.norm.weight"] + 1})
    save_sharded(repo.file("m"), b, [names[i::5] for i in range(5)])
    repo.commit("ours: 5 shards, norm moved")
    repo.theta("merge", "other")
    assert sorted(p.name for p in repo.file("m").glob("*.safetensors")) == base_files
    loaded = folder_tensors(repo.file("m"))
    assert np.array_equal(loaded["lm_head.weight"], a["lm_head.weight"])
    assert np.array_equal(loaded["model.norm.weight"], b["model.norm.weight"])
    index = json.loads(repo.file("m/model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(base_files) and repo.status() == ""


def test_merge_driver_flags_a_tensor_moved_to_another_shard(repo):
    tensors, shards = three_shards(repo)
    names = list(tensors)
    moved = shards[0][0]
    repo.git("checkout", "-q", "-b", "tune")
    tuned = dict(tensors, **{moved: tensors[moved] + np.float32(0.5)})
    save_sharded(repo.file("m"), tuned, shards)
    repo.commit("tune the first tensor of shard 1")
    repo.git("checkout", "-q", "main")
    other = [shards[0][1:], shards[1] + [moved], shards[2]]  # same file names, the tensor moved
    save_sharded(repo.file("m"), tensors, other)
    repo.commit("re-saved: the tensor now in shard 2")

    plain = repo.git("merge", "--no-edit", "tune", check=False)
    assert plain.returncode != 0
    assert f"{moved}: moved to another shard on ours" in plain.stderr and "git theta merge" in plain.stderr
    repo.git("merge", "--abort")
    repo.theta("merge", "tune")
    loaded = folder_tensors(repo.file("m"))
    assert np.array_equal(loaded[moved], tuned[moved]) and len(loaded) == len(names)
    assert moved in load_file(str(repo.file("m/model-00002-of-00003.safetensors")))  # ours' layout
    assert repo.status() == ""


def three_shards(repo, index=True):
    """Commit a small llama in 3 shards (with or without the index json): (tensors, shards)."""
    tensors = llama(layers=2)
    shards = split(list(tensors), 3)
    save_sharded(repo.file("m"), tensors, shards, index=index)
    repo.commit("base: 3 shards")
    return tensors, shards


def commit_moved(repo, tensors, shards, moved, delta, branch, index=False):
    """Commit on a new ``branch`` (from HEAD, then back) ``moved`` moved from shard 1 to shard 2
    and changed by ``delta``; return that branch's tensors."""
    current = repo.git("branch", "--show-current").stdout.strip()
    repo.git("checkout", "-q", "-b", branch)
    theirs = dict(tensors, **{moved: tensors[moved] + np.float32(delta)})
    layout = [[n for n in shards[0] if n != moved], shards[1] + [moved], *shards[2:]]
    save_sharded(repo.file("m"), theirs, layout, index=index)
    repo.commit("theirs: tensor moved to shard 2 and tuned")
    repo.git("checkout", "-q", current)
    return theirs


def commit_tuned(repo, tensors, shards, deltas, index=False):
    """Commit the tensors of ``deltas`` changed in place (same layout); return the tensors."""
    ours = dict(tensors, **{n: tensors[n] + np.float32(d) for n, d in deltas.items()})
    save_sharded(repo.file("m"), ours, shards, index=index)
    repo.commit("ours: tuned in place")
    return ours


@pytest.mark.parametrize("command", [("merge", "--no-edit"), ("cherry-pick",)])
def test_merge_driver_merges_a_tensor_theirs_moved_by_name(repo, command):
    tensors, shards = three_shards(repo, index=False)
    moved, in_one, in_two = shards[0][0], shards[0][1], shards[1][0]
    # ours changes the moved tensor too (so an operator merges it) and a tensor of each shard
    # involved, so git runs the driver on both files
    theirs = commit_moved(repo, tensors, shards, moved, 0.5, "moved")
    ours = commit_tuned(repo, tensors, shards, {moved: 0.25, in_one: 1.0, in_two: 2.0})
    repo.git("config", "theta.merge.operator", "task_arithmetic")

    proc = repo.git(*command, "moved")
    assert "moved to another shard" not in proc.stderr and repo.status() == ""
    one = load_file(str(repo.file("m/model-00001-of-00003.safetensors")))
    two = load_file(str(repo.file("m/model-00002-of-00003.safetensors")))
    assert sorted(one) == sorted(shards[0]) and sorted(two) == sorted(shards[1])  # ours' layout
    expected = tensors[moved] + ((ours[moved] - tensors[moved]) + (theirs[moved] - tensors[moved]))
    np.testing.assert_array_equal(one[moved], expected)
    assert np.array_equal(one[in_one], ours[in_one]) and np.array_equal(two[in_two], ours[in_two])
    assert len(folder_tensors(repo.file("m"))) == len(tensors)


def test_merge_driver_falls_back_per_file_when_a_side_is_no_commit(repo):
    tensors, shards = three_shards(repo, index=False)
    # a criss-cross: both branches merge each other's first change, so the merge base git uses
    # for the final merge is a virtual one that no commit holds
    p, q = shards[0][2], shards[0][3]
    for branch, name in (("a", p), ("b", q)):
        repo.git("checkout", "-q", "-b", branch, "main")
        save_sharded(repo.file("m"), dict(tensors, **{name: tensors[name] * 2}), shards, index=False)
        repo.commit(f"{branch}: tune {name}")
    repo.git("checkout", "-q", "a")
    repo.git("merge", "-q", "--no-edit", "b")
    repo.git("checkout", "-q", "b")
    repo.git("merge", "-q", "--no-edit", "a~1")
    state = folder_tensors(repo.file("m"))
    moved = shards[0][0]
    commit_moved(repo, state, shards, moved, 0.5, "b-moved")  # theirs: on b's merge
    repo.git("checkout", "-q", "a")
    commit_tuned(repo, state, shards, {shards[0][1]: 1.0, shards[1][0]: 2.0})  # ours: on a's merge
    assert len(repo.git("merge-base", "--all", "HEAD", "b-moved").stdout.split()) == 2

    proc = repo.git("merge", "--no-edit", "b-moved", check=False)
    assert proc.returncode != 0
    assert f"{moved}: moved to another shard on theirs" in proc.stderr and "git theta merge" in proc.stderr


@pytest.mark.parametrize("case", ["shard 2 changed only on theirs", "unreadable index json"])
def test_merge_driver_falls_back_when_git_would_not_keep_ours_layout(repo, case):
    tensors, shards = three_shards(repo, index=False)
    if case == "unreadable index json":
        repo.file("m/model.safetensors.index.json").write_text("{not json")
        repo.commit("a broken index json")
    moved = shards[0][0]
    theirs = commit_moved(repo, tensors, shards, moved, 0.5, "moved")
    deltas = {shards[0][1]: 1.0} if case.startswith("shard 2") else {shards[0][1]: 1.0, shards[1][0]: 1.0}
    commit_tuned(repo, tensors, shards, deltas)

    # by name, shard 1 would keep the moved tensor while git takes theirs' shard 2 holding it too
    proc = repo.git("merge", "--no-edit", "moved", check=False)
    assert proc.returncode == 1 and "error:" not in proc.stderr
    assert f"{moved}: moved to another shard on theirs" in proc.stderr
    repo.git("merge", "--abort")
    whole = repo.theta("merge", "moved", check=False)
    if case == "unreadable index json":  # the whole-model merge names the bad file
        assert "error: m/model.safetensors.index.json: not valid json" in whole.stderr
        return
    loaded = folder_tensors(repo.file("m"))
    assert np.array_equal(loaded[moved], theirs[moved]) and len(loaded) == len(tensors)


def test_merge_driver_leaves_a_changed_index_json_to_git_theta_merge(repo):
    tensors, shards = three_shards(repo)
    moved = shards[0][0]
    theirs = commit_moved(repo, tensors, shards, moved, 0.5, "moved", index=True)
    ours = commit_tuned(repo, tensors, shards, {shards[0][1]: 1.0, shards[1][0]: 1.0}, index=True)

    proc = repo.git("merge", "--no-edit", "moved", check=False)
    assert proc.returncode != 0  # git would take theirs' index json: only the whole-model merge fits
    assert f"{moved}: moved to another shard on theirs" in proc.stderr
    repo.git("merge", "--abort")
    repo.theta("merge", "moved")
    loaded = folder_tensors(repo.file("m"))
    assert np.array_equal(loaded[moved], theirs[moved]) and np.array_equal(loaded[shards[1][0]], ours[shards[1][0]])
    index = json.loads(repo.file("m/model.safetensors.index.json").read_text())
    assert index["weight_map"][moved] == "model-00002-of-00003.safetensors" and repo.status() == ""


def test_hostile_index_json_is_a_clear_error():
    from git_theta.git.models import ModelError, group

    for data in (b"[" * 100000, b"{not json", b'{"weight_map": {"a": "../../etc/passwd"}}', b'{"weight_map": [1]}'):
        with pytest.raises(ModelError) as info:
            group(["m/model-00001-of-00002.safetensors"], {"m/model.safetensors.index.json": data})
        assert info.value.message.startswith("m/model.safetensors.index.json: ")


def test_merge_across_layouts_uses_the_operators_and_reports_conflicts(repo):
    tensors = llama(layers=2)
    names = list(tensors)
    target = "model.layers.1.mlp.up_proj.weight"
    save_sharded(repo.file("m"), tensors, split(names, 3))
    repo.commit("base")
    repo.git("checkout", "-q", "-b", "other")
    theirs = dict(tensors, **{target: tensors[target] + np.float32(0.25)})
    save_sharded(repo.file("m"), theirs, [names[i::2] for i in range(2)])
    repo.commit("theirs: re-sharded to 2 files and tuned")
    repo.git("checkout", "-q", "main")
    ours = dict(tensors, **{target: tensors[target] - np.float32(0.125)})
    save_sharded(repo.file("m"), ours, split(names, 3))
    repo.commit("ours: tuned the same tensor")
    head = repo.git("rev-parse", "HEAD").stdout

    bad = repo.theta("merge", "other", check=False)
    assert bad.returncode == 1 and "m: 1 conflict(s)" in bad.stderr and target in bad.stderr
    assert repo.git("rev-parse", "HEAD").stdout == head and repo.status() == ""  # nothing changed

    repo.theta("merge", "other", "--operator", "task_arithmetic", "--param", "weight=1")
    loaded = folder_tensors(repo.file("m"))
    expected = tensors[target] + (ours[target] - tensors[target]) + (theirs[target] - tensors[target])
    np.testing.assert_allclose(loaded[target], expected, rtol=0, atol=1e-6)
    assert sorted(p.name for p in repo.file("m").glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]  # theirs re-sharded
    assert all(np.array_equal(loaded[k], tensors[k]) for k in names if k != target)
