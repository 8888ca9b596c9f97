"""Similarity signals between task vectors, and the rule behind ``--operator auto``.

For one tensor changed on several branches, :func:`measure` compares the task vectors
δi = θi − θ0 (pairwise, averaged over pairs for octopus merges):

* ``cosine``          mean pairwise cosine similarity (0 when a task vector is zero);
* ``sign_agreement``  the fraction of entries changed in the same direction on both sides,
                      each entry weighted by the smaller of its two changes (1.0 when no entry
                      is changed on both sides; ≈ 0.5 for independent updates);
* ``norm_ratio``      smallest ‖δi‖ / largest ‖δi‖ (0 = one side did not move, 1 = equal norms);
* ``topk_overlap``    fraction of the top-``TOPK`` magnitudes of one task vector that are also in
                      the other's top-``TOPK`` (≈ TOPK for independent vectors, 1 for identical
                      supports, 0 for disjoint ones);
* ``support_overlap`` Jaccard overlap of the sets of changed entries (|δ| > 0);
* ``density``         mean over models of the fraction of entries that hold ``MASS`` of ‖δi‖²
                      (small for sparse updates or a few large changes in small noise).

Tensors above ``SAMPLE`` entries are measured on an evenly strided sample (deterministic).

``git theta merge --operator auto`` (and ``merge-files --operator auto``) choose one recipe for the
whole merge with :mod:`.auto`, which aggregates these signals over the checkpoint and applies a
predictor fitted on real merges (``bench/merge_eval.py``). :func:`choose` below is the per-tensor
fallback: it decides ``auto`` in per-tensor rules (``theta.merge.rule "GLOB auto"``) and when the
whole-model predictor has nothing to go on (no common base). Its thresholds were calibrated on
synthetic cases with ``bench/merge_auto_calibration.py``, see :data:`RULES`.
"""

import math

TOPK = 0.1
MASS = 0.9
SAMPLE = 1 << 20

SPARSE = 0.25  # density at or below which an update counts as sparse


def _ties_density(s):
    """TIES density for these signals: 2·density rounded to 0.05, in [0.05, 1]."""
    return min(1.0, max(0.05, round(2 * s["density"] / 0.05) * 0.05))


#: the decision rule, first match wins: (case, condition as documented, predicate, action)
#: (README "Merge operators" shows the same table; "d" is :func:`_ties_density`)
RULES = (
    ("one side did not move", "norm_ratio == 0", lambda s: s["norm_ratio"] == 0, "task_arithmetic"),
    (
        "same update, sparse",
        "cosine >= 0.9 and density <= 0.25",
        lambda s: s["cosine"] >= 0.9 and s["density"] <= SPARSE,
        "ties density=d",
    ),
    ("same update, dense", "cosine >= 0.9", lambda s: s["cosine"] >= 0.9, "linear"),
    (
        "shared component",
        "cosine >= 0.3 and sign_agreement >= 0.75",
        lambda s: s["cosine"] >= 0.3 and s["sign_agreement"] >= 0.75,
        "ties density=d",
    ),
    ("disjoint changes", "support_overlap <= 0.1", lambda s: s["support_overlap"] <= 0.1, "task_arithmetic"),
    (
        "disjoint sparse skills over noise",
        "density <= 0.25 and topk_overlap <= TOPK/2",
        lambda s: s["density"] <= SPARSE and s["topk_overlap"] <= TOPK / 2,
        "ties density=d",
    ),
    ("independent or conflicting updates", "otherwise", lambda s: True, "task_arithmetic"),
)


def _flat_sample(x):
    flat = x.reshape(-1)
    if flat.size > SAMPLE:
        flat = flat[:: -(-flat.size // SAMPLE)]
    return flat


def _mass_density(delta):
    """Fraction of entries whose squares hold MASS of the total (largest first)."""
    import numpy as np

    sq = np.sort((delta.astype(np.float64) ** 2))[::-1]
    total = sq.sum()
    if total == 0:
        return 0.0
    k = int(np.searchsorted(np.cumsum(sq), MASS * total)) + 1
    return min(k, sq.size) / sq.size


def _top(delta, k):
    """Boolean mask of the k largest |δ| (any k of them when magnitudes tie)."""
    import numpy as np

    mask = np.zeros(delta.size, dtype=bool)
    if k:
        mask[np.argpartition(-np.abs(delta), k - 1)[:k]] = True
    return mask


def measure(models, base):
    """Signals (a dict of floats) between the task vectors of ``models`` relative to ``base``."""
    import numpy as np

    deltas = [_flat_sample(m).astype(np.float64) - _flat_sample(base) for m in models]
    n = deltas[0].size
    norms = [float(np.linalg.norm(d)) for d in deltas]
    k = max(1, math.ceil(TOPK * n)) if n else 0
    tops = [_top(d, k) for d in deltas]
    pairs = {"cosine": [], "sign_agreement": [], "topk_overlap": [], "support_overlap": []}
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            a, b = deltas[i], deltas[j]
            na, nb = norms[i], norms[j]
            pairs["cosine"].append(float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0)
            both = (a != 0) & (b != 0)
            either = (a != 0) | (b != 0)
            nboth = int(both.sum())
            # weighted by the smaller of the two changes, so entries where one side only moved by
            # noise count little next to entries both sides really changed
            weight = np.minimum(np.abs(a), np.abs(b))
            total = float(weight.sum())
            same = float(weight[np.sign(a) == np.sign(b)].sum())
            pairs["sign_agreement"].append(same / total if total > 0 else 1.0)
            pairs["support_overlap"].append(nboth / int(either.sum()) if either.any() else 1.0)
            pairs["topk_overlap"].append(int((tops[i] & tops[j]).sum()) / k if k else 1.0)
    out = {key: float(np.mean(v)) if v else 1.0 for key, v in pairs.items()}
    out["norm_ratio"] = min(norms) / max(norms) if max(norms) > 0 else 1.0
    out["density"] = float(np.mean([_mass_density(d) for d in deltas]))
    return out


def decide(signals):
    """(case, operator name, raw params) of the first rule of RULES that matches ``signals``."""
    for case, _, matches, action in RULES:
        if matches(signals):
            name = action.split()[0]
            if action.endswith("density=d"):
                density = _ties_density(signals)
                return case, name, ({"density": f"{density:.2f}"} if density < 1 else {})
            return case, name, {}
    raise AssertionError("the last rule matches everything")


def choose(signals):
    """(operator name, raw params dict) for these signals: the first matching rule of RULES."""
    _, name, params = decide(signals)
    return name, params
