"""Operators that keep or drop changes entry by entry, and ``passthrough``.

``ram``/``ramplus_tl`` keep a change one model alone makes and average the changes several make;
``nearswap`` takes the other model's value where the two are already close; ``arcee_fusion``
imports only the other model's most salient changes; ``passthrough`` copies (and scales) its one
input, the operator of mergekit's layer-stacking recipes (``slices``). Definitions, names and
defaults: mergekit 0.1.5 (``MERGE-OPERATORS.md`` §7).
"""

from git_theta.merge.operator import MergeOperator, Param


def _ram_masks(models, base, epsilon):
    """(task vectors [n, size], active mask, unique mask, shared mask, contributor count)."""
    import numpy as np

    tvs = np.stack([(m - base).reshape(-1) for m in models])
    active = np.abs(tvs) > tvs.dtype.type(epsilon)
    count = active.sum(axis=0)
    return tvs, active, count == 1, count > 1, count


class Ram(MergeOperator):
    name = "ram"
    params = {"epsilon": Param(1e-5, "float", low=0.0, doc="a change larger than this is active")}
    summary = "out = θ0 + Σk δk·active_k·([count=1] + [count>1]/count)"
    paper = "Reinforced Agent Merging (RAM, arXiv:2601.13572)"

    def merge(self, models, base, params, rng):
        import numpy as np

        tvs, active, unique, shared, count = _ram_masks(models, base, params["epsilon"])
        tvs *= active
        scale = unique + shared / np.maximum(count, 1).astype(tvs.dtype)
        merged = (tvs * scale.astype(tvs.dtype)).sum(axis=0)
        return np.asarray(base + merged.reshape(base.shape), dtype=base.dtype)


class RamPlusTl(MergeOperator):
    name = "ramplus_tl"
    params = {
        "r": Param(0.1, "float", doc="boost of unique changes per unit of overlap ratio"),
        "alpha": Param(0.2, "float", low=0.0, doc="cap of the overlap ratio"),
        "epsilon": Param(1e-5, "float", low=0.0, doc="a change larger than this is active"),
    }
    summary = "as ram, unique changes of model k scaled by 1 + r·clamp(ρk, 0, α), ρk = #shared/#unique"
    paper = "Reinforced Agent Merging Plus, tensor-local (arXiv:2601.13572)"

    def merge(self, models, base, params, rng):
        import numpy as np

        eps = params["epsilon"]
        tvs, active, unique, shared, count = _ram_masks(models, base, eps)
        n_shared = (active & shared).sum(axis=1).astype(np.float64)
        n_unique = (active & unique).sum(axis=1).astype(np.float64)
        rho = n_shared / np.maximum(n_unique, eps)
        boost = (1 + params["r"] * np.clip(rho, 0, params["alpha"])).astype(tvs.dtype)
        tvs *= active
        merged = (tvs * unique * boost[:, None]).sum(axis=0)
        merged += (tvs * (shared / np.maximum(count, 1).astype(tvs.dtype))).sum(axis=0)
        return np.asarray(base + merged.reshape(base.shape), dtype=base.dtype)


class NearSwap(MergeOperator):
    name = "nearswap"
    needs_base = False
    min_models = max_models = 2
    params = {"t": Param(None, "float", low=0.0, doc="distance below which the other model's value is taken")}
    summary = "out = w·θ1 + (1−w)·θ0, w = clamp(t/|θ1−θ0|, 0, 1); θ0 = ours (base_model), θ1 = theirs"
    paper = "NearSwap (alchemonaut, QuartetAnemoi-70B-t0.0001)"

    def validate(self, params, n_models):
        super().validate(params, n_models)
        _require(self, params, "t", "t=0.0001")

    def merge(self, models, base, params, rng):
        import numpy as np

        a, b = models
        dtype = a.dtype.type
        weight = np.clip(dtype(params["t"]) / np.maximum(np.abs(a - b), dtype(1e-6)), 0, 1)
        out = np.asarray(weight * b, dtype=a.dtype)
        out += (1 - weight) * a
        return out


class ArceeFusion(MergeOperator):
    name = "arcee_fusion"
    needs_base = False
    min_models = max_models = 2
    #: only tensors with more entries than this draw random numbers (a sample for the quantiles)
    SAMPLE = 1_000_000
    random = True
    summary = "out = θ0 + (θ1−θ0)·[imp ≥ q50 + 1.5·(q75−q25)], imp = |θ1−θ0|·KL(softmax θ1 ‖ softmax θ0); θ0 = ours"
    paper = "Arcee Fusion (arcee.ai, mergekit)"

    def merge(self, models, base, params, rng):
        import numpy as np

        a, b = models  # a plays mergekit's base_model
        diff = b - a
        importance = np.abs(diff) * _kl_last_axis(b, a)[..., None] if b.ndim else np.abs(diff)  # |δ|·KL, as mergekit
        flat = importance.reshape(-1)
        if flat.size > self.SAMPLE:
            flat = flat[rng.integers(0, flat.size, self.SAMPLE)]  # with replacement, as mergekit
        n = flat.size
        # floor-index quantiles of the sorted values, as mergekit
        idx = [int(q * (n - 1)) for q in (0.5, 0.25, 0.75)]
        part = np.partition(flat, idx)
        median, q1, q3 = part[idx[0]], part[idx[1]], part[idx[2]]
        threshold = median + importance.dtype.type(1.5) * (q3 - q1)
        diff *= importance >= threshold
        return np.asarray(a + diff, dtype=a.dtype)


def _softmax(x):
    import numpy as np

    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kl_last_axis(p_logits, q_logits, eps=1e-8):
    """KL(softmax p ‖ softmax q) along the last axis, each softmax + eps (mergekit's importance).

    Between a model and a close fine-tune this KL is of the order of float32 rounding (1e-7), so
    its value, even its sign, depends on how softmax rounds: with torch installed it is computed
    with torch's kernels, as mergekit does, so the same entries pass the threshold; numpy otherwise.
    """
    import numpy as np

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        p_t, q_t = torch.from_numpy(np.ascontiguousarray(p_logits)), torch.from_numpy(np.ascontiguousarray(q_logits))
        p = torch.softmax(p_t, dim=-1) + eps
        q = torch.softmax(q_t, dim=-1) + eps
        return torch.sum(p * torch.log(p / q), dim=-1).numpy()

    p = _softmax(p_logits) + p_logits.dtype.type(eps)
    q = _softmax(q_logits) + q_logits.dtype.type(eps)
    return np.sum(p * np.log(p / q), axis=-1)


class Passthrough(MergeOperator):
    name = "passthrough"
    needs_base = False
    min_models = max_models = 1
    params = {"scale": Param(1.0, "float", per_model=True, doc="factor applied to the tensor")}
    summary = "out = scale·θ1 (one input; layer stacking with recipe slices)"
    paper = "—"

    def merge(self, models, base, params, rng):
        scale = params["scale"][0]
        import numpy as np

        return np.asarray(models[0] * models[0].dtype.type(scale), dtype=models[0].dtype)


def _require(op, params, key, example):
    from git_theta.errors import UsageError

    if params[key] is None:
        raise UsageError(f"merge operator {op.name!r} needs parameter {key!r}", hint=f"for example --param {example}")
