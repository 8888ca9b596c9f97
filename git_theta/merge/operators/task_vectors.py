"""The task-vector family: ``task_arithmetic``, ``ties``, ``dare_*``, ``breadcrumbs*``, ``della*``, ``sce``.

All but ``sce`` are one pipeline (mergekit's generalized task arithmetic) with two switches, a
sparsifier and a sign consensus. Per tensor, with δi = θi − θ0:

1. δi ← sparsify(δi, density_i, ...)            (none / magnitude / random / outliers / della)
2. Di = wi·δi                                    (weights act BEFORE the sign election)
3. with consensus: elected = sgn(Σ Di) ("sum") or sgn(Σ sgn Di) ("count"), ties → +1;
   agree_i = [sgn Di == elected]; mixed = Σ Di·agree_i; divisor = Σ wi·agree_i (0 → 1)
   without:        mixed = Σ Di;                 divisor = Σ wi (|·| < 1e-8 → 1)
4. out = θ0 + λ·mixed (/ divisor if normalize)

Randomness (DARE, DELLA masks) comes only from the ``rng`` the driver passes, one draw per model in
model order, so a merge is reproducible from the seed.
"""

from git_theta.errors import UsageError
from git_theta.merge.operator import MergeOperator, Param
from git_theta.merge.operators.basic import WEIGHT

_DENSITY = Param(1.0, "float", per_model=True, low=0.0, high=1.0, doc="fraction of entries kept")
_LAMBDA = Param(1.0, "float", doc="scale of the merged task vector")
_INT8 = Param(False, "bool", doc="accepted for mergekit recipes; memory-only there, no effect here")
_CONSENSUS = Param("sum", "str", choices=("sum", "count"), doc="sign election: by summed mass or by count")


def _normalize(default):
    return Param(default, "bool", doc="divide by the (agreeing) weight sum")


def _rescale(default):
    return Param(default, "bool", doc="restore each sparsified task vector's L1 norm")


# ---------------------------------------------------------------------------------------------
# sparsifiers: each returns a new array (the input is never modified)


def _l1_norm(x):
    import numpy as np

    return float(np.abs(x).sum(dtype=np.float64))


def _keep_above(values, threshold, k):
    """Mask of the entries > threshold, topped up to ``k`` with entries == threshold in index order."""
    import numpy as np

    flat = values.reshape(-1)
    mask = flat > threshold
    missing = k - int(np.count_nonzero(mask))
    mask[np.flatnonzero(flat == threshold)[:missing]] = True
    return mask.reshape(values.shape)


def top_k_mask(values, k):
    """Boolean mask of the ``k`` largest entries of ``values`` (ties at the threshold: index order)."""
    import numpy as np

    n = values.size
    if k >= n:
        return np.ones(values.shape, dtype=bool)
    if k <= 0:
        return np.zeros(values.shape, dtype=bool)
    return _keep_above(values, np.partition(values.reshape(-1), n - k)[n - k], k)


def magnitude_mask(delta, density):
    """Boolean mask of the ``max(1, floor(density·n))`` largest |δ| of the whole tensor (TIES)."""
    import numpy as np

    n = delta.size
    if density >= 1:
        return np.ones(delta.shape, dtype=bool)
    if density <= 0:
        return np.zeros(delta.shape, dtype=bool)
    k = min(n, max(1, int(density * n)))
    # partition |δ| in place for the threshold only (one temporary instead of two), then compare
    # against a fresh |δ|
    mag = np.abs(delta).reshape(-1)
    mag.partition(n - k)
    threshold = mag[n - k].copy()
    del mag
    mag = np.abs(delta)
    mask = mag > threshold
    if threshold != 0 and np.count_nonzero(mag == threshold) > k - np.count_nonzero(mask):
        # several magnitudes equal the k-th: which of them survive is the order of mergekit's sort
        # (tied zeros need no sort: keeping a zero or not changes nothing)
        chosen = _torch_top_k(mag, k)
        if chosen is not None:
            return chosen
    return _keep_above(mag, threshold, k)


def _torch_top_k(mag, k):
    """The mask mergekit keeps: the first ``k`` of ``torch.argsort(|δ| as float32, descending=True)``.

    torch's sort is not stable, so among equal magnitudes the survivors are whatever its sort
    puts first; the only exact way to match is to run that sort. None without torch (then equal
    magnitudes are kept in index order).
    """
    import numpy as np

    try:
        import torch
    except ImportError:
        return None
    flat = torch.from_numpy(np.ascontiguousarray(mag, dtype=np.float32).reshape(-1))
    mask = np.zeros(mag.size, dtype=bool)
    mask[torch.argsort(flat, descending=True)[:k].numpy()] = True
    return mask.reshape(mag.shape)


