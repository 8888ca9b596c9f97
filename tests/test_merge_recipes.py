"""mergekit recipes, per-tensor parameter values, and how merge results are stored.

References are computed here from the text of MERGE-OPERATORS.md (§1 gradients and filters, §5.1
slerp, §4 TIES), sharing no code with git_theta. Every run goes through the real CLI and real git.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import save_safetensors
from safetensors.numpy import load_file

from git_theta import registry as plugins
from git_theta.errors import UsageError
from git_theta.merge.params import layer_index, position, resolve
from git_theta.merge.recipe import parse_recipe

LAYERS = 4
T_GRADIENT = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], None: 0.5}
RECIPE_T = """
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
"""


def llama(seed, like=None, scale=0.1, fraction=1.0):
    """A tiny Llama-named model; with ``like``, a fine-tune of it moving ``fraction`` of the entries."""
    rng = np.random.default_rng(seed)
    if like is not None:
        return {
            n: (v + scale * rng.standard_normal(v.shape) * (rng.random(v.shape) < fraction)).astype(np.float32)
            for n, v in like.items()
        }
    shapes = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,), "lm_head.weight": (16, 8)}
    for i in range(LAYERS):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (8, 8)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (12, 8)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (8,)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def gradient(values, x):
    """MERGE-OPERATORS.md §1: s = x(n−1), i = floor(s), v = (1−(s−i))v[i] + (s−i)v[min(i+1, n−1)]."""
    s = x * (len(values) - 1)
    i = math.floor(s)
    return (1 - (s - i)) * values[i] + (s - i) * values[min(i + 1, len(values) - 1)]


def t_for(name):
    """The recipe's t for one tensor: first matching filter, gradient over layers, x = 0 outside."""
    digits = [int(p) for p in name.split(".") if p.isdigit()]
    x = digits[0] / (LAYERS - 1) if digits else 0.0
    for key, value in T_GRADIENT.items():
        if key is None or key in name:
            return gradient(value, x) if isinstance(value, list) else value


