"""Model Stock: move from the base towards the average of the fine-tunes by their agreement.

t = N·c / (1 + (N−1)·c), c = mean pairwise cosine of the task vectors (per tensor, or per row with
``filter_wise``); out = t·mean(θi) + (1−t)·θ0. t is not clamped (mergekit neither): anti-correlated
task vectors extrapolate away from the fine-tunes.
"""

from git_theta.merge.operator import MergeOperator, Param


class ModelStock(MergeOperator):
    name = "model_stock"
    min_models = 2
    params = {
        "filter_wise": Param(False, "bool", doc="one t per row (last dim) instead of per tensor"),
    }
    summary = "out = t·mean(θi) + (1−t)·θ0, t = N·c/(1+(N−1)c), c = mean pairwise cos(δi, δj)"
    paper = "Jang et al. 2024, Model Stock (arXiv:2403.19522)"

    def merge(self, models, base, params, rng):
        import numpy as np

        dtype = base.dtype
        n = len(models)
        if params["filter_wise"]:
            rows = base.reshape(1, -1) if base.ndim < 2 else base.reshape(-1, base.shape[-1])
            offsets = [(m - base).reshape(rows.shape) for m in models]
        else:
            offsets = [(m - base).reshape(1, -1) for m in models]
        norms = [np.linalg.norm(o, axis=-1) for o in offsets]
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                dot = (offsets[i] * offsets[j]).sum(axis=-1)
                cosines.append(np.clip(dot / np.maximum(norms[i] * norms[j], dtype.type(1e-6)), -1, 1))
        c = np.mean(cosines, axis=0).astype(dtype)
        denom = dtype.type(1) + dtype.type(n - 1) * c
        singular = np.abs(denom) < 1e-6
        t = np.where(singular, dtype.type(0), dtype.type(n) * c / np.where(singular, dtype.type(1), denom))
        mean = sum(models[1:], models[0].copy()) / dtype.type(n)
        if params["filter_wise"]:
            t = t.reshape(-1, 1)
            out = t * mean.reshape(t.shape[0], -1) + (1 - t) * base.reshape(t.shape[0], -1)
        else:
            t = dtype.type(t[0])
            out = t * mean + (dtype.type(1) - t) * base
        return np.asarray(out.reshape(base.shape), dtype=dtype)
