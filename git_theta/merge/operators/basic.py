"""Pick-a-side operators (``ours``, ``theirs``, ``base``) and the weighted average ``linear``."""

from git_theta.errors import UsageError
from git_theta.merge.operator import MergeOperator, Param

#: per-model coefficient shared by every weighted operator; mergekit requires it, we default to 1
WEIGHT = Param(1.0, "float", per_model=True, doc="coefficient of each model (ours first)")


class Ours(MergeOperator):
    name = "ours"
    needs_base = False
    summary = "out = θ_ours"
    paper = "—"

    def merge(self, models, base, params, rng):
        return models[0].copy()


class Theirs(MergeOperator):
    name = "theirs"
    needs_base = False
    min_models = max_models = 2
    summary = "out = θ_theirs"
    paper = "—"

    def merge(self, models, base, params, rng):
        return models[1].copy()


class Base(MergeOperator):
    name = "base"
    summary = "out = θ_base (revert both sides)"
    paper = "—"

    def merge(self, models, base, params, rng):
        return base.copy()


class Linear(MergeOperator):
    name = "linear"
    needs_base = False
    params = {
        "weight": WEIGHT,
        "normalize": Param(True, "bool", doc="divide by the sum of the weights"),
    }
    summary = "out = Σ wi θi / Σ wi"
    paper = "Wortsman et al. 2022, Model soups (arXiv:2203.05482)"

    def validate(self, params, n_models):
        super().validate(params, n_models)
        if params["normalize"] and sum(params["weight"]) == 0:
            # mergekit divides anyway and writes inf/nan into the model
            raise UsageError(
                "merge operator 'linear': the weights sum to 0, so normalize=true divides by 0",
                hint="use weights with a non-zero sum, or normalize=false",
            )

    def merge(self, models, base, params, rng):
        import numpy as np

        weights = params["weight"]
        out = weights[0] * models[0]
        for w, m in zip(weights[1:], models[1:]):
            out += w * m
        if params["normalize"]:
            out /= sum(weights)
        return np.asarray(out, dtype=models[0].dtype)
