"""Every merge operator against its formula (MERGE-OPERATORS.md), computed independently here.

The references below are written entry by entry / with plain float64 numpy so they share no code
with the operators; tensors are tiny so the tests are fast.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from git_theta import registry as plugins
from git_theta.errors import UsageError
from git_theta.merge.operator import MergeOperator, OperatorError
from git_theta.merge.operators.task_vectors import della_probabilities
from git_theta.merge.params import resolve

#: the built-in operators, as the issue names them
EXPECTED = {
    "ours", "theirs", "base", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
    "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "slerp", "nuslerp",
    "multislerp", "karcher", "model_stock", "sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion",
    "passthrough",
}  # fmt: skip
# The built-in operators (installed plugin packages, e.g. Fisher with its side data, test themselves).
ALL = sorted(row["name"] for row in plugins.describe() if row["kind"] == "merge" and row["builtin"])
RANDOM = ["dare_linear", "dare_ties", "della", "della_linear"]
#: random only to sample tensors of more than a million entries
SAMPLING = ["arcee_fusion"]
#: parameters without a default (mergekit requires them), for the tests that run every operator
NEEDED = {"nearswap": {"t": 0.3}}


def op(name):
    return plugins.get("merge", name)


def run(name, models, base=None, seed=0, **raw):
    operator = op(name)
    if operator.max_models == 1:  # passthrough: one input
        models = models[:1]
    raw = {**NEEDED.get(name, {}), **raw}
    params = resolve(operator, {k: str(v) for k, v in raw.items()}, len(models))
    rng = np.random.default_rng(seed) if operator.random else None
    # Operators that read side files (the fisher plugin) get neutral side tensors: ones per model.
    files = getattr(operator, "side_files", ())
    extra = {"side": {f: [np.ones_like(m) for m in models] for f in files}} if files else {}
    return operator.merge(models, base, params, rng, **extra)


def triple(shape=(6, 5), seed=0, dtype=np.float32, n=2):
    rng = np.random.default_rng(seed)
    base = np.asarray(rng.normal(size=shape), dtype=dtype)
    models = [np.asarray(base + rng.normal(size=shape), dtype=dtype) for _ in range(n)]
    return models, base


# ------------------------------------------------------------------------------------------------
# interface


def test_every_builtin_is_registered_with_its_name_and_documented():
    assert set(ALL) == EXPECTED
    for name in ALL:
        operator = op(name)
        assert isinstance(operator, MergeOperator) and operator.name == name
        assert operator.summary and operator.paper
        assert operator.random == (name in RANDOM or name in SAMPLING)


@pytest.mark.parametrize("name", sorted(set(ALL) - {"theirs"}))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inputs_untouched_and_dtype_and_shape_kept(name, dtype):
    models, base = triple(dtype=dtype)
    kept = [m.copy() for m in models], base.copy()
    out = run(name, models, base, density=0.5) if name in RANDOM else run(name, models, base)
    assert out.dtype == dtype and out.shape == base.shape
    assert all(np.array_equal(a, b) for a, b in zip(models, kept[0])) and np.array_equal(base, kept[1])
    assert all(out is not m for m in models) and out is not base


@pytest.mark.parametrize("name", sorted(set(ALL) - {"ours", "theirs", "base"}))
def test_float64_and_float32_agree(name):
    models64, base64 = triple(seed=3, dtype=np.float64)
    models32, base32 = [m.astype(np.float32) for m in models64], base64.astype(np.float32)
    raw = {"density": 0.5} if name in RANDOM else {}
    out64 = run(name, models64, base64, **raw)
    out32 = run(name, models32, base32, **raw)
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-4)


def test_pick_a_side():
    (a, b), o = triple()
    assert np.array_equal(run("ours", [a, b], o), a)
    assert np.array_equal(run("theirs", [a, b], o), b)
    assert np.array_equal(run("base", [a, b], o), o)


# ------------------------------------------------------------------------------------------------
# linear and task arithmetic


def test_linear_weighted_average():
    models, base = triple(n=3)
    w = [0.5, 0.3, 0.2]
    ref = sum(wi * m.astype(np.float64) for wi, m in zip(w, models)) / sum(w)
    np.testing.assert_allclose(run("linear", models, weight="0.5,0.3,0.2"), ref, rtol=1e-6, atol=1e-6)
    ref = sum(wi * m.astype(np.float64) for wi, m in zip([2, 2, 2], models))
    np.testing.assert_allclose(run("linear", models, weight=2, normalize="false"), ref, rtol=1e-6, atol=1e-6)


def test_task_arithmetic():
    (a, b), o = triple()
    a64, b64, o64 = (x.astype(np.float64) for x in (a, b, o))
    np.testing.assert_allclose(run("task_arithmetic", [a, b], o), a64 + b64 - o64, rtol=1e-5, atol=1e-6)
    ref = o64 + 0.5 * (0.7 * (a64 - o64) + 0.3 * (b64 - o64))
    out = run("task_arithmetic", [a, b], o, weight="0.7,0.3", **{"lambda": 0.5})
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    ref = o64 + (0.7 * (a64 - o64) + 0.3 * (b64 - o64)) / 1.0
    out = run("task_arithmetic", [a, b], o, weight="0.7,0.3", normalize="true")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # theirs unchanged: ours (up to float32 rounding of o + (a − o))
    np.testing.assert_allclose(run("task_arithmetic", [a, o], o), a, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# TIES and the sign election


def ref_topk(delta, density):
    """Keep the floor(density·n) (at least 1) largest |δ|; equal magnitudes: lowest index first."""
    flat = delta.ravel().tolist()
    n = len(flat)
    if density >= 1:
        return delta.copy()
    if density <= 0:
        return np.zeros_like(delta)
    k = max(1, int(density * n))
    order = sorted(range(n), key=lambda i: (-abs(flat[i]), i))
    keep = set(order[:k])
    return np.array([flat[i] if i in keep else 0.0 for i in range(n)]).reshape(delta.shape)


def ref_consensus(deltas, weights, method, normalize):
    """Entry by entry: elect a sign, sum the agreeing weighted deltas, divide by their weights."""
    flat = [[w * x for x in d.ravel().tolist()] for d, w in zip(deltas, weights)]
    out = []
    for j in range(len(flat[0])):
        col = [f[j] for f in flat]
        score = sum(col) if method == "sum" else sum(np.sign(col))
        elected = 1.0 if score >= 0 else -1.0
        agree = [i for i, v in enumerate(col) if np.sign(v) == elected]
        mixed = sum(col[i] for i in agree)
        divisor = sum(weights[i] for i in agree) or 1.0
        out.append(mixed / divisor if normalize else mixed)
    return np.array(out).reshape(deltas[0].shape)


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties_against_reference(density, consensus):
    models, base = triple(n=3, seed=5, dtype=np.float64)
    w = [1.0, 0.5, 2.0]
    deltas = [ref_topk(m - base, density) for m in models]
    ref = base + 0.8 * ref_consensus(deltas, w, consensus, normalize=True)
    out = run("ties", models, base, density=density, weight="1,0.5,2", consensus=consensus, **{"lambda": 0.8})
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    if density == 0:
        assert np.array_equal(out, base)


def test_ties_sign_election_ties_and_sum_vs_count():
    base = np.zeros(4, dtype=np.float32)
    a = np.array([1.0, -3.0, 2.0, 0.0], dtype=np.float32)
    b = np.array([-1.0, 1.0, -1.0, 0.0], dtype=np.float32)
    c = np.array([0.5, 1.0, -1.0, 0.0], dtype=np.float32)
    # two models, entry 0: 1 + (−1) = 0 → elected +1, only ours agrees → 1/1
    out = run("ties", [a, b], base)
    np.testing.assert_array_equal(out, [1.0, -3.0, 2.0, 0.0])
    # three models, entry 1: sum −1 → −1 (ours alone, −3); count +1 → theirs and c average to 1
    out_sum = run("ties", [a, b, c], base)
    out_count = run("ties", [a, b, c], base, consensus="count")
    np.testing.assert_array_equal(out_sum, [0.75, -3.0, 2.0, 0.0])
    np.testing.assert_array_equal(out_count, [0.75, 1.0, -1.0, 0.0])
    # a negative weight flips a model's sign before the election (mergekit applies weights first);
    # both then agree everywhere and the divisor 1 + (−1) = 0 is replaced by 1: a sum
    out = run("ties", [a, b], base, weight="1,-1")
    np.testing.assert_array_equal(out, [2.0, -4.0, 3.0, 0.0])


def test_ties_equal_magnitudes_break_at_the_kth_as_mergekits_sort():
    """mergekit keeps ``argsort(|δ| as float32, descending)[:k]``; torch's sort is not stable, so
    among magnitudes equal to the k-th the survivors are its sort's choice, not index order."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    base = np.zeros(5000, dtype=np.float32)
    a = (rng.integers(-3, 4, size=5000) / 4).astype(np.float32)  # 7 magnitudes: ties everywhere
    k = int(0.3 * a.size)
    keep = np.zeros(a.size, dtype=bool)
    keep[torch.argsort(torch.from_numpy(np.abs(a)), descending=True)[:k].numpy()] = True
    out = run("ties", [a], base, density=0.3)
    np.testing.assert_array_equal(out, np.where(keep, a, 0))
    index_order = np.abs(a) > np.sort(np.abs(a))[-k]
    index_order[np.flatnonzero(np.abs(a) == np.sort(np.abs(a))[-k])[: k - index_order.sum()]] = True
    assert not np.array_equal(keep, index_order)  # the case the rule matters for