def slerp_reference(t, a, b):
    """§5.1 in float64: whole tensors, lerp when |cos| > 0.9995."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    c = float(np.clip(np.dot(a64 / np.linalg.norm(a64), b64 / np.linalg.norm(b64)), -1, 1))
    if abs(c) > 0.9995:
        out = (1 - t) * a64 + t * b64
    else:
        omega = math.acos(c)
        out = math.sin((1 - t) * omega) / math.sin(omega) * a64 + math.sin(t * omega) / math.sin(omega) * b64
    return out.reshape(a.shape)


@pytest.fixture
def files(tmp_path):
    base = llama(0)
    models = {"base": base, "a": llama(1, base), "b": llama(2, base), "c": llama(3, base)}
    for name, tensors in models.items():
        save_safetensors(tmp_path / f"{name}.safetensors", tensors)
    return tmp_path, models


def write(path, text):
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------
# parameter values


def test_gradient_and_filter_values_follow_the_spec_formula():
    op = plugins.get("merge", "slerp")
    raw = {
        "t": "[{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]"
    }
    names = list(llama(0))
    for name in names:
        got = resolve(op, raw, 2, tensor=name, x=position(name, LAYERS))["t"]
        assert got == pytest.approx(t_for(name), abs=1e-12), name
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12 and layer_index("lm_head.weight") is None
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3


def test_per_model_values_with_gradients_and_the_default_when_no_filter_matches():
    op = plugins.get("merge", "ties")
    p = resolve(
        op,
        {"weight": "[0,1],0.5", "density": "[{filter: mlp, value: 0.2}]"},
        2,
        tensor="model.layers.2.mlp.up_proj.weight",
        x=2 / 3,
    )
    assert p["weight"] == [pytest.approx(2 / 3), 0.5] and p["density"] == [0.2, 0.2]
    p = resolve(op, {"density": "[{filter: mlp, value: 0.2}]"}, 2, tensor="lm_head.weight", x=0.0)
    assert p["density"] == [1.0, 1.0]  # no entry for this tensor: mergekit's default
    with pytest.raises(UsageError, match="must be in"):  # every value a gradient can take is checked
        resolve(op, {"density": "[0.5, 1.5]"}, 2)
    with pytest.raises(UsageError, match="filter entry takes 'filter' and 'value'"):
        resolve(op, {"density": "[{filtre: mlp, value: 0.2}]"}, 2)
    with pytest.raises(UsageError, match="cannot read"):
        resolve(op, {"density": "[0.5,"}, 2)


def test_thetamerge_rules_take_quoted_gradients_and_filter_lists():
    from git_theta.errors import ConfigError
    from git_theta.merge.config import build_config

    text = 'lm_head.* ours\nmodel.layers.* slerp "t=[{filter: self_attn, value: [0, 1]}, {value: 0.5}]"\n'
    config = build_config([], rules_text=text)
    choice = config.choose("m.safetensors", "model.layers.3.self_attn.q_proj.weight")
    assert choice.operator == "slerp"
    got = resolve(
        plugins.get("merge", "slerp"),
        choice.params,
        2,
        tensor="model.layers.3.self_attn.q_proj.weight",
        x=position("model.layers.3.self_attn.q_proj.weight", LAYERS),
    )
    assert got["t"] == 1.0
    with pytest.raises(ConfigError, match="unbalanced quotes"):
        build_config([], rules_text='model.* slerp "t=[0, 1]\n')


# ------------------------------------------------------------------------------------------------
# recipe parsing


@pytest.mark.parametrize(
    "data, needle",
    [
        (
            {"merge_method": "ties", "models": [{"model": "a"}], "base_model": "b", "mergekit_foo": 1},
            "unknown key 'mergekit_foo'",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "a", "weight": 1}], "base_model": "b"},
            "models[0]: unknown key 'weight'",
        ),
        ({"models": [{"model": "a"}]}, "'merge_method' is missing"),
        ({"merge_method": "nope", "models": [{"model": "a"}]}, "unknown merge operator 'nope'"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "slices": []}, "exactly one of 'models' and 'slices'"),
        ({"merge_method": "linear", "modules": {}}, "'modules' (multi-module models) is not supported"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "int8"}, "is not a floating dtype"),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}],
            },
            "same number of layers",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [3, 1]}]}]},
            "layer_range must be",
        ),
        ({"merge_method": "linear", "models": [{"model": "base+some/lora"}]}, "LoRA adapter"),
    ],
)
def test_recipe_errors_name_the_key(data, needle):
    with pytest.raises(UsageError) as err:
        parse_recipe(data, "r.yml")
    assert needle in str(err.value) and "r.yml" in str(err.value)


def test_tokenizer_and_mergekit_options_are_noted_and_the_seed_is_kept():
    recipe = parse_recipe(
        {
            "merge_method": "linear",
            "models": [{"model": "a"}],
            "tokenizer_source": "union",
            "chat_template": "chatml",
            "out_shard_size": "1B",
            "random_seed": 7,
        },
        "r.yml",
    )
    assert recipe.seed == 7
    assert [n.split("'")[1] for n in recipe.notes] == ["tokenizer_source", "chat_template", "out_shard_size"]


# ------------------------------------------------------------------------------------------------
# merge-files --config


def test_gradient_slerp_recipe_with_models_and_with_slices(files, repo):
    folder, models = files
    for layout in (
        "models:\n  - model: a.safetensors\n  - model: b.safetensors\n",
        "slices:\n  - sources:\n      - model: a.safetensors\n        layer_range: [0, 4]\n"
        "      - model: b.safetensors\n        layer_range: [0, 4]\n",
    ):
        recipe = write(
            folder / "slerp.yml",
            layout + "merge_method: slerp\nbase_model: a.safetensors\n"
            "parameters:" + RECIPE_T + "dtype: float32\ntokenizer_source: base\n",
        )
        proc = repo.theta("merge-files", "--config", str(recipe), "-o", "out.safetensors", cwd=folder)
        assert "note: " in proc.stderr and "'tokenizer_source' ignored" in proc.stderr
        out = load_file(str(folder / "out.safetensors"))
        assert set(out) == set(models["a"])
        for name, value in out.items():
            ref = slerp_reference(t_for(name), models["a"][name], models["b"][name])
            np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_ties_recipe_with_per_model_gradients_and_filters(files, repo):
    folder, models = files
    recipe = write(
        folder / "ties.yml",
        """
