"""The ``fisher`` merge operator: Fisher-weighted averaging (Matena & Raffel 2022, arXiv:2111.09832).

Each model's parameters are weighted, element by element, by that model's diagonal Fisher
information F_i (how much the model's loss cares about each parameter)::

    out = Σ_i w_i (F_i + ε) θ_i  /  Σ_i w_i (F_i + ε)

``w_i`` are the per-model ``weight`` parameters (the paper's λ_i, default 1) and ``ε`` (``epsilon``)
keeps the division defined where every Fisher value is 0; there the result is the plain weighted
average. The Fisher information is side data: on every branch a file ``fisher.safetensors`` next to
the checkpoint holds, for each parameter tensor, a tensor of the same name and shape (the squared
gradients averaged over examples, as the paper computes it). The merge driver hands the operator
the Fisher tensors of each side through ``side_files`` (see ``git_theta.merge.side``).
"""

from git_theta.plugin_api import MergeOperator, OperatorError, Param, UsageError

FISHER_FILE = "fisher.safetensors"
_HINT = (
    f"commit {FISHER_FILE} (the diagonal Fisher information: one tensor per parameter, same names and "
    "shapes) next to the checkpoint on every branch, or merge this tensor with another operator "
    "(theta.merge.rule)"
)


class FisherMerge(MergeOperator):
    name = "fisher"
    needs_base = False
    base_optional = True
    side_files = (FISHER_FILE,)
    params = {
        "weight": Param(1.0, "float", per_model=True, low=0.0, doc="coefficient of each model (ours first)"),
        "epsilon": Param(1e-6, "float", low=0.0, doc="added to every Fisher value (the paper's Fisher floor)"),
    }
    summary = "out = Σ wi (Fi+ε) θi / Σ wi (Fi+ε), Fi from fisher.safetensors on each side"
    paper = "Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (arXiv:2111.09832)"

    def validate(self, params, n_models):
        super().validate(params, n_models)
        if sum(params["weight"]) <= 0:
            raise UsageError(
                "merge operator 'fisher': the weights sum to 0",
                hint="give at least one model a positive weight",
            )

    def merge(self, models, base, params, rng, side=None):
        import numpy as np

        fishers = (side or {}).get(FISHER_FILE) or [None] * len(models)
        epsilon = params["epsilon"]
        numerator = np.zeros(models[0].shape, np.float64)
        denominator = np.zeros(models[0].shape, np.float64)
        for index, (model, fisher, weight) in enumerate(zip(models, fishers, params["weight"])):
            which = "ours" if index == 0 else f"model {index + 1}"
            if fisher is None:
                raise OperatorError(
                    f"no Fisher information for {which}: {FISHER_FILE} on that side has no tensor of this name",
                    hint=_HINT,
                )
            if fisher.shape != model.shape:
                raise OperatorError(
                    f"the Fisher tensor for {which} has shape {list(fisher.shape)}, the parameter {list(model.shape)}",
                    hint=_HINT,
                )
            if not np.all(fisher >= 0):  # also catches NaN
                raise OperatorError(f"the Fisher tensor for {which} has negative or NaN values", hint=_HINT)
            scale = weight * (fisher.astype(np.float64) + epsilon)
            numerator += scale * model
            denominator += scale
        if not np.all(denominator > 0):
            raise OperatorError(
                f"the Fisher information is 0 for every model at {int(np.sum(denominator <= 0))} element(s)",
                hint="set epsilon > 0 (theta.merge.epsilon) so those elements get the weighted average",
            )
        return np.asarray(numerator / denominator, dtype=models[0].dtype)