def test_ties_theirs_unchanged_at_density_1_is_ours():
    (a, _), o = triple()
    np.testing.assert_allclose(run("ties", [a, o], o), a, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# DARE / DELLA (random) and breadcrumbs


def ref_rescale(delta, kept):
    before, after = np.abs(delta).sum(), np.abs(kept).sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * before / after


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_against_reference_with_the_same_draws(name):
    models, base = triple(shape=(8, 8), n=3, seed=7, dtype=np.float64)
    rng = np.random.default_rng(42)
    deltas = []
    for m in models:  # one uniform draw per model in order, keep where u < density
        d = m - base
        u = rng.random(d.shape, dtype=np.float32)
        deltas.append(ref_rescale(d, np.where(u < 0.3, d, 0.0)))
    w = [1.0, 1.0, 1.0]
    mixed = ref_consensus(deltas, w, "sum", False) if name == "dare_ties" else sum(deltas)
    out = run(name, models, base, seed=42, density=0.3)
    np.testing.assert_allclose(out, base + mixed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", RANDOM)
def test_random_operators_are_reproducible_from_the_seed(name):
    models, base = triple(shape=(16, 16), seed=1)
    first = run(name, models, base, seed=9, density=0.5)
    assert np.array_equal(first, run(name, models, base, seed=9, density=0.5))
    assert not np.array_equal(first, run(name, models, base, seed=10, density=0.5))
    # density 1 draws nothing: task arithmetic (linear) / TIES (ties variants)
    same = "ties" if name in ("dare_ties", "della") else "task_arithmetic"
    raw = {"normalize": "false"} if name == "dare_ties" else {}
    np.testing.assert_allclose(run(name, models, base, density=1), run(same, models, base, **raw), atol=1e-6)
    # density 0 keeps nothing: the base
    assert np.array_equal(run(name, models, base, density=0), base)


def test_dare_rescale_restores_each_task_vectors_l1_norm():
    (a, _), o = triple(shape=(32, 32), seed=2, dtype=np.float64)
    out = run("dare_linear", [a, o], o, seed=3, density=0.25)
    kept = out - o
    assert 0.15 < np.count_nonzero(kept) / kept.size < 0.35
    assert math.isclose(np.abs(kept).sum(), np.abs(a - o).sum(), rel_tol=1e-12)
    plain = run("dare_linear", [a, o], o, seed=3, density=0.25, rescale="false") - o
    assert set(np.flatnonzero(plain)) == set(np.flatnonzero(kept))
    np.testing.assert_array_equal(plain[plain != 0], (a - o)[plain != 0])


def test_della_probabilities_follow_rank_in_each_row():
    delta = np.array([[0.3, -0.1, 0.2], [5.0, -7.0, 6.0]], dtype=np.float32)
    p = della_probabilities(delta, 0.5, 0.1)
    np.testing.assert_allclose(p, [[0.6, 0.4, 0.5], [0.4, 0.6, 0.5]], rtol=1e-6)
    p1 = della_probabilities(np.array([1.0, -3.0, 2.0, 0.5]), 0.4, 0.15)
    np.testing.assert_allclose(p1, [0.35, 0.55, 0.45, 0.25])
    np.testing.assert_allclose(della_probabilities(np.ones((3, 1)), 0.5, 0.15), 0.5)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_against_reference_with_the_same_draws(name):
    models, base = triple(shape=(4, 10), n=2, seed=11, dtype=np.float64)
    rng = np.random.default_rng(5)
    deltas = []
    for m in models:
        d = m - base
        p = np.empty_like(d)
        for r, row in enumerate(np.abs(d)):
            ranks = np.argsort(np.argsort(row, kind="stable"), kind="stable")
            p[r] = 0.4 - 0.2 + 0.4 * ranks / (row.size - 1)
        u = rng.random(d.shape, dtype=np.float32)
        deltas.append(ref_rescale(d, np.where(u < p, d, 0.0)))
    mixed = ref_consensus(deltas, [1, 1], "sum", True) if name == "della" else sum(deltas)
    out = run(name, models, base, seed=5, density=0.4, epsilon=0.2)
    np.testing.assert_allclose(out, base + mixed, rtol=1e-12, atol=1e-12)


def test_random_operator_without_rng_is_a_programming_error():
    models, base = triple()
    operator = op("dare_linear")
    with pytest.raises(TypeError):
        operator.merge(models, base, resolve(operator, {"density": "0.5"}, 2), None)


def test_breadcrumbs_keeps_the_middle_band():
    base = np.zeros(100, dtype=np.float64)
    a = np.arange(1, 101, dtype=np.float64) * np.where(np.arange(100) % 2, -1, 1)
    a = a[np.random.default_rng(0).permutation(100)]
    out = run("breadcrumbs", [a, base], base, density=0.9, gamma=0.05)
    kept = np.abs(out[out != 0])
    # 90 kept, the 5 largest (96..100) and the 5 smallest (1..5) removed
    assert sorted(kept) == list(range(6, 96))
    # density + gamma > 1: the top cut shrinks, nothing is cut at the bottom
    out = run("breadcrumbs", [a, base], base, density=0.98, gamma=0.05)
    assert sorted(np.abs(out[out != 0])) == list(range(1, 99))
    # density 1 (the default) does nothing whatever gamma is
    np.testing.assert_array_equal(run("breadcrumbs", [a, base], base, gamma=0.3), a)
    # floor(gamma·n) = 0: no outlier removed, only the bottom
    out = run("breadcrumbs", [a, base], base, density=0.5, gamma=0.009)
    assert sorted(np.abs(out[out != 0])) == list(range(51, 101))


def test_breadcrumbs_ties_sums_agreeing_deltas():
    models, base = triple(shape=(10, 10), n=3, seed=4, dtype=np.float64)

    def band(d, density=0.8, gamma=0.1):
        order = np.argsort(np.abs(d).ravel(), kind="stable")
        keep = order[100 - 80 - 10 : 100 - 10]
        out = np.zeros(d.size)
        out[keep] = d.ravel()[keep]
        return out.reshape(d.shape)

    deltas = [band(m - base) for m in models]
    ref = base + ref_consensus(deltas, [1, 1, 1], "sum", False)
    out = run("breadcrumbs_ties", models, base, density=0.8, gamma=0.1)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# spherical family


def test_slerp_formula_and_ends():
    a = np.array([3.0, 0.0, 0.0], dtype=np.float32)
    b = np.array([0.0, 1.0, 0.0], dtype=np.float32)
    for t in (0.0, 0.25, 0.5, 1.0):
        # orthogonal: Ω = π/2 → out = cos(tπ/2)·a + sin(tπ/2)·b
        ref = math.cos(t * math.pi / 2) * a + math.sin(t * math.pi / 2) * b
        np.testing.assert_allclose(run("slerp", [a, b], t=t), ref, atol=1e-6)
    np.testing.assert_allclose(run("slerp", [a, b], t=0), a, atol=1e-6)  # ours is the t=0 end
    # 60° apart, unnormalised: sin((1−t)Ω)/sinΩ·a + sin(tΩ)/sinΩ·b
    c = np.array([1.0, math.sqrt(3), 0.0], dtype=np.float32)
    om = math.pi / 3
    ref = math.sin(0.7 * om) / math.sin(om) * a + math.sin(0.3 * om) / math.sin(om) * c
    np.testing.assert_allclose(run("slerp", [a, c], t=0.3), ref, rtol=1e-5)


def test_slerp_colinear_and_antipodal_fall_back_to_lerp():
    a = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    for b in (2.5 * a, -a, a + np.float32(1e-3)):
        np.testing.assert_allclose(run("slerp", [a, b], t=0.3), 0.7 * a + 0.3 * b, rtol=1e-6)
    zero = np.zeros(3, dtype=np.float32)  # zero norm is not normalised: cos = 0 → slerp at 90°
    np.testing.assert_allclose(run("slerp", [a, zero], t=0.5), math.sqrt(0.5) * a, rtol=1e-6)


def test_nuslerp_on_task_vectors():
    o = np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float64)
    a = o + np.array([2.0, 0.0, 0.0, 0.0])
    b = o + np.array([0.0, 1.0, 0.0, 0.0])
    # t = w_B/(w_A+w_B) = 0.25; orthogonal task vectors: cos(tπ/2)δA + sin(tπ/2)δB
    ref = o + math.cos(0.25 * math.pi / 2) * (a - o) + math.sin(0.25 * math.pi / 2) * (b - o)
    np.testing.assert_allclose(run("nuslerp", [a, b], o, weight="3,1"), ref, rtol=1e-12)
    # theirs unchanged: zero task vector → Ω = π/2, ours shrinks by sin(π/4)
    np.testing.assert_allclose(run("nuslerp", [a, o], o), o + math.sqrt(0.5) * (a - o), rtol=1e-12)
    # exactly colinear: lerp
    np.testing.assert_allclose(run("nuslerp", [a, o + 2 * (a - o)], o), o + 1.5 * (a - o), rtol=1e-12)
    # no base: slerp of the weights themselves
    np.testing.assert_allclose(run("nuslerp", [a - o, b - o], None, weight="3,1"), ref - o, rtol=1e-12)


def ref_slerp_rows(t, v0, v1):
    out = np.empty_like(v0)
    for r in range(v0.shape[0]):
        x, y = v0[r], v1[r]
        c = np.clip(x @ y / np.linalg.norm(x) / np.linalg.norm(y), -1, 1)
        om = math.acos(c)
        out[r] = (math.sin((1 - t) * om) * x + math.sin(t * om) * y) / math.sin(om)
    return out


def test_nuslerp_row_and_column_wise():
    (a, b), o = triple(shape=(3, 4), seed=8, dtype=np.float64)
    da, db = a - o, b - o
    out = run("nuslerp", [a, b], o, nuslerp_flatten="false")
    np.testing.assert_allclose(out, o + ref_slerp_rows(0.5, da, db), rtol=1e-10)
    out = run("nuslerp", [a, b], o, nuslerp_flatten="false", nuslerp_row_wise="true", weight="1,3")
    np.testing.assert_allclose(out, o + ref_slerp_rows(0.75, da.T, db.T).T, rtol=1e-10)


def test_multislerp():
    o = np.zeros(3)
    u1, u2 = np.array([2.0, 0.0, 0.0]), np.array([0.0, 4.0, 0.0])
    # two orthogonal, equal weights: the geodesic midpoint, scaled to the mean norm 3
    ref = np.array([1.0, 1.0, 0.0]) / math.sqrt(2) * 3
    np.testing.assert_allclose(run("multislerp", [u1, u2], o), ref, rtol=1e-7)
    # one tangent step with unequal weights: m̂ ∝ Σ wi ûi, τ = Σ wi (ûi − (ûi·m̂)m̂)
    w = np.array([0.8, 0.2])
    units = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    m = w @ units
    m /= np.linalg.norm(m)
    tau = w @ (units - np.outer(units @ m, m))
    nt = np.linalg.norm(tau) + 1e-8
    ref = (m * math.cos(nt) + tau * math.sin(nt) / nt) * (0.8 * 2 + 0.2 * 4)
    np.testing.assert_allclose(run("multislerp", [u1, u2], o, weight="4,1"), ref, rtol=1e-7)
    # cancelling directions: two inputs → linear, three → an error naming the fix
    np.testing.assert_allclose(run("multislerp", [u1, -u1], o), np.zeros(3), atol=1e-12)
    with pytest.raises(OperatorError, match="cancel"):
        run("multislerp", [u1, -u1, np.zeros(3)], o, weight="1,1,0")


def test_karcher_mean_on_the_sphere():
    e = np.eye(3)
    # symmetric: the mean direction is (1,1,1)/√3; scale = mean norm (1+2+3)/3
    out = run("karcher", [e[0], 2 * e[1], 3 * e[2]])
    np.testing.assert_allclose(out, np.ones(3) / math.sqrt(3) * 2, rtol=1e-6)
    # two points 90° apart: the geodesic midpoint
    out = run("karcher", [e[0], e[1]], max_iter=50, tol=1e-12)
    np.testing.assert_allclose(out, [math.sqrt(0.5), math.sqrt(0.5), 0], rtol=1e-9)
    # a zero input has no direction but still counts in the norm average
    out = run("karcher", [e[0], e[1], np.zeros(3)], max_iter=50, tol=1e-12)
    np.testing.assert_allclose(out, np.array([1, 1, 0]) / math.sqrt(2) * 2 / 3, rtol=1e-9)
    np.testing.assert_array_equal(run("karcher", [np.zeros(3), np.zeros(3)]), np.zeros(3))


def test_karcher_converges_to_the_fixed_point():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=5) + 3 for _ in range(4)]
    out = run("karcher", xs, max_iter=100, tol=1e-12)
    mu = out / np.linalg.norm(out)
    # first-order condition of the Karcher mean: Σ log_μ(ui) = 0
    grad = np.zeros(5)
    for x in xs:
        u = x / np.linalg.norm(x)
        phi = math.acos(np.clip(mu @ u, -1, 1))
        grad += phi / math.sin(phi) * (u - math.cos(phi) * mu)
    assert np.linalg.norm(grad) < 1e-9
    assert math.isclose(np.linalg.norm(out), np.mean([np.linalg.norm(x) for x in xs]), rel_tol=1e-9)