def outlier_mask(delta, density, gamma):
    """Breadcrumbs mask: drop the ``floor(gamma·n)`` largest and the smallest, keep ``floor(density·n)``.

    In the stable ascending order of |δ| (equal magnitudes in index order), positions
    [n_bottom, n_bottom + n_keep) survive, n_bottom = max(0, n − n_keep − n_top) (so density +
    gamma > 1 shrinks the top cut). Found with a partition, not a sort: O(n).
    """
    import numpy as np

    n = delta.size
    if density >= 1:
        return np.ones(delta.shape, dtype=bool)
    n_keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - n_keep - n_top)
    return rank_range_mask(np.abs(delta), n_bottom, n_bottom + n_keep)


def rank_range_mask(values, start, stop):
    """Mask of the entries whose position in the stable ascending order of ``values`` is in [start, stop)."""
    import numpy as np

    flat = values.ravel()
    mask = np.zeros(flat.size, dtype=bool)
    if stop <= start:
        return mask.reshape(values.shape)
    part = np.partition(flat, [start, stop - 1])
    lo, hi = part[start], part[stop - 1]
    mask |= (flat > lo) & (flat < hi)
    for edge in {lo.item(), hi.item()}:
        # equal values occupy consecutive positions from count(< edge), in index order
        idx = np.flatnonzero(flat == edge)
        first = int(np.count_nonzero(flat < edge))
        pos = first + np.arange(idx.size)
        mask[idx[(pos >= start) & (pos < stop)]] = True
    return mask.reshape(values.shape)


def della_probabilities(delta, density, epsilon):
    """DELLA keep probabilities: ``density − ε + 2ε·r``, r = rank of |δ| in its row in [0, 1].

    Rows: a 1-D tensor is one row, a 2-D tensor its rows, higher-D tensors rank along dim 1
    (as mergekit). A row of one entry gets r = 0.5 (mergekit divides 0 by 0 there).
    """
    import numpy as np

    work = delta.reshape(1, -1) if delta.ndim < 2 else delta
    ncols = work.shape[1]
    # rank = position in the stable ascending order of |δ| along dim 1 (equal magnitudes: index
    # order), by one argsort and a scatter (argsort of the argsort costs a second sort)
    dtype = delta.dtype
    if ncols > 1:
        r = np.arange(ncols, dtype=dtype) / dtype.type(ncols - 1)
    else:
        r = np.full(1, 0.5, dtype=dtype)
    by_position = dtype.type(density - epsilon) + dtype.type(2 * epsilon) * r
    order = np.argsort(np.abs(work), axis=1, kind="stable")
    p = np.empty(work.shape, dtype=dtype)
    by_position = by_position.reshape((1, ncols) + (1,) * (work.ndim - 2))
    np.put_along_axis(p, order, np.broadcast_to(by_position, work.shape), axis=1)
    return p.reshape(delta.shape)


def sparsify(kind, delta, params, i, rng):
    """Sparsify model ``i``'s task vector ``delta`` with sparsifier ``kind`` (see module doc).

    ``delta`` must be an array the caller owns: it is zeroed and rescaled in place and returned.
    With ``rescale`` the kept entries are scaled by ‖δ‖₁/‖kept‖₁ (skipped if either is < 1e-7).
    """
    import numpy as np

    density = params["density"][i]
    if density >= 1:
        return delta
    if density <= 0:
        delta[...] = 0
        return delta
    if kind == "magnitude":
        keep = magnitude_mask(delta, density)
    elif kind == "outliers":
        keep = outlier_mask(delta, density, params["gamma"][i])
    elif kind == "random":
        keep = _uniform(rng, delta) < density
    elif kind == "della":
        keep = _uniform(rng, delta) < della_probabilities(delta, density, params["epsilon"][i])
    else:
        raise ValueError(f"unknown sparsifier {kind!r}")
    before = _l1_norm(delta) if params["rescale"] else 0.0
    np.copyto(delta, 0, where=~keep)
    if params["rescale"]:
        after = _l1_norm(delta)
        if before >= 1e-7 and after >= 1e-7:
            delta *= delta.dtype.type(before / after)
    return delta