models:
  - model: a.safetensors
    parameters: {density: [1, 0.7, 0.1], weight: 1.0}
  - model: b.safetensors
    parameters: {density: 0.5, weight: [0, 0.3, 0.7, 1]}
  - model: c.safetensors
    parameters:
      density: 0.33
      weight: [{filter: mlp, value: 0.5}, {value: 0}]
merge_method: ties
base_model: base.safetensors
parameters: {normalize: true, int8_mask: true}
dtype: float32
""",
    )
    repo.theta("merge-files", "--config", str(recipe), "-o", "out.safetensors", cwd=folder)
    out = load_file(str(folder / "out.safetensors"))
    base = models["base"]
    for name, value in out.items():
        digits = [int(p) for p in name.split(".") if p.isdigit()]
        x = digits[0] / (LAYERS - 1) if digits else 0.0
        density = [gradient([1, 0.7, 0.1], x), 0.5, 0.33]
        weight = [1.0, gradient([0, 0.3, 0.7, 1], x), 0.5 if "mlp" in name else 0.0]
        deltas = []
        for d, w, key in zip(density, weight, "abc"):
            delta = (models[key][name] - base[name]).astype(np.float64).ravel()
            k = max(1, int(d * delta.size)) if d < 1 else delta.size
            keep = np.zeros(delta.size, bool)
            keep[np.argsort(-np.abs(delta), kind="stable")[:k]] = True
            deltas.append(w * np.where(keep, delta, 0))
        stacked = np.stack(deltas)
        sign = np.where(stacked.sum(axis=0) >= 0, 1, -1)
        agree = (np.sign(stacked) == sign) & (stacked != 0)
        divisor = (np.array(weight)[:, None] * agree).sum(axis=0)
        divisor[divisor == 0] = 1
        ref = base[name].astype(np.float64).ravel() + (stacked * agree).sum(axis=0) / divisor
        np.testing.assert_allclose(value.ravel(), ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_passthrough_slices_stack_layers(files, repo):
    folder, models = files
    recipe = write(
        folder / "stack.yml",
        """
slices:
  - sources: [{model: a.safetensors, layer_range: [0, 3]}]
  - sources: [{model: b.safetensors, layer_range: [1, 4], parameters: {scale: 2.0}}]
