"""git theta diff: numbers against numpy, the JSON schema, sides (work tree, index, revisions),
files and tensors added/removed/renamed, --stat without loading, the git diff driver, the plot."""

import json
import shutil

import jsonschema
import numpy as np
import pytest
from conftest import GIT_THETA, random_state_dict, save_safetensors
from hypothesis import given, settings
from hypothesis import strategies as st

from git_theta.tensors import bits
from git_theta.diff import stats as tensor_stats
from git_theta.diff.compare import group_of, natural_key

NUMBER = {"type": ["number", "null"]}
SIDE = {
    "type": ["object", "null"],
    "required": ["dtype", "shape", "digest", "update"],
    "properties": {"dtype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}}},
}
STATS = {
    "type": ["object", "null"],
    "required": list(tensor_stats.FIELDS),
    "properties": {k: NUMBER for k in tensor_stats.FIELDS},
    "additionalProperties": False,
}
SUMMARY_KEYS = [
    "tensors_old",
    "tensors_new",
    "unchanged",
    "changed",
    "added",
    "removed",
    "renamed",
    "dtype_changed",
    "shape_changed",
    "bytes_old",
    "bytes_new",
    "delta_l2",
    "relative_change",
    "fraction_changed",
    "elements_changed",
    "elements_compared",
]
SUMMARY = {
    "type": "object",
    "required": SUMMARY_KEYS,
    "properties": {k: NUMBER for k in SUMMARY_KEYS},
    "additionalProperties": False,
}
LAYOUT = {
    "type": "object",
    "required": ["files_old", "files_new", "moved", "resharded"],
    "properties": {
        "files_old": {"type": "integer"},
        "files_new": {"type": "integer"},
        "moved": {"type": "integer"},
        "resharded": {"type": "boolean"},
    },
    "additionalProperties": False,
}
# The documented --json schema (README, "Diffs, history and loading"; docs/models.md), version 2:
# entries are models (kind "model": several files, an index or an adapter) or one-file models (kind "file").
SCHEMA = {
    "type": "object",
    "required": ["schema", "old", "new", "stat", "by", "files"],
    "properties": {
        "schema": {"const": 2},
        "stat": {"type": "boolean"},
        "by": {"enum": ["model", "file"]},
        "files": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "path",
                    "old_path",
                    "status",
                    "kind",
                    "format",
                    "fields_changed",
                    "summary",
                    "groups",
                    "tensors",
                ],
                "if": {"properties": {"kind": {"const": "model"}}},
                "then": {"required": ["layout", "shards_old", "shards_new", "index", "adapter_of"]},
                "properties": {
                    "kind": {"enum": ["file", "model"]},
                    "layout": LAYOUT,
                    "shards_old": {"type": "array", "items": {"type": "string"}},
                    "shards_new": {"type": "array", "items": {"type": "string"}},
                    "index": {"type": ["string", "null"]},
                    "adapter_of": {"type": ["string", "null"]},
                    "status": {"enum": ["modified", "added", "removed", "renamed"]},
                    "summary": SUMMARY,
                    "groups": {"type": "array", "items": {"type": "object", "required": ["name", *SUMMARY_KEYS]}},
                    "tensors": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": [
                                "name",
                                "status",
                                "group",
                                "old",
                                "new",
                                "dtype_changed",
                                "shape_changed",
                                "stats",
                            ],
                            "properties": {
                                "status": {"enum": ["changed", "added", "removed", "renamed"]},
                                "old": SIDE,
                                "new": SIDE,
                                "stats": STATS,
                            },
                        },
                    },
                },
            },
        },
    },
}


def expected_stats(old, new):
    """The numbers, computed plainly in numpy float64 (what the README's formulas say)."""
    o, n = old.astype(np.float64).ravel(), new.astype(np.float64).ravel()
    d = n - o
    no, nn = np.linalg.norm(o), np.linalg.norm(n)
    return {
        "delta_l2": np.linalg.norm(d),
        "relative_change": np.linalg.norm(d) / no if no else None,  # undefined: reported as null
        "max_abs_delta": np.abs(d).max(),
        "cosine": o @ n / (no * nn) if no and nn else None,
        "fraction_changed": np.mean(old.ravel() != new.ravel()),
    }


