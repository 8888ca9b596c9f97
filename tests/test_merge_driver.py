"""The merge driver end to end: real git merges, rebases, cherry-picks of tracked checkpoints.

Numbers are checked against numpy on the operator's formula; every merge also checks what git
stores (a manifest), that the work-tree file is what a fresh checkout of the result gives, and
``git status``.
"""

import numpy as np
import pytest
from conftest import GIT_THETA, save_safetensors
from safetensors.numpy import load_file

from git_theta.manifest import Manifest
from git_theta.merge.config import build_config
from git_theta.merge.plan import decide
from git_theta.manifest import TensorEntry

MODEL = "model.safetensors"


def tensors(seed, **changes):
    rng = np.random.default_rng(seed)
    base = {
        "embed.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "layer.0.weight": rng.standard_normal((32, 8)).astype(np.float32),  # a sparse delta pays
        "layer.0.bias": rng.standard_normal(8).astype(np.float32),
        "head.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "step": np.array([7], dtype=np.int64),
    }
    base.update(changes)
    return base


def bump(t, scale, seed):
    return (t + scale * np.random.default_rng(seed).standard_normal(t.shape)).astype(t.dtype)


def branches(repo, base, ours, theirs, path=MODEL, extra=None):
    """Commit ``base`` on main, ``theirs`` on branch 'theirs' and ``ours`` on main."""
    save_safetensors(repo.file(path), base)
    repo.commit("base")
    repo.git("checkout", "-q", "-b", "theirs")
    save_safetensors(repo.file(path), theirs)
    if extra:
        extra("theirs")
    repo.commit("theirs")
    repo.git("checkout", "-q", "main")
    save_safetensors(repo.file(path), ours)
    if extra:
        extra("ours")
    repo.commit("ours")


def assert_merged_cleanly(repo, path=MODEL, load=True):
    stored = repo.show(f"HEAD:{path}")
    assert Manifest.parse(stored).tensors  # git stores a manifest
    assert repo.status() == ""
    data = repo.file(path).read_bytes()
    repo.file(path).unlink()
    repo.git("checkout", "--", path)  # a fresh smudge of the merge result
    assert repo.file(path).read_bytes() == data
    return load_file(str(repo.file(path))) if load else None


@pytest.fixture
def fine_tunes(repo):
    base = tensors(0)
    ours = dict(
        base,
        **{"layer.0.weight": bump(base["layer.0.weight"], 0.1, 1), "head.weight": bump(base["head.weight"], 0.1, 2)},
    )
    sparse = base["layer.0.weight"].copy()
    sparse[[0, 3, 5], [1, 2, 7]] += 1  # a few entries: stored as a delta of the base
    theirs = dict(
        base,
        **{
            "layer.0.weight": sparse,
            "embed.weight": bump(base["embed.weight"], 0.1, 4),
            "extra.weight": np.ones(3, np.float32),
        },
    )
    branches(repo, base, ours, theirs)
    return base, ours, theirs


def test_install_registers_the_driver(repo):
    driver = repo.git("config", "merge.theta.driver").stdout.strip()
    assert driver == f"{GIT_THETA} merge-driver %O %A %B %L %P"


def test_task_arithmetic_merge_through_git_merge(repo, fine_tunes):
    base, ours, theirs = fine_tunes
    # the inputs are stored as deltas of the base: the driver decodes through the chain
    assert Manifest.parse(repo.show(f"theirs:{MODEL}")).tensors["layer.0.weight"].chain_depth > 0
    repo.git("config", "theta.merge.operator", "task_arithmetic")
    proc = repo.git("merge", "-q", "--no-edit", "theirs")
    assert "merged 1 by task_arithmetic" in proc.stderr
    out = assert_merged_cleanly(repo)
    name = "layer.0.weight"
    expected = base[name] + ((ours[name] - base[name]) + (theirs[name] - base[name]))
    np.testing.assert_array_equal(out[name], expected.astype(np.float32))
    # one side changed: taken bit for bit, no operator involved
    assert out["head.weight"].tobytes() == ours["head.weight"].tobytes()
    assert out["embed.weight"].tobytes() == theirs["embed.weight"].tobytes()
    assert out["extra.weight"].tobytes() == theirs["extra.weight"].tobytes()
    assert out["step"].tobytes() == base["step"].tobytes()
    assert len(repo.git("rev-list", "--parents", "-n1", "HEAD").stdout.split()) == 3