merge_method: passthrough
""",
    )
    repo.theta("merge-files", "--config", str(recipe), "-o", "out.safetensors", cwd=folder)
    out = load_file(str(folder / "out.safetensors"))
    assert len([n for n in out if n.endswith("q_proj.weight")]) == 6
    for j in range(6):
        src, layer, scale = ("a", j, 1.0) if j < 3 else ("b", j - 2, 2.0)
        name = "model.layers.{}.mlp.up_proj.weight"
        np.testing.assert_array_equal(out[name.format(j)], models[src][name.format(layer)] * np.float32(scale))
    np.testing.assert_array_equal(out["model.embed_tokens.weight"], models["a"]["model.embed_tokens.weight"])
    np.testing.assert_array_equal(out["lm_head.weight"], models["b"]["lm_head.weight"] * np.float32(2))


def test_recipe_errors_and_notes_through_the_cli(files, repo):
    folder, _ = files
    bad = write(
        folder / "bad.yml",
        "merge_method: ties\nbase_model: base.safetensors\nmodels:\n"
        "  - model: a.safetensors\n    parameters: {densty: 0.5}\n",
    )
    proc = repo.theta("merge-files", "--config", str(bad), "-o", "out.safetensors", cwd=folder, check=False)
    assert (
        proc.returncode == 2
        and "unknown parameter 'densty'" in proc.stderr
        and not (folder / "out.safetensors").exists()
    )
    noted = write(
        folder / "noted.yml",
        "merge_method: task_arithmetic\nbase_model: base.safetensors\nmodels:\n"
        "  - model: a.safetensors\n    parameters: {density: 0.5}\n",
    )
    proc = repo.theta("merge-files", "--config", str(noted), "-o", "out.safetensors", cwd=folder)
    assert "parameter 'density' ignored (task_arithmetic does not take it)" in proc.stderr
    missing = write(folder / "missing.yml", "merge_method: linear\nmodels:\n  - model: org/model-7b\n")
    proc = repo.theta("merge-files", "--config", str(missing), "-o", "x.safetensors", cwd=folder, check=False)
    assert proc.returncode == 2 and "not a local file or folder" in proc.stderr


def test_every_tensor_applies_the_operator_to_equal_inputs_and_one_model_with_a_base(files, repo):
    folder, models = files
    a = str(folder / "a.safetensors")
    repo.theta(
        "merge-files",
        "--operator",
        "linear",
        "--param",
        "weight=0.6",
        "--param",
        "normalize=false",
        "--every-tensor",
        a,
        a,
        "-o",
        "soup.safetensors",
        cwd=folder,
    )
    soup = load_file(str(folder / "soup.safetensors"))
    for name, value in models["a"].items():
        np.testing.assert_allclose(soup[name], 1.2 * value, rtol=1e-6)
    # one fine-tune and its base: dare_linear sparsifies its task vector (L1 norm restored)
    repo.theta(
        "merge-files",
        "--operator",
        "dare_linear",
        "--param",
        "density=0.3",
        "--base",
        str(folder / "base.safetensors"),
        a,
        "-o",
        "dare.safetensors",
        cwd=folder,
    )
    dare = load_file(str(folder / "dare.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    delta, kept = models["a"][name] - models["base"][name], dare[name] - models["base"][name]
    changed = np.abs(kept) > 1e-7
    assert 0.15 < changed.mean() < 0.45
    np.testing.assert_allclose(np.abs(kept).sum(), np.abs(delta).sum(), rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# through git


def _branches(repo, models, fraction=1.0):
    save_safetensors(repo.file("model.safetensors"), models["base"])
    repo.commit("base")
    for key in ("a", "b"):
        repo.git("checkout", "-q", "-b", key, "main")
        save_safetensors(repo.file("model.safetensors"), models[key])
        repo.commit(key)
    repo.git("checkout", "-q", "main")


def test_gradient_slerp_through_git_theta_merge_config_and_git_merge(files, repo):
    folder, models = files
    _branches(repo, models)
    recipe = write(
        folder / "slerp.yml",
        "models:\n  - model: a\n  - model: theirs\nmerge_method: slerp\nbase_model: a\nparameters:" + RECIPE_T,
    )
    repo.git("checkout", "-q", "a")
    proc = repo.theta("merge", "--config", str(recipe), "theirs=b")
    assert "Merge made by git theta merge (2 parents" in proc.stdout
    assert repo.git("rev-parse", "HEAD^2").stdout.strip() == repo.git("rev-parse", "b").stdout.strip()
    merged = load_file(str(repo.file("model.safetensors")))
    for name, value in merged.items():
        np.testing.assert_allclose(
            value,
            slerp_reference(t_for(name), models["a"][name], models["b"][name]),
            rtol=1e-5,
            atol=1e-6,
            err_msg=name,
        )
    # the same gradient from git config, through git's own merge and the merge driver
    repo.git("checkout", "-q", "-b", "a2", "a~1")
    repo.git("merge", "-q", "--no-edit", "a")  # a fast-forward: a2 = a
    t = "[{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]"
    repo.git("-c", "theta.merge.operator=slerp", "-c", f"theta.merge.t={t}", "merge", "--no-edit", "b")
    assert load_file(str(repo.file("model.safetensors"))).keys() == merged.keys()
    for name, value in load_file(str(repo.file("model.safetensors"))).items():
        np.testing.assert_array_equal(value, merged[name], err_msg=name)
    # HEAD must be the base or one of the models
    repo.git("checkout", "-q", "main")
    proc = repo.theta("merge", "--config", str(recipe), "theirs=b", check=False)
    assert proc.returncode == 2 and "HEAD is neither" in proc.stderr


def test_one_branch_of_a_fine_tune_onto_its_base_in_the_porcelain(files, repo):
    folder, models = files
    _branches(repo, models)
    repo.theta("merge", "--every-tensor", "--operator", "dare_linear", "--param", "density=0.3", "a")
    merged = load_file(str(repo.file("model.safetensors")))
    name = "model.layers.2.self_attn.q_proj.weight"
    kept = merged[name] - models["base"][name]
    assert 0.15 < (np.abs(kept) > 1e-7).mean() < 0.45
    np.testing.assert_allclose(np.abs(kept).sum(), np.abs(models["a"][name] - models["base"][name]).sum(), rtol=1e-3)


def test_config_scope_through_the_cli(files, repo):
    folder, models = files
    _branches(repo, models)
    repo.git("config", "theta.merge.density", "0.2")
    proc = repo.theta("merge", "--operator", "task_arithmetic", "--dry-run", "a", "b")
    assert "note: git config theta.merge.density is ignored by task_arithmetic" in proc.stderr
    proc = repo.theta("merge", "--operator", "task_arithmetic", "--param", "density=0.2", "a", "b", check=False)
    assert proc.returncode == 2 and "has no parameter 'density' (from --param density=0.2)" in proc.stderr


def _store_bytes(repo):
    root = repo.path / ".git" / "theta" / "objects"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("fraction", [0.05, 1.0])
def test_a_merge_commit_is_stored_as_a_delta(tmp_path, repo, fraction):
    """A TIES merge of two sparse fine-tunes costs about its change, not a dense copy; the merged
    bytes equal merge-files' dense result exactly."""
    rng = np.random.default_rng(5)
    base = {
        f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((256, 256)).astype(np.float32) for i in range(2)
    }
    models = {"base": base, "a": llama(1, base, fraction=fraction), "b": llama(2, base, fraction=fraction)}
    _branches(repo, models)
    repo.git("checkout", "-q", "a")
    before = _store_bytes(repo)
    repo.theta("merge", "--operator", "ties", "--param", "density=0.5", "b")
    added = _store_bytes(repo) - before
    raw = sum(v.nbytes for v in base.values())
    if fraction < 1:
        assert added < 0.25 * raw, added / raw
    else:
        assert added < 1.02 * raw  # dense fine-tunes: never more than a dense copy
    for key in ("base", "a", "b"):
        save_safetensors(tmp_path / f"{key}.safetensors", models[key])
    repo.theta(
        "merge-files",
        "--operator",
        "ties",
        "--param",
        "density=0.5",
        "--base",
        str(tmp_path / "base.safetensors"),
        str(tmp_path / "a.safetensors"),
        str(tmp_path / "b.safetensors"),
        "-o",
        str(tmp_path / "out.safetensors"),
    )
    assert repo.file("model.safetensors").read_bytes() == (tmp_path / "out.safetensors").read_bytes()
    repo.file("model.safetensors").unlink()
    repo.git("checkout", "--", "model.safetensors")
    assert repo.file("model.safetensors").read_bytes() == (tmp_path / "out.safetensors").read_bytes()