def assert_stats(stats, old, new):
    for key, value in expected_stats(old, new).items():
        if value is None:
            assert stats[key] is None, key
        else:
            assert stats[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


# -- pure pieces ---------------------------------------------------------------------------------
def test_stats_match_numpy_f32_int_and_dtype_change():
    rng = np.random.default_rng(1)
    old = rng.standard_normal((7, 5)).astype(np.float32)
    new = old.copy()
    new[2] += 0.5
    stats = tensor_stats.compare(old.tobytes(), "F32", new.tobytes(), "F32", old.shape)
    assert_stats(stats, old, new)
    assert stats["elements_changed"] == 5 and stats["elements"] == 35
    ints_old = np.arange(12, dtype=np.int32)
    ints_new = ints_old * np.array([1, 2] * 6, dtype=np.int32)
    assert_stats(tensor_stats.compare(ints_old.tobytes(), "I32", ints_new.tobytes(), "I32", (12,)), ints_old, ints_new)
    # A dtype change compares values: F32 -> F16 rounding is the whole change.
    as_f16 = old.astype(np.float16)
    stats = tensor_stats.compare(old.tobytes(), "F32", as_f16.tobytes(), "F16", old.shape)
    assert_stats(stats, old, as_f16.astype(np.float32))


def test_stats_bf16_complex_and_nonfinite():
    values = np.linspace(-2, 2, 64)
    old_raw = bits.from_float(values, "BF16")
    new_raw = bits.from_float(values * 1.5, "BF16")
    old_f = bits.to_float(old_raw, "BF16")
    new_f = bits.to_float(new_raw, "BF16")
    stats = tensor_stats.compare(old_raw, "BF16", new_raw, "BF16", (64,))
    assert_stats(stats, old_f, new_f)
    c_old = (np.arange(6) + 1j * np.arange(6)).astype(np.complex64)
    c_new = c_old + np.complex64(1 - 1j)
    stats = tensor_stats.compare(c_old.tobytes(), "C64", c_new.tobytes(), "C64", (6,))
    assert stats["delta_l2"] == pytest.approx(np.sqrt(6 * 2))
    assert stats["max_abs_delta"] == pytest.approx(np.sqrt(2))
    assert stats["cosine"] == pytest.approx(
        np.vdot(c_old, c_new).real / (np.linalg.norm(c_old) * np.linalg.norm(c_new))
    )
    # NaN/inf elements are counted, left out of the norms, and never make a number NaN.
    f_old = np.array([1.0, np.nan, 3.0, 4.0], np.float32)
    f_new = np.array([1.0, np.nan, np.inf, 5.0], np.float32)
    stats = tensor_stats.compare(f_old.tobytes(), "F32", f_new.tobytes(), "F32", (4,))
    assert stats["nonfinite"] == 2 and stats["delta_l2"] == pytest.approx(1.0)
    assert stats["fraction_changed"] == pytest.approx(0.5)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=40), st.integers(0, 39))
def test_stats_properties(values, position):
    old = np.array(values, np.float32)
    same = tensor_stats.compare(old.tobytes(), "F32", old.tobytes(), "F32", old.shape)
    assert same["delta_l2"] == 0 and same["fraction_changed"] == 0 and same["elements_changed"] == 0
    new = old.copy()
    new[position % len(old)] += np.float32(1.0)
    stats = tensor_stats.compare(old.tobytes(), "F32", new.tobytes(), "F32", old.shape)
    assert_stats(stats, old, new)