def test_no_operator_keeps_ours_lists_conflicts_and_abort_restores(repo, fine_tunes):
    base, ours, theirs = fine_tunes
    before = repo.file(MODEL).read_bytes()
    proc = repo.git("merge", "--no-edit", "theirs", check=False)
    assert proc.returncode == 1
    assert "layer.0.weight: changed in ours, theirs; no merge operator is configured" in proc.stderr
    assert "theta.merge.operator" in proc.stderr  # the hint says how to configure one
    # git's conflict state: three stages in the index, the file marked unmerged
    stages = {line.split()[2] for line in repo.git("ls-files", "-u").stdout.splitlines()}
    assert stages == {"1", "2", "3"}
    assert repo.status().startswith("UU ")
    # the work tree holds the rule-merged checkpoint, ours for the conflicting tensor
    out = load_file(str(repo.file(MODEL)))
    assert out["layer.0.weight"].tobytes() == ours["layer.0.weight"].tobytes()
    assert out["embed.weight"].tobytes() == theirs["embed.weight"].tobytes()
    repo.git("merge", "--abort")
    assert repo.file(MODEL).read_bytes() == before
    assert repo.status() == ""


def test_rules_attribute_and_rules_file(repo, fine_tunes):
    base, ours, theirs = fine_tunes
    # .thetamerge (committed data) says linear for layer.*; a git config rule says theirs for layer.0.*
    repo.file(".gitattributes").write_text(
        repo.file(".gitattributes").read_text() + "model.safetensors theta-merge=nope\n"
    )
    repo.git("config", "--add", "theta.merge.rule", "layer.0.* theirs")
    repo.file(".thetamerge").write_text("# rules\nlayer.* linear weight=3,1\n")
    repo.commit("merge settings")
    proc = repo.git("merge", "--no-edit", "theirs", check=False)
    # the attribute names an operator that does not exist: refused before anything is merged
    assert proc.returncode != 0 and "unknown merge operator 'nope'" in proc.stderr
    assert "valid operators:" in proc.stderr and "ties" in proc.stderr
    repo.git("merge", "--abort")
    repo.file(".gitattributes").write_text(repo.file(".gitattributes").read_text().replace("nope", "ties"))
    repo.commit("fix the attribute")
    repo.git("merge", "--no-edit", "theirs")
    out = assert_merged_cleanly(repo)
    assert out["layer.0.weight"].tobytes() == theirs["layer.0.weight"].tobytes()
    repo.git("reset", "-q", "--hard", "HEAD~1")
    repo.git("config", "--unset-all", "theta.merge.rule")
    repo.git("merge", "--no-edit", "theirs")
    out = assert_merged_cleanly(repo)
    name = "layer.0.weight"
    expected = (3 * ours[name] + 1 * theirs[name]) / 4
    np.testing.assert_allclose(out[name], expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_inputs_compute_in_float32(repo, dtype):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = torch.randn(32, 8, generator=g).to(getattr(torch, dtype))
    ours = (base.float() + 0.01 * torch.randn(32, 8, generator=g)).to(base.dtype)
    theirs = (base.float() - 0.03 * torch.randn(32, 8, generator=g)).to(base.dtype)
    for branch, value in (("main", base), ("theirs", theirs), ("main", ours)):
        if branch == "theirs":
            repo.git("checkout", "-q", "-b", "theirs")
        save_file({"w": value}, str(repo.file(MODEL)))
        repo.commit(branch)
        if branch == "theirs":
            repo.git("checkout", "-q", "main")
    repo.git(
        "-c",
        "theta.merge.operator=task_arithmetic",
        "-c",
        "theta.merge.weight=0.5,0.75",
        "merge",
        "--no-edit",
        "theirs",
    )
    assert_merged_cleanly(repo, load=False)
    from safetensors.torch import load_file as torch_load

    out = torch_load(str(repo.file(MODEL)))["w"]
    assert out.dtype == base.dtype
    b = base.float()
    expected = (b + 0.5 * (ours.float() - b) + 0.75 * (theirs.float() - b)).to(base.dtype)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_random_operator_is_reproducible_and_seed_overrides(repo, fine_tunes):
    repo.git("config", "theta.merge.operator", "dare_ties")
    repo.git("config", "theta.merge.density", "0.5")
    first = []
    for seed in (None, None, "7"):
        args = ["-c", f"theta.merge.seed={seed}"] if seed else []
        repo.git(*args, "merge", "-q", "--no-edit", "theirs")
        first.append(repo.show(f"HEAD:{MODEL}"))
        repo.git("reset", "-q", "--hard", "HEAD~1")
    assert first[0] == first[1]
    assert first[0] != first[2]


def test_criss_cross_builds_a_virtual_base_deterministically(repo):
    base = tensors(0)
    save_safetensors(repo.file(MODEL), base)
    repo.commit("base")
    repo.git("config", "theta.merge.operator", "linear")
    repo.git("checkout", "-q", "-b", "b")
    save_safetensors(repo.file(MODEL), dict(base, **{"layer.0.weight": bump(base["layer.0.weight"], 0.1, 1)}))
    repo.commit("b1")
    repo.git("checkout", "-q", "main")
    save_safetensors(repo.file(MODEL), dict(base, **{"layer.0.weight": bump(base["layer.0.weight"], 0.1, 2)}))
    repo.commit("a1")
    repo.git("branch", "a1")
    repo.git("merge", "-q", "--no-edit", "b")  # main: A2 = merge(a1, b1)
    repo.git("checkout", "-q", "b")
    repo.git("merge", "-q", "--no-edit", "a1")  # b: B2 = merge(b1, a1): a criss-cross
    for branch, seed in (("b", 3), ("main", 4)):
        repo.git("checkout", "-q", branch)
        current = load_file(str(repo.file(MODEL)))
        current["layer.0.weight"] = bump(current["layer.0.weight"], 0.1, seed)
        save_safetensors(repo.file(MODEL), current)
        repo.commit(f"{branch} 3")
    bases = repo.git("merge-base", "--all", "main", "b").stdout.split()
    assert len(bases) == 2
    # log the marker size git passes: 9 for the virtual base, 7 for the outer merge
    driver = repo.git("config", "merge.theta.driver").stdout.strip()
    repo.git("config", "merge.theta.driver", f"echo %L >> .git/markers.log && {driver}")
    results = []
    for attempt in range(2):
        repo.git("merge", "-q", "--no-edit", "b")
        results.append(repo.show(f"HEAD:{MODEL}"))
        if attempt == 0:
            assert_merged_cleanly(repo)
            repo.git("reset", "-q", "--hard", "HEAD~1")
    assert results[0] == results[1]
    assert (repo.path / ".git" / "markers.log").read_text().split() == ["9", "7", "9", "7"]


def test_cherry_pick_and_rebase_resolve_by_the_structural_rules(repo):
    base = tensors(0)
    save_safetensors(repo.file(MODEL), base)
    repo.commit("base")
    repo.git("checkout", "-q", "-b", "topic")
    topic = dict(base, **{"head.weight": bump(base["head.weight"], 0.1, 1)})
    save_safetensors(repo.file(MODEL), topic)
    pick = repo.commit("topic: head")
    repo.git("checkout", "-q", "main")
    main = dict(base, **{"embed.weight": bump(base["embed.weight"], 0.1, 2)})
    save_safetensors(repo.file(MODEL), main)
    repo.commit("main: embed")
    repo.git("cherry-pick", pick)  # no operator configured: nothing changed on both sides
    out = assert_merged_cleanly(repo)
    assert out["head.weight"].tobytes() == topic["head.weight"].tobytes()
    assert out["embed.weight"].tobytes() == main["embed.weight"].tobytes()
    repo.git("reset", "-q", "--hard", "HEAD~1")
    repo.git("checkout", "-q", "topic")
    repo.git("rebase", "-q", "main")
    out = assert_merged_cleanly(repo)
    assert out["head.weight"].tobytes() == topic["head.weight"].tobytes()
    assert out["embed.weight"].tobytes() == main["embed.weight"].tobytes()
    assert repo.git("rev-parse", "HEAD~1").stdout == repo.git("rev-parse", "main").stdout


def test_conflicts_in_several_files_and_non_float_tensors(repo):
    base = tensors(0)

    def second(side):
        data = dict(base, step=np.array([8 if side == "ours" else 9], np.int64))
        save_safetensors(repo.file("other.safetensors"), data)

    save_safetensors(repo.file("other.safetensors"), base)
    ours = dict(base, **{"head.weight": bump(base["head.weight"], 0.1, 1)})
    theirs = dict(base, **{"head.weight": bump(base["head.weight"], 0.1, 2)})
    branches(repo, base, ours, theirs, extra=second)
    proc = repo.git("-c", "theta.merge.operator=ties", "merge", "--no-edit", "theirs", check=False)
    assert proc.returncode == 1
    assert "other.safetensors: 1 conflict(s)" in proc.stderr
    assert "step: changed in ours, theirs; I64 tensors are not merged arithmetically" in proc.stderr
    unmerged = {line.split("\t")[1] for line in repo.git("ls-files", "-u").stdout.splitlines()}
    assert unmerged == {"other.safetensors"}  # model.safetensors merged by ties, other conflicts
    repo.git("merge", "--abort")
    proc = repo.git("merge", "--no-edit", "theirs", check=False)
    unmerged = {line.split("\t")[1] for line in repo.git("ls-files", "-u").stdout.splitlines()}
    assert unmerged == {"other.safetensors", MODEL}
    assert "model.safetensors: 1 conflict(s)" in proc.stderr


def test_bad_input_shape_mismatch_missing_object_and_parameters(repo):
    repo.git("config", "theta.packThreshold", "0")  # loose objects, one per tensor (packs: test_packs.py)
    base = tensors(0)
    ours = dict(base, **{"head.weight": np.zeros((5, 8), np.float32), "layer.0.weight": base["layer.0.weight"] + 1})
    theirs = dict(base, **{"head.weight": np.zeros((6, 8), np.float32), "layer.0.weight": base["layer.0.weight"] - 1})
    branches(repo, base, ours, theirs)
    before = repo.file(MODEL).read_bytes()
    proc = repo.git("-c", "theta.merge.operator=linear", "merge", "--no-edit", "theirs", check=False)
    assert proc.returncode == 1
    assert "head.weight: changed to different dtypes or shapes (ours F32 [5,8]; theirs F32 [6,8])" in proc.stderr
    repo.git("merge", "--abort")
    for config, message in (
        ("theta.merge.density=1.5", "must be in [0.0, 1.0], got 1.5"),
        ("theta.merge.densty=0.5", "no merge operator has a parameter 'densty'"),
    ):
        proc = repo.git("-c", "theta.merge.operator=ties", "-c", config, "merge", "--no-edit", "theirs", check=False)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert "hint: parameters" in proc.stderr and "ties" in proc.stderr
        assert repo.status().startswith("UU ")
        repo.git("merge", "--abort")
        assert repo.file(MODEL).read_bytes() == before
    # a missing object: a clear error naming it, the file left as git leaves a conflict
    theirs_manifest = Manifest.parse(repo.show(f"theirs:{MODEL}"))
    oid = theirs_manifest.tensors["layer.0.weight"].objects[0].oid
    (repo.path / ".git" / "theta" / "objects" / oid[:2] / oid[2:4] / oid).unlink()
    proc = repo.git(
        "-c",
        "theta.merge.operator=linear",
        "-c",
        "theta.merge.rule=head.* ours",
        "merge",
        "--no-edit",
        "theirs",
        check=False,
    )
    assert proc.returncode == 1
    assert f"object {oid} is missing" in proc.stderr
    assert repo.status().startswith("UU ")
    repo.git("merge", "--abort")
    assert repo.file(MODEL).read_bytes() == before


def test_add_add_has_no_base(repo):
    repo.git("checkout", "-q", "--orphan", "other")
    repo.git("rm", "-q", "-rf", "--cached", ".")
    ones = {"w": np.ones((4, 4), np.float32)}
    save_safetensors(repo.file(MODEL), ones)
    repo.commit("other", MODEL, ".gitattributes")
    repo.git("checkout", "-q", "main")
    save_safetensors(repo.file(MODEL), {"w": np.full((4, 4), 3, np.float32)})
    repo.commit("main", MODEL)
    proc = repo.git(
        "-c", "theta.merge.operator=ties", "merge", "--allow-unrelated-histories", "--no-edit", "other", check=False
    )
    assert proc.returncode == 1 and "ties needs a base (no common base)" in proc.stderr
    repo.git("merge", "--abort")
    repo.git("-c", "theta.merge.operator=linear", "merge", "--allow-unrelated-histories", "--no-edit", "other")
    out = assert_merged_cleanly(repo)
    np.testing.assert_array_equal(out["w"], np.full((4, 4), 2, np.float32))


# --- the structural rules and the rules format, without git -----------------------------------


def entry(name, digest="0", dtype="F32", shape=(2,)):
    return TensorEntry(name, dtype, shape, digest * 64, "dense", ())


@pytest.mark.parametrize(
    "base, ours, theirs, action, reason",
    [
        ("a", "a", "a", "take", "unchanged"),
        ("a", "b", "a", "take", "changed only in ours"),
        ("a", "a", "b", "take", "changed only in theirs"),
        ("a", "b", "b", "take", "same change in ours, theirs"),
        ("a", None, "a", "take", "deleted in ours"),
        ("a", None, "b", "conflict", "deleted in ours, changed in theirs"),
        (None, "b", None, "take", "added in ours"),
        (None, "b", "c", "operate", "added in ours, theirs with different values"),
        ("a", "b", "c", "operate", "changed in ours, theirs"),
    ],
)
def test_structural_rules(base, ours, theirs, action, reason):
    make = lambda d: None if d is None else entry("t", d)  # noqa: E731
    decision = decide("t", make(base), [make(ours), make(theirs)], ["ours", "theirs"])
    assert (decision.action, decision.reason) == (action, reason)
    assert decision.use_base == (action == "operate" and base is not None)


def test_structural_rules_dtype_and_shape():
    base = entry("t", "a")
    both_resized = [entry("t", "b", shape=(3,)), entry("t", "c", shape=(3,))]
    decision = decide("t", base, both_resized, ["ours", "theirs"])
    assert decision.action == "operate" and not decision.use_base
    decision = decide("t", base, [entry("t", "b", dtype="I32"), entry("t", "c", dtype="I32")], ["ours", "theirs"])
    assert decision.action == "conflict" and "I32 tensors are not merged" in decision.reason


def test_rules_format_and_precedence():
    config = build_config(
        [("operator", "ties"), ("density", "0.2"), ("rule", "lm_head.* ours"), ("select-topk", "0.5")],
        rules_text="# comment\n\nmodel.embed_tokens.* linear weight=1,2\n*.norm theirs\n",
    )
    assert config.params == {"density": "0.2", "select_topk": "0.5"}
    assert config.choose(MODEL, "lm_head.weight").operator == "ours"
    choice = config.choose(MODEL, "model.embed_tokens.weight")
    assert (choice.operator, choice.params["weight"], choice.strict) == ("linear", "1,2", frozenset({"weight"}))
    assert config.choose(MODEL, "model.layers.0.norm").operator == "theirs"
    assert config.choose(MODEL, "model.layers.0.mlp").operator == "ties"
    config.attributes[MODEL] = "slerp"
    assert config.choose(MODEL, "model.layers.0.mlp").operator == "slerp"
    from git_theta.errors import ConfigError

    with pytest.raises(ConfigError, match="malformed merge rule"):
        build_config([("rule", "lonely")])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        build_config([], rules_text="x linear weight\n")


def test_config_scope_git_config_notes_explicit_param_errors_typos_refused():
    """A git config parameter applies where it is taken and is noted elsewhere; only --param (or a
    name no operator has) is an error, naming where the value came from."""
    from git_theta.errors import UsageError
    from git_theta.merge.engine import check_config

    notes = check_config(build_config([("rule", "embed.* ours"), ("rule", "layer.* linear"), ("density", "0.2")]))
    assert notes == ["git config theta.merge.density is ignored by linear, which does not take 'density'"]
    notes = check_config(build_config([("density", "0.2")], operator="task_arithmetic"))
    assert notes == ["git config theta.merge.density is ignored by task_arithmetic, which does not take 'density'"]
    assert check_config(build_config([("density", "0.2")], operator="ties")) == []
    with pytest.raises(UsageError, match=r"has no parameter 'density' \(from --param density=0.2\)"):
        check_config(build_config([], operator="task_arithmetic", params={"density": "0.2"}))
    with pytest.raises(UsageError, match="git config theta.merge.densty: no merge operator has a parameter 'densty'"):
        check_config(build_config([("densty", "0.2")], operator="ties"))
    check_config(build_config([("rule", "layer.* ties"), ("rule", "* linear"), ("density", "0.2")]))
    check_config(build_config([("operator", "auto"), ("density", "0.2")]))


def test_structural_rules_properties():
    """For any base/ours/theirs: an unchanged side yields the other; the rules are symmetric."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    version = st.one_of(st.none(), st.sampled_from("abc"))

    @settings(max_examples=60, deadline=None)
    @given(version, version, version)
    def check(base, ours, theirs):
        make = lambda d: None if d is None else entry("t", d)  # noqa: E731
        forward = decide("t", make(base), [make(ours), make(theirs)], ["x", "y"])
        backward = decide("t", make(base), [make(theirs), make(ours)], ["y", "x"])
        assert forward.action == backward.action
        if ours == base:
            assert forward.action == "take" and forward.entry == make(theirs)
        if theirs == base or ours == theirs:
            assert forward.action == "take" and forward.entry == make(ours)
        if forward.action == "take":
            assert forward.entry == backward.entry
        if forward.action == "operate":
            assert None not in (ours, theirs) and len({base, ours, theirs}) == 3

    check()


def test_file_level_fields_follow_the_same_rules():
    from git_theta.merge.engine import merge_manifests

    def manifest(metadata):
        return Manifest("safetensors", fields={"metadata": metadata} if metadata else {}, tensors={"t": entry("t")})

    config = build_config([])
    base = manifest('{"step":"1"}')
    one_side = merge_manifests(MODEL, base, [base, manifest('{"step":"2"}')], ["ours", "theirs"], config, None)
    assert one_side.manifest.fields == {"metadata": '{"step":"2"}'} and not one_side.conflicts
    both = merge_manifests(
        MODEL, base, [manifest('{"step":"3"}'), manifest('{"step":"2"}')], ["ours", "theirs"], config, None
    )
    assert both.manifest.fields == {"metadata": '{"step":"3"}'}  # ours kept
    assert [(o.name, o.reason) for o in both.conflicts] == [
        ("field:metadata", "file-level field changed in ours, theirs")
    ]
    deleted = merge_manifests(MODEL, base, [manifest(None), base], ["ours", "theirs"], config, None)
    assert deleted.manifest.fields == {} and not deleted.conflicts