def test_merge_files_reads_safetensors_inputs_in_place_and_notices_a_changed_file(files):
    """Inputs are not copied into a temporary store: their tensors are read back from the files,
    and a file that changed meanwhile is an error, never a silently wrong merge."""
    from git_theta.errors import CheckpointError
    from git_theta.porcelain.merge_files import StreamedStore, ingest
    from git_theta.store.objects import ObjectStore

    folder, models = files
    store = StreamedStore(ObjectStore(folder / "tmp-objects", fsync=False))
    manifest, _ = ingest(store, folder / "a.safetensors")
    assert all(not e.objects for e in manifest.tensors.values())
    assert not any(p.is_file() for p in (folder / "tmp-objects").rglob("*"))
    name = "model.layers.1.mlp.up_proj.weight"
    entry = manifest.tensors[name]
    assert (
        np.frombuffer(store.read_tensor(entry), np.float32).reshape(entry.shape).tolist() == models["a"][name].tolist()
    )
    changed = dict(models["a"], **{name: models["a"][name] + 1})
    save_safetensors(folder / "a.safetensors", changed)
    with pytest.raises(CheckpointError, match="changed while it was being merged"):
        store.read_tensor(entry)


# ------------------------------------------------------------------------------------------------
# Hugging Face model folders (shards + index json) as recipe models and as the output