# ------------------------------------------------------------------------------------------------
# model stock and sce


def test_model_stock():
    o = np.array([1.0, 2.0, 3.0, 4.0])
    d1, d2 = np.array([1.0, 0.0, 0.0, 0.0]), np.array([1.0, 1.0, 0.0, 0.0])
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    ref = t * (o + (d1 + d2) / 2) + (1 - t) * o
    np.testing.assert_allclose(run("model_stock", [o + d1, o + d2], o), ref, rtol=1e-12)
    # three models: c = mean of the three pairwise cosines, t = 3c/(1+2c)
    d3 = np.array([0.0, 0.0, 2.0, 0.0])
    cs = [c, 0.0, 0.0]
    c3 = sum(cs) / 3
    t3 = 3 * c3 / (1 + 2 * c3)
    ref = t3 * (o + (d1 + d2 + d3) / 3) + (1 - t3) * o
    np.testing.assert_allclose(run("model_stock", [o + d1, o + d2, o + d3], o), ref, rtol=1e-12)


def test_model_stock_singular_denominator_and_zero_offsets_give_the_base():
    o = np.array([1.0, 2.0, 3.0])
    d = np.array([1.0, -1.0, 0.5])
    # c = −1 with N = 2: 1 + (N−1)c = 0 → t = 0
    np.testing.assert_array_equal(run("model_stock", [o + d, o - d], o), o)
    # theirs unchanged: zero offset → c = 0 → t = 0 → the base (ours is discarded, as mergekit)
    np.testing.assert_array_equal(run("model_stock", [o + d, o], o), o)
    # anti-correlated but not singular: t < 0 is not clamped
    out = run("model_stock", [o + d, o - 0.5 * d + np.array([0, 0, 0.01])], o)
    assert np.linalg.norm(out - o) > 0 and (out - o) @ d < 0