def _uniform(rng, like):
    import numpy as np

    if rng is None:
        raise TypeError("a random merge operator needs an rng (numpy.random.Generator)")
    # float32 draws whatever the tensor's dtype: half the memory of float64 draws, and the same
    # masks for a float32 and a float64 copy of the same merge
    return rng.random(like.shape, dtype=np.float32)


def elect(weighted, method):
    """Elected direction per entry of the weighted deltas (a list): True = +, False = −.

    "sum": the sign of Σ Di; "count": the sign of Σ sgn(Di); a tie (0) elects +.
    """
    score = None
    for d in weighted:
        term = d if method == "sum" else (d > 0).astype(d.dtype) - (d < 0)
        if score is None:
            score = term.copy() if term is d else term
        else:
            score += term
    return score >= 0


def agreeing(d, positive):
    """Mask of the entries of ``d`` whose sign is the elected one (a zero never agrees)."""
    import numpy as np

    return np.where(positive, d > 0, d < 0)


# ---------------------------------------------------------------------------------------------


class TaskVectorMerge(MergeOperator):
    """Generalized task arithmetic; subclasses choose the sparsifier and consensus."""

    sparsifier = None  # None | "magnitude" | "random" | "outliers" | "della"
    consensus = False
    min_models = 1

    def merge(self, models, base, params, rng):
        import numpy as np

        weights = params["weight"]
        dtype = base.dtype
        weighted = []
        for i, (w, model) in enumerate(zip(weights, models)):
            delta = np.asarray(model - base)  # ours to modify (0-d: an array, not a scalar)
            if self.sparsifier is not None:
                delta = sparsify(self.sparsifier, delta, params, i, rng)
            if w != 1:
                delta *= dtype.type(w)
            weighted.append(delta)
        # in place on the arrays we own: peak memory ≈ the task vectors + 2 tensors
        normalize = params["normalize"]
        if self.consensus:
            positive = elect(weighted, params["consensus"])
            mixed = np.zeros_like(base)
            divisor = np.zeros_like(base) if normalize else None
            for w, d in zip(weights, weighted):
                agree = agreeing(d, positive)
                np.copyto(d, 0, where=~agree)
                mixed += d
                if normalize:
                    np.add(divisor, dtype.type(w), out=divisor, where=agree)
            del weighted
            if normalize:
                divisor[divisor == 0] = 1
                mixed /= divisor
        else:
            mixed = weighted[0]
            for d in weighted[1:]:
                mixed += d
            del weighted
            divisor = sum(weights)
            if normalize:
                mixed /= dtype.type(1.0 if abs(divisor) < 1e-8 else divisor)
        if params["lambda"] != 1:
            mixed *= dtype.type(params["lambda"])
        mixed += base
        return mixed


def _gta_params(sparsifier, consensus, normalize, rescale):
    params = {
        "weight": WEIGHT,
        "lambda": _LAMBDA,
        "normalize": _normalize(normalize),
        "int8_mask": _INT8,
    }
    if sparsifier is not None:
        params["density"] = _DENSITY
        params["rescale"] = _rescale(rescale)
    if sparsifier == "outliers":
        params["gamma"] = Param(0.01, "float", per_model=True, low=0.0, high=1.0, doc="fraction of largest |δ| removed")
    if sparsifier == "della":
        params["epsilon"] = Param(
            0.15, "float", per_model=True, low=0.0, high=0.5, doc="half-width of the keep-probability band"
        )
    if consensus:
        params["consensus"] = _CONSENSUS
    return params


class TaskArithmetic(TaskVectorMerge):
    name = "task_arithmetic"
    params = _gta_params(None, False, False, False)
    summary = "out = θ0 + λ Σ wi δi   (/ Σ wi if normalize)"
    paper = "Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)"


class Ties(TaskVectorMerge):
    name = "ties"
    sparsifier = "magnitude"
    consensus = True
    params = _gta_params("magnitude", True, True, False)
    summary = "out = θ0 + λ Σ_agree wi topk(δi) / Σ_agree wi"
    paper = "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)"


class DareLinear(TaskVectorMerge):
    name = "dare_linear"
    sparsifier = "random"
    random = True
    params = _gta_params("random", False, False, True)
    summary = "out = θ0 + λ Σ wi L1rescale(Bernoulli(density) ⊙ δi)"
    paper = "Yu et al. 2024, Language models are Super Mario (DARE, arXiv:2311.03099)"