HF = Path(__file__).parent / "fixtures" / "hf"


def read_folder(folder):
    """All tensors of a model folder, read shard by shard as its index json says, after checking
    that the index names exactly the files' tensors and that total_size is their byte count."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = load_file(str(folder / shard))
        assert {n for n, s in index["weight_map"].items() if s == shard} == set(part), shard
        tensors.update(part)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    return tensors, index


def single_file(folder, dest):
    """The model of ``folder`` saved as one safetensors file (the same tensors, one file)."""
    save_safetensors(dest, read_folder(folder)[0])
    return dest


TIES_RECIPE = """
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {b}
    parameters: {{weight: [0.2, 0.8], density: 0.7}}
merge_method: ties
base_model: {base}
parameters: {{normalize: true}}
dtype: float32
"""


def test_recipe_over_model_folders_equals_the_recipe_over_single_files(tmp_path, repo):
    folders = {"a": HF / "tuned", "b": HF / "lora-merged", "base": HF / "fresh"}
    files = {k: single_file(v, tmp_path / f"{k}.safetensors") for k, v in folders.items()}
    write(tmp_path / "folders.yml", TIES_RECIPE.format(**folders))
    write(tmp_path / "files.yml", TIES_RECIPE.format(**files))
    repo.theta("merge-files", "--config", str(tmp_path / "folders.yml"), "-o", str(tmp_path / "merged"))
    repo.theta("merge-files", "--config", str(tmp_path / "files.yml"), "-o", str(tmp_path / "merged.safetensors"))
    got, index = read_folder(tmp_path / "merged")
    want = load_file(str(tmp_path / "merged.safetensors"))
    assert set(got) == set(want) and len(got) == 30
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    base_index = json.loads((HF / "fresh" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]  # the base model's shard layout
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (HF / "fresh" / name).read_bytes()
    changed = [n for n in want if not np.array_equal(want[n], load_file(str(files["base"]))[n])]
    # layer 0's 7 2-D weights (tuned) and the q/v projections of layers 1 and 2 (the LoRA)
    assert len(changed) == 11


def test_merge_files_takes_folders_and_keeps_the_first_models_layout_without_a_base(tmp_path, repo):
    out = tmp_path / "avg"
    repo.theta("merge-files", "--operator", "linear", str(HF / "resharded"), str(HF / "lora-merged"), "-o", str(out))
    got, index = read_folder(out)
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    a, b = read_folder(HF / "resharded")[0], read_folder(HF / "lora-merged")[0]
    for name, value in got.items():
        np.testing.assert_allclose(
            value, (a[name].astype(np.float64) + b[name]) / 2, rtol=1e-6, atol=1e-7, err_msg=name
        )
    proc = repo.theta(
        "merge-files", "--operator", "linear", str(HF / "resharded"), str(HF / "lora-merged"), "-o", str(out)
    )
    assert proc.returncode == 0  # writing again over our own folder is fine
    # a trainer's output folder: the safetensors model is the model, training_args.bin is not

    trained = tmp_path / "trained"
    shutil.copytree(HF / "resharded", trained)
    (trained / "training_args.bin").write_bytes(b"not a model")
    repo.theta(
        "merge-files",
        "--operator",
        "linear",
        str(trained / "model.safetensors.index.json"),
        str(HF / "lora-merged"),
        "-o",
        str(tmp_path / "again.safetensors"),
    )
    again = load_file(str(tmp_path / "again.safetensors"))
    assert again.keys() == got.keys() and all(np.array_equal(again[n], got[n]) for n in got)


def test_model_folder_errors_name_the_file_and_leave_the_output_alone(tmp_path, repo):

    broken = tmp_path / "broken"
    shutil.copytree(HF / "tuned", broken)
    (broken / "model-00003-of-00012.safetensors").unlink()
    proc = repo.theta(
        "merge-files", "--operator", "linear", str(broken), str(HF / "fresh"), "-o", str(tmp_path / "x"), check=False
    )
    assert (
        proc.returncode != 0
        and "names shard model-00003-of-00012.safetensors, which is not in the folder" in proc.stderr
    )
    assert "hint:" in proc.stderr
    proc = repo.theta(
        "merge-files",
        "--operator",
        "linear",
        str(HF / "adapter"),
        str(HF / "tuned"),
        "-o",
        str(tmp_path / "x"),
        check=False,
    )
    assert proc.returncode == 2 and "holds a PEFT adapter" in proc.stderr and "merge_and_unload" in proc.stderr
    assert not (tmp_path / "x").exists()
    lying = tmp_path / "lying"
    shutil.copytree(HF / "tuned", lying)
    index = json.loads((lying / "model.safetensors.index.json").read_text())
    shards = list(index["weight_map"].values())
    moved = next(n for n, s in index["weight_map"].items() if shards.count(s) > 1)  # its shard stays named
    actual = index["weight_map"][moved]
    other = next(s for s in shards if s != actual)
    index["weight_map"][moved] = other
    (lying / "model.safetensors.index.json").chmod(0o644)
    (lying / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = repo.theta(
        "merge-files", "--operator", "linear", str(lying), str(HF / "fresh"), "-o", str(tmp_path / "x"), check=False
    )
    assert proc.returncode != 0 and f"{moved!r} is in {actual}, not in {other}" in proc.stderr
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if s != actual}
    (lying / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = repo.theta(
        "merge-files", "--operator", "linear", str(lying), str(HF / "fresh"), "-o", str(tmp_path / "x"), check=False
    )
    assert proc.returncode != 0 and f"names no tensor of shard {actual}" in proc.stderr
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model-00001-of-00002.safetensors").write_bytes(b"keep me")
    proc = repo.theta(
        "merge-files", "--operator", "linear", str(HF / "tuned"), str(HF / "fresh"), "-o", str(taken), check=False
    )
    assert proc.returncode == 2 and "already holds other checkpoint files" in proc.stderr
    assert [p.name for p in taken.iterdir()] == ["model-00001-of-00002.safetensors"]
    assert (taken / "model-00001-of-00002.safetensors").read_bytes() == b"keep me"


def test_passthrough_slices_of_folders_write_a_resharded_folder(tmp_path, repo):

    write(
        tmp_path / "stack.yml",
        f"""
