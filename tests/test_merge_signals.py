"""Similarity signals between task vectors and the ``--operator auto`` rule."""

import math

import numpy as np
import pytest

from git_theta import registry as plugins
from git_theta.merge import signals
from git_theta.merge.params import resolve


def test_signals_of_a_hand_computed_pair():
    base = np.zeros(4, dtype=np.float32)
    a = np.array([1, 2, 0, 0], dtype=np.float32)
    b = np.array([1, -2, 0, 3], dtype=np.float32)
    s = signals.measure([a, b], base)
    assert math.isclose(s["cosine"], -3 / math.sqrt(5 * 14), rel_tol=1e-9)
    # weighted by min(|a|,|b|): entry 0 agrees (weight 1), entry 1 disagrees (weight 2)
    assert math.isclose(s["sign_agreement"], 1 / 3)
    assert math.isclose(s["norm_ratio"], math.sqrt(5 / 14))
    assert s["support_overlap"] == pytest.approx(2 / 3)
    assert s["topk_overlap"] == 0.0  # k = 1: entry 1 vs entry 3
    # 90 % of ‖a‖² = 4.5 needs 2 of 4 entries; of ‖b‖² = 12.6 also 2 (9 + 4)
    assert s["density"] == 0.5


def test_identical_and_zero_updates():
    rng = np.random.default_rng(0)
    base = rng.normal(size=100).astype(np.float32)
    d = rng.normal(size=100).astype(np.float32)
    s = signals.measure([base + d, base + d], base)
    assert s["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert s["sign_agreement"] == 1.0 and s["topk_overlap"] == 1.0 and s["norm_ratio"] == pytest.approx(1.0)
    s = signals.measure([base + d, base], base)
    assert s["norm_ratio"] == 0.0 and s["cosine"] == 0.0
    assert signals.choose(s) == ("task_arithmetic", {})


def test_octopus_signals_average_the_pairs_and_large_tensors_are_sampled(monkeypatch):
    rng = np.random.default_rng(1)
    base = np.zeros(1000, dtype=np.float64)
    d = [rng.normal(size=1000) for _ in range(3)]
    s3 = signals.measure([base + x for x in d], base)
    pair = [signals.measure([base + d[i], base + d[j]], base)["cosine"] for i, j in ((0, 1), (0, 2), (1, 2))]
    assert s3["cosine"] == pytest.approx(np.mean(pair))
    monkeypatch.setattr(signals, "SAMPLE", 100)
    sampled = signals.measure([base + d[0], base + d[0] * 2], base)
    assert sampled["cosine"] == pytest.approx(1.0) and sampled["norm_ratio"] == pytest.approx(0.5)


def _case(kind, n=4096, seed=0):
    """Two task vectors and the ideal merged delta (the skills, a shared one counted once)."""
    rng = np.random.default_rng(seed)

    def skill(density, support=None):
        out = np.zeros(n)
        idx = support if support is not None else rng.choice(n, int(density * n), replace=False)
        out[idx] = rng.normal(size=len(idx))
        return out

    def noise():
        return rng.normal(0, 0.05, size=n)

    if kind == "identical dense":
        s = skill(1.0)
        return s + noise(), s + noise(), s
    if kind == "identical sparse":
        s = skill(0.1)
        return s + noise() * 0.4, s + noise() * 0.4, s
    if kind == "disjoint sparse":
        perm = rng.permutation(n)
        a, b = skill(0, perm[: n // 10]), skill(0, perm[n // 10 : n // 5])
        return a, b, a + b
    if kind == "disjoint sparse + noise":
        perm = rng.permutation(n)
        a, b = skill(0, perm[: n // 10]), skill(0, perm[n // 10 : n // 5])
        return a + noise(), b + noise(), a + b
    if kind == "dense independent":
        a, b = skill(1.0), skill(1.0)
        return a, b, a + b
    if kind == "shared sparse + unique":
        c, ua, ub = skill(0.1), skill(0.1), skill(0.1)
        return c + ua + noise() * 0.4, c + ub + noise() * 0.4, c + ua + ub
    raise AssertionError(kind)


def _error(name, raw, da, db, ideal):
    base = np.zeros(da.size, dtype=np.float32)
    models = [(base + da).astype(np.float32), (base + db).astype(np.float32)]
    operator = plugins.get("merge", name)
    out = operator.merge(models, base, resolve(operator, raw, 2), None)
    return float(np.linalg.norm(out - ideal) / np.linalg.norm(ideal))


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("identical dense", "linear"),
        ("identical sparse", "ties"),
        ("disjoint sparse", "task_arithmetic"),
        ("disjoint sparse + noise", "ties"),
        ("dense independent", "task_arithmetic"),
        ("shared sparse + unique", "ties"),
    ],
)
def test_choice_is_the_best_of_the_plain_candidates(kind, expected):
    da, db, ideal = _case(kind)
    base = np.zeros(da.size, dtype=np.float32)
    s = signals.measure([(base + da).astype(np.float32), (base + db).astype(np.float32)], base)
    name, raw = signals.choose(s)
    assert name == expected
    if name == "ties" and s["density"] < 0.4:
        assert 0.05 <= float(raw["density"]) <= 0.5  # a density derived from the sparsity
    chosen = _error(name, raw, da, db, ideal)
    for other, other_raw in [("linear", {}), ("task_arithmetic", {}), ("ties", {}), ("ties", {"density": "0.2"})]:
        assert chosen <= _error(other, other_raw, da, db, ideal) + 0.02, (other, other_raw)


def test_rules_table_names_every_operator_choose_returns():
    ops = " ".join(rule[3] for rule in signals.RULES)
    for name in ("linear", "task_arithmetic", "ties"):
        assert name in ops


def test_decide_names_the_matching_case():
    s = {"norm_ratio": 1.0, "cosine": 0.95, "density": 0.1, "sign_agreement": 1.0,
         "support_overlap": 1.0, "topk_overlap": 1.0}  # fmt: skip
    assert signals.decide(s) == ("same update, sparse", "ties", {"density": "0.20"})
    assert signals.decide({**s, "density": 0.6}) == ("same update, dense", "linear", {})
    assert signals.decide({**s, "cosine": 0.0, "sign_agreement": 0.5}) == (
        "independent or conflicting updates",
        "task_arithmetic",
        {},
    )
    assert signals.decide({**s, "cosine": 0.5, "density": 0.5})[1:] == ("ties", {})  # 2·0.5 = 1: no trim
