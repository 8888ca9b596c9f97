"""The fisher merge operator: the formula, its errors, and a real git merge reading fisher.safetensors."""

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from git_theta.plugin_api import Manifest, OperatorError, UsageError, get_plugin, resolve_params
from git_theta_fisher.operator import FISHER_FILE, FisherMerge


def reference(models, fishers, weights, epsilon):
    """Matena & Raffel's Fisher-weighted average, written out with float64 sums."""
    scaled = [w * (f.astype(np.float64) + epsilon) for f, w in zip(fishers, weights)]
    return (sum(s * m for s, m in zip(scaled, models)) / sum(scaled)).astype(np.float32)


def run(models, fishers, **raw):
    op = FisherMerge()
    params = resolve_params(op, raw, len(models))
    return op.merge(models, None, params, None, side={FISHER_FILE: fishers})


def test_is_the_registered_fisher_operator():
    op = get_plugin("merge", "fisher")
    assert isinstance(op, FisherMerge) and op.side_files == (FISHER_FILE,)


@pytest.mark.parametrize("n", [2, 3])
def test_matches_the_formula(n):
    rng = np.random.default_rng(n)
    models = [rng.standard_normal((5, 7)).astype(np.float32) for _ in range(n)]
    fishers = [rng.exponential(size=(5, 7)).astype(np.float32) for _ in range(n)]
    weights = list(rng.uniform(0.2, 2.0, size=n))
    out = run(models, fishers, weight=",".join(map(str, weights)), epsilon="1e-3")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference(models, fishers, weights, 1e-3), rtol=1e-6)


def test_high_fisher_wins_and_zero_fisher_is_the_plain_average():
    ours, theirs = np.full(4, 1.0, np.float32), np.full(4, 3.0, np.float32)
    confident = np.array([1e6, 0, 0, 1], np.float32)
    unsure = np.array([0, 1e6, 0, 1], np.float32)
    out = run([ours, theirs], [confident, unsure])
    np.testing.assert_allclose(out, [1.0, 3.0, 2.0, 2.0], rtol=1e-5)


def test_missing_or_bad_fisher_is_an_error():
    model = np.zeros(3, np.float32)
    with pytest.raises(OperatorError, match="no Fisher information for model 2") as info:
        run([model, model], [np.ones(3, np.float32), None])
    assert FISHER_FILE in info.value.hint
    with pytest.raises(OperatorError, match="shape"):
        run([model, model], [np.ones(3, np.float32), np.ones(4, np.float32)])
    with pytest.raises(OperatorError, match="negative or NaN"):
        run([model, model], [np.ones(3, np.float32), np.array([1, np.nan, 1], np.float32)])
    with pytest.raises(OperatorError, match="is 0 for every model"):
        run([model, model], [np.zeros(3, np.float32)] * 2, epsilon="0")
    with pytest.raises(UsageError, match="weights sum to 0"):
        FisherMerge().validate(resolve_params(FisherMerge(), {"weight": "0,0"}, 2), 2)


def fine_tunes(repo):
    """Base, then a fine-tune on branch 'theirs' and one on main, each with its own fisher file."""
    rng = np.random.default_rng(0)
    shapes = {"layer.weight": (6, 4), "layer.bias": (4,), "head.weight": (2, 4)}
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    ours = dict(base, **{"layer.weight": base["layer.weight"] + 0.5, "head.weight": base["head.weight"] - 1})
    theirs = dict(base, **{"layer.weight": base["layer.weight"] - 0.5, "layer.bias": base["layer.bias"] * 2})
    fisher_ours = {n: rng.exponential(size=s).astype(np.float32) for n, s in shapes.items()}
    fisher_theirs = {n: rng.exponential(size=s).astype(np.float32) * 10 for n, s in shapes.items()}

    with open(repo.file(".gitattributes"), "a") as attributes:
        attributes.write(f"model.safetensors theta-merge=fisher\n{FISHER_FILE} theta-merge=linear\n")
    save_file(base, str(repo.file("model.safetensors")))
    save_file({n: np.ones(s, np.float32) for n, s in shapes.items()}, str(repo.file(FISHER_FILE)))
    repo.commit("base")
    repo.git("checkout", "-q", "-b", "theirs")
    save_file(theirs, str(repo.file("model.safetensors")))
    save_file(fisher_theirs, str(repo.file(FISHER_FILE)))
    repo.commit("theirs")
    repo.git("checkout", "-q", "main")
    save_file(ours, str(repo.file("model.safetensors")))
    save_file(fisher_ours, str(repo.file(FISHER_FILE)))
    repo.commit("ours")
    return base, ours, theirs, fisher_ours, fisher_theirs


@pytest.mark.parametrize("command", [("merge", "-q", "--no-edit", "theirs"), ("cherry-pick", "theirs")])
def test_git_weights_each_side_by_its_fisher_file(repo, command):
    _, ours, theirs, fisher_ours, fisher_theirs = fine_tunes(repo)
    repo.git(*command)  # the merge driver finds each side's commit (HEAD, GITHEAD_* or a search)
    assert Manifest.parse(repo.show("HEAD:model.safetensors")).tensors
    assert repo.status() == ""
    merged = load_file(str(repo.file("model.safetensors")))
    # Changed on both sides: Fisher-weighted with each branch's own fisher.safetensors.
    expected = reference(
        [ours["layer.weight"], theirs["layer.weight"]],
        [fisher_ours["layer.weight"], fisher_theirs["layer.weight"]],
        [1.0, 1.0],
        1e-6,
    )
    np.testing.assert_allclose(merged["layer.weight"], expected, rtol=1e-6)
    assert not np.allclose(merged["layer.weight"], (ours["layer.weight"] + theirs["layer.weight"]) / 2)
    # Changed on one side only: taken as is.
    assert np.array_equal(merged["head.weight"], ours["head.weight"])
    assert np.array_equal(merged["layer.bias"], theirs["layer.bias"])
    # The Fisher files themselves were averaged by the linear operator.
    np.testing.assert_allclose(
        load_file(str(repo.file(FISHER_FILE)))["layer.weight"],
        (fisher_ours["layer.weight"] + fisher_theirs["layer.weight"]) / 2,
        rtol=1e-6,
    )


def test_octopus_merge_by_the_porcelain_reads_every_branch(repo):
    base, ours, theirs, fisher_ours, fisher_theirs = fine_tunes(repo)
    repo.git("checkout", "-q", "-b", "third", "HEAD~2")
    third = dict(base, **{"layer.weight": base["layer.weight"] * 3})
    fisher_third = {n: np.full(t.shape, 5.0, np.float32) for n, t in base.items()}
    save_file(third, str(repo.file("model.safetensors")))
    save_file(fisher_third, str(repo.file(FISHER_FILE)))
    repo.commit("third")
    repo.git("checkout", "-q", "main")

    repo.theta("merge", "theirs", "third")  # one octopus commit; the operator sees all three
    assert len(repo.git("log", "-1", "--format=%P").stdout.split()) == 3
    assert repo.status() == ""
    merged = load_file(str(repo.file("model.safetensors")))
    expected = reference(
        [ours["layer.weight"], theirs["layer.weight"], third["layer.weight"]],
        [fisher_ours["layer.weight"], fisher_theirs["layer.weight"], fisher_third["layer.weight"]],
        [1.0, 1.0, 1.0],
        1e-6,
    )
    np.testing.assert_allclose(merged["layer.weight"], expected, rtol=1e-6)