class DareTies(TaskVectorMerge):
    name = "dare_ties"
    sparsifier = "random"
    consensus = True
    random = True
    params = _gta_params("random", True, False, True)
    summary = "out = θ0 + λ Σ_agree wi L1rescale(Bernoulli(density) ⊙ δi)"
    paper = "Yu et al. 2024 (DARE, arXiv:2311.03099) + Yadav et al. 2023 (TIES)"


class Breadcrumbs(TaskVectorMerge):
    name = "breadcrumbs"
    sparsifier = "outliers"
    params = _gta_params("outliers", False, False, False)
    summary = "out = θ0 + λ Σ wi midband(δi; density, gamma)"
    paper = "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)"


class BreadcrumbsTies(TaskVectorMerge):
    name = "breadcrumbs_ties"
    sparsifier = "outliers"
    consensus = True
    params = _gta_params("outliers", True, False, False)
    summary = "out = θ0 + λ Σ_agree wi midband(δi; density, gamma)"
    paper = "Davari & Belilovsky 2024 (arXiv:2312.06795) + Yadav et al. 2023 (TIES)"


class _DellaBand:
    """DELLA's keep probabilities density ± epsilon must stay in [0, 1] (for 0 < density < 1)."""

    def validate(self, params, n_models):
        super().validate(params, n_models)
        for i, (d, e) in enumerate(zip(params["density"], params["epsilon"])):
            if 0 < d < 1 and (d - e < 0 or d + e > 1):
                raise UsageError(
                    f"merge operator {self.name!r}: model {i + 1} has density {d} and epsilon {e}, "
                    f"so the keep probability density ± epsilon = [{d - e:g}, {d + e:g}] leaves [0, 1]",
                    hint="use epsilon <= min(density, 1 - density), e.g. density=0.5 epsilon=0.15",
                )


class Della(_DellaBand, TaskVectorMerge):
    name = "della"
    sparsifier = "della"
    consensus = True
    random = True
    params = _gta_params("della", True, True, True)
    summary = "out = θ0 + λ Σ_agree wi L1rescale(Bernoulli(p_rank) ⊙ δi) / Σ_agree wi"
    paper = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"


class DellaLinear(_DellaBand, TaskVectorMerge):
    name = "della_linear"
    sparsifier = "della"
    random = True
    params = _gta_params("della", False, False, True)
    summary = "out = θ0 + λ Σ wi L1rescale(Bernoulli(p_rank) ⊙ δi)"
    paper = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"


class Sce(MergeOperator):
    name = "sce"
    params = {
        "select_topk": Param(1.0, "float", low=0.0, high=1.0, doc="fraction of highest-variance entries kept"),
        "int8_mask": _INT8,
    }
    summary = "out = θ0 + Σ ωi agree_i τi / Σ ωi agree_i, ωi ∝ mean(τi²), τ = var-top-k(δ)"
    paper = "Wan et al. 2024, FuseChat (select-calculate-erase, arXiv:2408.07990)"

    def merge(self, models, base, params, rng):
        import numpy as np

        dtype = base.dtype
        shape, base = base.shape, base.reshape(-1)  # sce uses no structure; flat rows are arrays
        tvs = np.stack([m.reshape(-1) - base for m in models])
        k_frac = params["select_topk"]
        if k_frac < 1:
            var = tvs.var(axis=0)  # population variance across models
            keep = top_k_mask(var, int(np.count_nonzero(var) * k_frac))
            del var
            np.multiply(tvs, keep, out=tvs)
        energy = np.array([np.mean(np.square(tv)) for tv in tvs], dtype=dtype)
        total = float(energy.sum())
        if abs(total) < 1e-6:
            omega = np.full(len(models), 1 / len(models), dtype=dtype)
        else:
            omega = (energy / dtype.type(total)).astype(dtype)
        positive = elect(list(tvs), "sum")
        merged = np.zeros_like(base)
        total_weight = np.zeros_like(base)
        for om, tv in zip(omega, tvs):
            agree = agreeing(tv, positive)
            np.copyto(tv, 0, where=~agree)
            merged += tv * om
            np.add(total_weight, om, out=total_weight, where=agree)
        merged /= np.maximum(total_weight, dtype.type(1e-6))
        merged += base
        return merged.reshape(shape)