def test_model_stock_filter_wise():
    (a, b), o = triple(shape=(3, 4), seed=6, dtype=np.float64)
    ref = np.empty_like(o)
    for r in range(3):
        x, y = a[r] - o[r], b[r] - o[r]
        c = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
        t = 2 * c / (1 + c)
        ref[r] = t * (a[r] + b[r]) / 2 + (1 - t) * o[r]
    np.testing.assert_allclose(run("model_stock", [a, b], o, filter_wise="true"), ref, rtol=1e-10)


def test_sce():
    models, base = triple(shape=(5, 4), n=3, seed=12, dtype=np.float64)
    tvs = [m - base for m in models]
    var = np.var(np.stack(tvs), axis=0)
    k = int(np.count_nonzero(var) * 0.5)
    keep = np.zeros(var.size, bool)
    keep[np.argsort(-var.ravel(), kind="stable")[:k]] = True
    tvs = [np.where(keep.reshape(var.shape), t, 0.0) for t in tvs]
    energy = np.array([np.mean(t**2) for t in tvs])
    omega = energy / energy.sum()
    ref = np.empty(base.size)
    for j in range(base.size):
        col = [t.ravel()[j] for t in tvs]
        elected = 1.0 if sum(col) >= 0 else -1.0
        num = sum(om * v for om, v in zip(omega, col) if np.sign(v) == elected)
        den = sum(om for om, v in zip(omega, col) if np.sign(v) == elected)
        ref[j] = num / max(den, 1e-6)
    out = run("sce", models, base, select_topk=0.5)
    np.testing.assert_allclose(out, base + ref.reshape(base.shape), rtol=1e-10, atol=1e-12)
    # theirs unchanged: exactly ours
    np.testing.assert_allclose(run("sce", [models[0], base], base), models[0], rtol=1e-12)