def test_groups_and_natural_order():
    assert group_of("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert group_of("model.embed_tokens.weight") == "model.embed_tokens"
    assert group_of("bias") == "bias"
    assert sorted(["l.10.w", "l.2.w", "l.1.w"], key=natural_key) == ["l.1.w", "l.2.w", "l.10.w"]


# -- end to end ----------------------------------------------------------------------------------
def _versions():
    """v1 and v2 of a small checkpoint with every kind of tensor change."""
    v1 = random_state_dict(
        seed=3,
        shapes={
            "model.layers.0.attn.weight": (16, 8),
            "model.layers.0.mlp.weight": (16, 8),
            "model.layers.1.attn.weight": (16, 8),
            "model.layers.1.mlp.weight": (16, 8),
            "model.embed.weight": (32, 8),
            "old.bias": (4,),
            "moved.bias": (6,),
            "reshaped": (4, 4),
        },
    )
    v2 = {k: v.copy() for k, v in v1.items()}
    v2["model.layers.0.attn.weight"] *= 1.01  # dense change
    v2["model.layers.1.mlp.weight"][3, :2] = 0.5  # sparse change
    v2["model.embed.weight"] = v2["model.embed.weight"].astype(np.float16)  # dtype change
    v2["reshaped"] = v2["reshaped"].reshape(2, 8)  # shape change
    del v2["old.bias"]  # removed
    v2["new.bias"] = np.ones(3, np.float32)  # added
    v2["renamed.bias"] = v2.pop("moved.bias")  # renamed (same bytes)
    return v1, v2


def _build_two_versions(repo):
    v1, v2 = _versions()
    save_safetensors(repo.file("model.safetensors"), v1)
    repo.commit("v1")
    save_safetensors(repo.file("model.safetensors"), v2)
    repo.commit("v2")


@pytest.fixture
def two_versions(cached_repo):
    repo = cached_repo("two-versions", _build_two_versions)
    return (repo, *_versions())


def by_name(file_entry):
    return {t["name"]: t for t in file_entry["tensors"]}


def test_diff_numbers_schema_and_text(two_versions):
    repo, v1, v2 = two_versions
    result = json.loads(repo.theta("diff", "HEAD~1", "HEAD", "--json").stdout)
    jsonschema.validate(result, SCHEMA)
    (f,) = result["files"]
    assert f["status"] == "modified" and f["format"] == "safetensors"
    t = by_name(f)
    assert sorted(t) == [
        "model.embed.weight",
        "model.layers.0.attn.weight",
        "model.layers.1.mlp.weight",
        "new.bias",
        "old.bias",
        "renamed.bias",
        "reshaped",
    ]
    assert t["new.bias"]["status"] == "added" and t["old.bias"]["status"] == "removed"
    assert t["renamed.bias"]["status"] == "renamed" and t["renamed.bias"]["old_name"] == "moved.bias"
    assert t["reshaped"]["shape_changed"] and t["reshaped"]["stats"] is None
    assert t["model.embed.weight"]["dtype_changed"]
    assert t["model.embed.weight"]["old"]["dtype"] == "F32" and t["model.embed.weight"]["new"]["dtype"] == "F16"
    for name in ("model.layers.0.attn.weight", "model.layers.1.mlp.weight"):
        assert_stats(t[name]["stats"], v1[name], v2[name])
    assert_stats(
        t["model.embed.weight"]["stats"], v1["model.embed.weight"], v2["model.embed.weight"].astype(np.float32)
    )
    assert t["model.layers.1.mlp.weight"]["stats"]["elements_changed"] == 2
    s = f["summary"]
    assert (s["changed"], s["added"], s["removed"], s["renamed"], s["unchanged"]) == (4, 1, 1, 1, 2)
    assert (s["dtype_changed"], s["shape_changed"]) == (1, 1)
    # File summary: over the tensors compared element by element (same shape on both sides).
    names = ["model.layers.0.attn.weight", "model.layers.1.mlp.weight", "model.embed.weight"]
    d2 = sum(np.sum((v2[n].astype(np.float64) - v1[n].astype(np.float64)) ** 2) for n in names)
    o2 = sum(np.sum(v1[n].astype(np.float64) ** 2) for n in names)
    assert s["relative_change"] == pytest.approx(np.sqrt(d2 / o2))
    compared = names + ["model.layers.0.mlp.weight", "model.layers.1.attn.weight"]
    changed = sum(int(np.sum(v1[n] != v2[n].astype(np.float32))) for n in names)
    assert s["fraction_changed"] == pytest.approx(changed / sum(v1[n].size for n in compared))
    groups = {g["name"]: g for g in f["groups"]}
    assert groups["model.layers.1"]["changed"] == 1 and groups["model.layers.1"]["tensors_new"] == 2
    assert groups["model.layers.1"]["fraction_changed"] == pytest.approx(2 / 256)
    assert "model.layers.0" in groups and "model.embed" in groups

    text = repo.theta("diff", "HEAD~1", "HEAD").stdout
    assert "\x1b[" not in text  # not a terminal: no colour
    rows = [line for line in text.splitlines() if line.strip() and line.strip()[0] in "~+->"]
    names_in_order = [r.split()[3] if r.strip()[0] == ">" else r.split()[1] for r in rows]  # "> old -> new"
    assert names_in_order == sorted(names_in_order, key=natural_key)
    attn = next(r for r in rows if "model.layers.0.attn.weight" in r)
    assert f"{t['model.layers.0.attn.weight']['stats']['relative_change']:.3e}" in attn
    # Columns line up: every numeric row has its relative change at the same position.
    numeric = [r for r in rows if "e-" in r]
    positions = {r.index(f"{by_name(f)[r.split()[1]]['stats']['relative_change']:.3e}") for r in numeric}
    assert len(positions) == 1
    coloured = repo.theta("diff", "HEAD~1", "HEAD", "--color", "always").stdout
    assert "\x1b[1mmodel.safetensors\x1b[0m" in coloured
    by_change = json.loads(repo.theta("diff", "HEAD~1", "HEAD", "--json", "--sort", "change").stdout)
    rel = [x["stats"]["relative_change"] for x in by_change["files"][0]["tensors"] if x["stats"]]
    assert rel == sorted(rel, reverse=True)


def test_stat_loads_nothing_and_missing_objects_are_clear(two_versions):
    repo, v1, v2 = two_versions
    store = repo.path / ".git" / "theta" / "objects"
    shutil.rmtree(store)  # --stat must not need a single object
    stat = repo.theta("diff", "--stat", "HEAD~1", "HEAD")
    assert "model.safetensors | 4 changed, 1 added, 1 removed, 1 renamed, 2 unchanged" in stat.stdout
    assert "M model.layers.1.mlp.weight" in stat.stdout and "A new.bias" in stat.stdout
    data = json.loads(repo.theta("diff", "--stat", "--json", "HEAD~1", "HEAD").stdout)
    jsonschema.validate(data, SCHEMA)
    assert data["stat"] and all(t["stats"] is None for t in data["files"][0]["tensors"])
    full = repo.theta("diff", "HEAD~1", "HEAD", check=False)
    assert full.returncode == 1
    assert "error: model.safetensors: tensor 'model." in full.stderr and "is missing" in full.stderr
    assert "hint:" in full.stderr and "Traceback" not in full.stderr
    # The git diff driver does not stop git: names and counts, and a warning saying why.
    repo.theta("install", "--local", "--diff")
    driver = repo.git("diff", "HEAD~1", "HEAD")
    assert "M model.layers.1.mlp.weight" not in driver.stdout and "model.layers.1.mlp.weight" in driver.stdout
    assert "warning: numbers unavailable:" in driver.stdout and "is missing" in driver.stdout


def test_plain_git_diff_stat_counts_tensors(two_versions):
    repo, _, _ = two_versions
    out = repo.git("diff", "--numstat", "HEAD~1", "HEAD").stdout.split()
    # One manifest line per tensor: changed and renamed tensors are one line out and one in.
    # 4 changed + 1 renamed + 1 added + the new pack line / 4 changed + 1 renamed + 1 removed
    assert out[:2] == ["7", "6"]
    assert "+pack " in repo.git("diff", "HEAD~1", "HEAD").stdout
    patch = repo.git("log", "-p", "-1").stdout
    assert "+tensor new.bias F32 [3]" in patch and "-tensor old.bias F32 [4]" in patch


def test_worktree_index_and_files_added_removed_renamed(repo):
    v1, v2 = _versions()
    save_safetensors(repo.file("a.safetensors"), v1)
    save_safetensors(repo.file("gone.safetensors"), random_state_dict(seed=5))
    repo.commit("base")
    save_safetensors(repo.file("a.safetensors"), v2)
    # Work tree vs index: the modified file, cleaned in-process, numbers included.
    wt = json.loads(repo.theta("diff", "--json").stdout)
    assert (wt["old"], wt["new"]) == (":index", ":worktree")
    (f,) = wt["files"]
    assert_stats(
        by_name(f)["model.layers.0.attn.weight"]["stats"],
        v1["model.layers.0.attn.weight"],
        v2["model.layers.0.attn.weight"],
    )
    assert json.loads(repo.theta("diff", "--cached", "--json").stdout)["files"] == []
    repo.git("add", "a.safetensors")
    repo.git("mv", "gone.safetensors", "sub.safetensors")
    save_safetensors(repo.file("new.safetensors"), {"w": np.zeros(4, np.float32)})
    repo.git("add", "new.safetensors")
    assert json.loads(repo.theta("diff", "--json").stdout)["files"] == []
    cached = json.loads(repo.theta("diff", "--cached", "--json").stdout)
    jsonschema.validate(cached, SCHEMA)
    status = {f["path"]: (f["status"], f["old_path"]) for f in cached["files"]}
    assert status == {
        "a.safetensors": ("modified", "a.safetensors"),
        "new.safetensors": ("added", "new.safetensors"),
        "sub.safetensors": ("renamed", "gone.safetensors"),
    }
    new_file = next(f for f in cached["files"] if f["path"] == "new.safetensors")
    assert new_file["summary"]["added"] == 1 and new_file["tensors"][0]["status"] == "added"
    # One revision: that revision vs the work tree; a path limits the files.
    repo.git("commit", "-q", "-m", "next")
    repo.git("rm", "-q", "sub.safetensors")
    one = json.loads(repo.theta("diff", "HEAD", "--json", "--", "sub.safetensors").stdout)
    assert [(f["path"], f["status"]) for f in one["files"]] == [("sub.safetensors", "removed")]
    assert one["files"][0]["summary"]["removed"] == 4
    assert repo.git("status", "--porcelain").stdout == "D  sub.safetensors\n"


def test_git_diff_driver_prints_summary(two_versions):
    repo, v1, v2 = two_versions
    repo.theta("install", "--local", "--diff")
    assert repo.git("config", "diff.theta.command").stdout.strip() == f"{GIT_THETA} diff-driver"
    out = repo.git("diff", "HEAD~1", "HEAD").stdout
    assert out.startswith("diff --theta a/model.safetensors b/model.safetensors")
    assert "model.layers.0.attn.weight" in out and "rel.change" in out
    assert "tensor model." not in out  # the summary, not manifest lines
    # --stat still counts manifest lines; --no-ext-diff shows them.
    assert repo.git("diff", "--numstat", "HEAD~1", "HEAD").stdout.split()[:2] == ["7", "6"]  # + the new pack line
    assert "+tensor new.bias" in repo.git("diff", "--no-ext-diff", "HEAD~1", "HEAD").stdout
    # Work tree side: git hands over the checkpoint itself, which the driver cleans.
    v3 = {k: v.copy() for k, v in v2.items()}
    v3["new.bias"] *= 2
    save_safetensors(repo.file("model.safetensors"), v3)
    wt = repo.git("diff").stdout
    assert "new.bias" in wt and "model.layers.0" not in wt
    assert f"{np.linalg.norm(v3['new.bias'] - v2['new.bias']):.3e}" in wt
    # A rename: git passes 9 arguments (the new path and the similarity line).
    repo.git("checkout", "-q", "--", "model.safetensors")
    repo.git("mv", "model.safetensors", "moved.safetensors")
    renamed = repo.git("diff", "--cached", "-M").stdout
    assert renamed.startswith("diff --theta a/model.safetensors b/moved.safetensors")
    assert "model.safetensors -> moved.safetensors (renamed)" in renamed and "8 unchanged" in renamed
    repo.theta("uninstall", "--local")
    assert repo.git("config", "diff.theta.command", check=False).returncode == 1


def test_plot(two_versions, tmp_path):
    pytest.importorskip("matplotlib")
    repo, _, _ = two_versions
    png = tmp_path / "change.png"
    repo.theta("diff", "HEAD~1", "HEAD", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    import sys

    from git_theta.errors import UsageError
    from git_theta.diff.plot import plot_diff

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    diff = {"files": [{"path": "m", "tensors": [{"name": "a.0.w", "group": "a.0", "stats": {"relative_change": 0.1}}]}]}
    with pytest.raises(UsageError) as info:
        plot_diff(diff, "x.png")
    assert "matplotlib" in str(info.value) and "git-theta[plot]" in info.value.hint


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 300), st.data())
def test_sparse_shortcut_matches_full_comparison(size, data):
    """Numbers computed from a sparse delta alone equal those of the two whole tensors."""
    rng = np.random.default_rng(size)
    dtype = data.draw(st.sampled_from(["F32", "BF16", "F16", "I32"]))
    values = rng.standard_normal(size) * 3
    old = bits.from_float(values, dtype) if dtype in ("F32", "BF16", "F16") else values.astype("<i4").tobytes()
    old_bits = bits.as_bits(old, dtype)
    positions = np.unique(rng.integers(0, size, data.draw(st.integers(1, size))))
    new_bits = old_bits.copy()
    new_bits[positions] ^= rng.integers(1, 1 << 7, len(positions)).astype(old_bits.dtype)
    xor = (new_bits ^ old_bits)[positions]
    full = tensor_stats.accumulate(old, dtype, new_bits.tobytes(), dtype, (size,)).result()
    short = tensor_stats.sparse_accumulate(old, dtype, positions, xor)
    if short is None:  # a flipped bit made a NaN/inf: the caller falls back to the full comparison
        assert full["nonfinite"] > 0
        return
    for key, value in full.items():
        assert short.result()[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