slices:
  - sources: [{{model: {HF / "fresh"}, layer_range: [0, 2]}}]
  - sources: [{{model: {HF / "tuned"}, layer_range: [1, 3]}}]
merge_method: passthrough
""",
    )
    repo.theta("merge-files", "--config", str(tmp_path / "stack.yml"), "-o", str(tmp_path / "stacked"))
    got, index = read_folder(tmp_path / "stacked")
    fresh, tuned = read_folder(HF / "fresh")[0], read_folder(HF / "tuned")[0]
    name = "model.layers.{}.self_attn.q_proj.weight"
    for j, (src, layer) in enumerate([(fresh, 0), (fresh, 1), (tuned, 1), (tuned, 2)]):
        np.testing.assert_array_equal(got[name.format(j)], src[name.format(layer)])
    assert not any(name.format(4) in n for n in got)
    assert len(set(index["weight_map"].values())) > 1  # re-sharded at the base's largest shard size
    config = json.loads((tmp_path / "stacked" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert json.loads((HF / "fresh" / "config.json").read_text())["num_hidden_layers"] == 3


def test_passthrough_slices_through_git_theta_merge_config_commit_a_merge(files, repo):
    """A sliced recipe on branches stacks the same layers as merge-files on the checked-out files,
    and commits them as a merge of the slices' branches."""
    folder, models = files
    _branches(repo, models)
    stack = """
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources: [{{model: {b}, layer_range: [1, 4], parameters: {{scale: 2.0}}}}]
merge_method: passthrough
"""
    write(folder / "on-files.yml", stack.format(a="a.safetensors", b="b.safetensors"))
    repo.theta("merge-files", "--config", str(folder / "on-files.yml"), "-o", "stacked.safetensors", cwd=folder)
    write(folder / "on-branches.yml", stack.format(a="a", b="theirs"))
    repo.git("checkout", "-q", "a")
    plan = repo.theta("merge", "--config", str(folder / "on-branches.yml"), "theirs=b", "--dry-run", "--json")
    planned = {t["name"]: t["params"]["scale"] for t in json.loads(plan.stdout)["files"][0]["tensors"]}
    assert planned["model.layers.5.mlp.up_proj.weight"] == [2.0] and planned["model.layers.2.mlp.up_proj.weight"] == [
        1.0
    ]
    assert repo.git("rev-parse", "HEAD").stdout == repo.git("rev-parse", "a").stdout
    proc = repo.theta("merge", "--config", str(folder / "on-branches.yml"), "theirs=b")
    assert "Merge made by git theta merge (2 parents" in proc.stdout
    assert repo.git("rev-parse", "HEAD^2").stdout.strip() == repo.git("rev-parse", "b").stdout.strip()
    got = load_file(str(repo.file("model.safetensors")))
    want = load_file(str(folder / "stacked.safetensors"))
    assert set(got) == set(want) and len([n for n in got if n.endswith("q_proj.weight")]) == 6
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    repo.git("checkout", "-q", "main")
    proc = repo.theta("merge", "--config", str(folder / "on-branches.yml"), "theirs=b", check=False)
    assert proc.returncode == 2 and "HEAD is none of the recipe's models" in proc.stderr


def test_sliced_recipe_on_a_sharded_model_in_git_is_refused_with_a_hint(tmp_path, repo):

    shutil.copytree(HF / "fresh", repo.file("llama"), copy_function=shutil.copy)
    for p in repo.file("llama").iterdir():
        p.chmod(0o644)
    repo.commit("llama")
    write(
        tmp_path / "stack.yml",
        "slices:\n  - sources: [{model: main, layer_range: [0, 2]}]\n"
        "  - sources: [{model: main, layer_range: [1, 3]}]\nmerge_method: passthrough\n",
    )
    head = repo.git("rev-parse", "HEAD").stdout
    proc = repo.theta("merge", "--config", str(tmp_path / "stack.yml"), check=False)
    assert proc.returncode == 2 and "slices need whole models; llama is a model of 12 shards" in proc.stderr
    assert "git theta merge-files --config" in proc.stderr and repo.git("rev-parse", "HEAD").stdout == head