def test_theirs_is_refused_for_octopus_merges():
    with pytest.raises(UsageError, match="exactly 2"):
        resolve(op("theirs"), {}, 3)


@pytest.mark.parametrize("shape", [(), (1,), (2, 3, 2)])
@pytest.mark.parametrize("name", sorted(set(ALL) - {"theirs"}))
def test_scalar_single_entry_and_3d_tensors(name, shape):
    models, base = triple(shape=shape, seed=13, n=min(3, op(name).max_models or 3))
    raw = {"density": 0.5} if name in RANDOM else {}
    out = run(name, models, base, **raw)
    assert isinstance(out, np.ndarray) and out.shape == shape and out.dtype == np.float32
    assert np.all(np.isfinite(out))


def test_breadcrumbs_equal_magnitudes_in_index_order():
    base = np.zeros(8, dtype=np.float32)
    a = np.array([1, -1, 1, -1, 1, -1, 1, -1], dtype=np.float32)
    # n_keep 4, n_top 2, n_bottom 2: stable ascending positions [2, 6) are indices 2..5
    out = run("breadcrumbs", [a, base], base, density=0.5, gamma=0.25)
    np.testing.assert_array_equal(out, [0, 0, 1, -1, 1, -1, 0, 0])


def test_della_ranks_along_dim_1_of_a_3d_tensor():
    delta = np.random.default_rng(3).normal(size=(2, 5, 3))
    p = della_probabilities(delta, 0.5, 0.2)
    ranks = np.argsort(np.argsort(np.abs(delta), axis=1, kind="stable"), axis=1, kind="stable")
    np.testing.assert_allclose(p, 0.3 + 0.4 * ranks / 4)


# ------------------------------------------------------------------------------------------------
# properties (MERGE-OPERATORS.md §11: which operators are symmetric in ours and theirs)

_finite = st.floats(-4, 4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=25, deadline=None)
@given(
    data=arrays(np.float32, (3, 7), elements=_finite),
    name=st.sampled_from(["linear", "task_arithmetic", "ties", "model_stock", "sce", "karcher", "multislerp"]),
    density=st.sampled_from([0.3, 1.0]),
)
def test_symmetric_operators_do_not_care_which_side_is_ours(data, name, density):
    base, a, b = data
    raw = {"density": density} if name == "ties" else {}
    ab, ba = run(name, [a, b], base, **raw), run(name, [b, a], base, **raw)
    # equal up to float32 summation order
    np.testing.assert_allclose(ab, ba, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(data=arrays(np.float32, (3, 9), elements=_finite))
def test_ties_on_disjoint_updates_is_task_arithmetic(data):
    base, a, b = data
    a = np.where(np.arange(9) % 2 == 0, a, base)  # ours changes even entries, theirs odd ones
    b = np.where(np.arange(9) % 2 == 1, b, base)
    np.testing.assert_allclose(run("ties", [a, b], base), run("task_arithmetic", [a, b], base), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# ram, ramplus_tl, nearswap, arcee_fusion, passthrough (MERGE-OPERATORS.md §7), entry by entry


def _sparse_models(n=3, size=40, seed=21):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=size)
    models = [base + rng.normal(size=size) * (rng.random(size) < 0.4) for _ in range(n)]
    return models, base


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    models, base = _sparse_models()
    eps = 1e-5
    ref = base.copy()
    for j in range(base.size):
        active = [m[j] - base[j] for m in models if abs(m[j] - base[j]) > eps]
        if len(active) == 1:
            ref[j] += active[0]
        elif active:
            ref[j] += sum(active) / len(active)
    np.testing.assert_allclose(run("ram", models, base), ref, rtol=1e-12, atol=1e-12)
    # one model: its task vector whole (entries under epsilon dropped)
    np.testing.assert_allclose(run("ram", models[:1], base), models[0], atol=1e-12)


def test_ramplus_tl_boosts_unique_changes_by_the_overlap_ratio():
    models, base = _sparse_models(seed=22)
    r, alpha, eps = 0.5, 0.4, 1e-5
    deltas = [m - base for m in models]
    active = [np.abs(d) > eps for d in deltas]
    count = sum(a.astype(int) for a in active)
    ref = base.copy()
    for k, (d, a) in enumerate(zip(deltas, active)):
        shared, unique = int(np.sum(a & (count > 1))), int(np.sum(a & (count == 1)))
        boost = 1 + r * min(max(shared / max(unique, eps), 0), alpha)
        for j in range(base.size):
            if a[j]:
                ref[j] += d[j] * boost if count[j] == 1 else d[j] / count[j]
    out = run("ramplus_tl", models, base, r=r, alpha=alpha)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_nearswap_takes_the_other_value_where_the_models_are_close():
    rng = np.random.default_rng(23)
    a = rng.normal(size=30)
    b = a + rng.normal(size=30) * np.where(np.arange(30) % 3 == 0, 0.01, 1.0)
    t = 0.05
    ref = np.array(
        [
            (min(max(t / max(abs(y - x), 1e-6), 0), 1)) * y + (1 - min(max(t / max(abs(y - x), 1e-6), 0), 1)) * x
            for x, y in zip(a, b)
        ]
    )
    np.testing.assert_allclose(run("nearswap", [a, b], None, t=t), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(UsageError, match="needs parameter 't'"):
        resolve(op("nearswap"), {}, 2)


def test_arcee_fusion_imports_the_salient_changes():
    rng = np.random.default_rng(24)
    a = rng.normal(size=(6, 50))
    b = a + rng.normal(size=(6, 50)) * 0.5 * (rng.random((6, 50)) < 0.3)
    imp = np.zeros_like(a)
    for i in range(6):
        p = np.exp(b[i]) / np.exp(b[i]).sum() + 1e-8
        q = np.exp(a[i]) / np.exp(a[i]).sum() + 1e-8
        kl = sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
        imp[i] = np.abs(b[i] - a[i]) * kl
    flat = np.sort(imp.ravel())
    n = flat.size
    thr = flat[int(0.5 * (n - 1))] + 1.5 * (flat[int(0.75 * (n - 1))] - flat[int(0.25 * (n - 1))])
    ref = a + (b - a) * (imp >= thr)
    out = run("arcee_fusion", [a, b], None)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-12)
    assert 0 < np.count_nonzero(out != a) < np.count_nonzero(b != a)  # some changes in, not all


def test_passthrough_scales_its_one_input():
    models, _ = triple()
    np.testing.assert_array_equal(run("passthrough", models[:1], scale=0.5), models[0] * np.float32(0.5))
    np.testing.assert_array_equal(run("passthrough", models[:1]), models[0])
    with pytest.raises(UsageError, match="exactly 1"):
        resolve(op("passthrough"), {}, 2)
