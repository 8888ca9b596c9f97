"""``--operator auto``: predict the best merge from similarity signals, with a model fitted on a benchmark.

For the models being merged, :func:`pair_features` summarizes their task vectors δi = θi − θ0 over
the whole checkpoint (structural signals, the per-tensor ones of :mod:`.signals` aggregated by
tensor size, plus global cosine and relative update size); with ``--probe`` the functional ones
(how differently the models' activations moved on the same probe inputs) are added. A linear
predictor per candidate recipe (the ``--search`` grid) maps standardized features to the expected
normalized accuracy of that merge; ``auto`` takes the recipe with the highest prediction. The
coefficients are data, ``auto_model.json`` beside this module, fitted by ``bench/fit_merge_auto.py``
on ``bench/merge_eval.py``'s real merges; nothing is trained at run time.

With three or more models the features are averaged over pairs, and branches are chosen greedily:
ordered by their predicted pairwise merge with HEAD, a branch is kept when the predicted total over
the kept tasks (count × predicted normalized accuracy) rises with it.
"""

import contextlib
import contextvars
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from git_theta.errors import ConfigError

MODEL_FILE = Path(__file__).with_name("auto_model.json")
SCHEMA = 1
#: structural features, in the predictor's order
STRUCTURAL = ("cosine", "sign_agreement", "norm_ratio", "topk_overlap", "density", "log_rel_norm")
#: functional features (from --probe activations)
FUNCTIONAL = ("act_cosine", "log_act_rel")
#: the whole-merge pick the engine applies to tensors with ``auto`` while it is set (see :func:`picked`)
_PICK = contextvars.ContextVar("theta_auto_pick", default=None)


@contextlib.contextmanager
def picked(prediction):
    """Within this block, ``auto`` merges every tensor that has a base with ``prediction``'s recipe
    (tensors without a base, e.g. a file added on several branches, still get ``linear``)."""
    token = _PICK.set(prediction)
    try:
        yield
    finally:
        _PICK.reset(token)


def current_pick():
    """The Prediction set by :func:`picked`, or None."""
    return _PICK.get()


def _aggregate(per_tensor, weights):
    total = sum(weights)
    return {k: sum(s[k] * w for s, w in zip(per_tensor, weights)) / total for k in per_tensor[0]} if total else {}


class FeatureAccumulator:
    """Structural features of models, accumulated tensor by tensor (never whole models), pair by pair,
    so the features of any subset of the models can be read off (:meth:`features`)."""

    KEYS = ("sign_agreement", "topk_overlap", "density")

    def __init__(self, n_models):
        self.n = n_models
        self.pairs = {
            (i, j): {k: 0.0 for k in (*self.KEYS, "weight")} for i in range(n_models) for j in range(i + 1, n_models)
        }
        self.dots = [[0.0] * n_models for _ in range(n_models)]
        self.base_sq = 0.0

    def add(self, models, base):
        """One tensor: ``models`` (float arrays, same shape) and ``base``."""
        import numpy as np

        from git_theta.merge.signals import measure

        deltas = [(m.astype(np.float64) - base).ravel() for m in models]
        for i in range(self.n):
            for j in range(i, self.n):
                self.dots[i][j] += float(deltas[i] @ deltas[j])
        self.base_sq += float(np.square(base, dtype=np.float64).sum())
        moved = [float(np.abs(d).max(initial=0)) > 0 for d in deltas]
        for (i, j), sums in self.pairs.items():
            if moved[i] or moved[j]:
                signals = measure([models[i], models[j]], base)
                for k in self.KEYS:
                    sums[k] += signals[k] * base.size
                sums["weight"] += base.size

    def add_unchanged(self, base):
        """A tensor no model changed: it only counts in the base's size (for the relative norm)."""
        import numpy as np

        self.base_sq += float(np.square(base, dtype=np.float64).sum())

    def features(self, members=None):
        """The feature dict of ``members`` (indices; default all): means over their pairs."""
        members = sorted(range(self.n) if members is None else members)
        pairs = [(i, j) for i in members for j in members if i < j]
        weights = [self.pairs[p]["weight"] for p in pairs]
        if not pairs or not any(weights):
            return None
        out = {
            k: sum(self.pairs[p][k] / w for p, w in zip(pairs, weights) if w) / sum(1 for w in weights if w)
            for k in self.KEYS
        }
        norms = {i: math.sqrt(max(self.dots[i][i], 0.0)) for i in members}
        cos = [self.dots[i][j] / (norms[i] * norms[j]) if norms[i] and norms[j] else 0.0 for i, j in pairs]
        out["cosine"] = sum(cos) / len(cos)
        top = max(norms.values())
        out["norm_ratio"] = min(norms.values()) / top if top > 0 else 1.0
        rel = sum(norms.values()) / len(norms) / math.sqrt(self.base_sq) if self.base_sq > 0 else 0.0
        out["log_rel_norm"] = math.log10(max(rel, 1e-12))
        return {k: out[k] for k in STRUCTURAL}


def pair_features(models, base):
    """Structural features of ``models`` (dicts name -> array) against ``base`` (the same names)."""
    acc = FeatureAccumulator(len(models))
    for name in sorted(base):
        if all(name in m and m[name].shape == base[name].shape for m in models) and base[name].dtype.kind == "f":
            if all((m[name] == base[name]).all() for m in models):
                acc.add_unchanged(base[name])
            else:
                acc.add([m[name] for m in models], base[name].astype("float64"))
    return acc.features()


def functional_features(activations, base_activations):
    """Functional features from probe activations: the models' activation changes from the base's,
    compared (mean pairwise cosine) and sized (relative to the base's activations)."""
    import numpy as np

    base = np.asarray(base_activations, np.float64).ravel()
    deltas = [np.asarray(a, np.float64).ravel() - base for a in activations]
    if any(d.shape != base.shape for d in deltas):
        raise ConfigError(
            "the probe returned activations of different sizes for the models",
            hint="the probe command must print the same number of values for every model",
        )
    cos = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            na, nb = np.linalg.norm(deltas[i]), np.linalg.norm(deltas[j])
            cos.append(float(deltas[i] @ deltas[j] / (na * nb)) if na and nb else 0.0)
    rel = np.mean([np.linalg.norm(d) for d in deltas]) / max(np.linalg.norm(base), 1e-12)
    return {"act_cosine": float(np.mean(cos)), "log_act_rel": math.log10(max(float(rel), 1e-12))}


@dataclass
class Prediction:
    """auto's pick and why: the features, every candidate's predicted score, the predictor used."""

    operator: str
    params: dict
    features: dict
    scores: list  # [(recipe, predicted normalized accuracy)], best first
    predictor: str
    branches: list = None
    notes: list = field(default_factory=list)
    #: where the functional features came from, or why there are none
    functional: str = None

    @property
    def recipe(self):
        return " ".join([self.operator, *(f"{k}={v}" for k, v in sorted(self.params.items()))])

    def to_json(self):
        return {
            "operator": self.operator,
            "params": self.params,
            "features": self.features,
            "predicted": [{"recipe": r, "score": s} for r, s in self.scores],
            "predictor": self.predictor,
            "branches": self.branches,
            "notes": self.notes,
            "functional_source": self.functional,
        }


def _check(data, source):
    """The predictor file's format (raises ConfigError naming what is wrong)."""

    def bad(what):
        return ConfigError(f"{source}: {what}", hint="reinstall git-theta or refit with bench/fit_merge_auto.py")

    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise bad(f"not an auto predictor of schema {SCHEMA}")
    models = data.get("models")
    if not isinstance(models, dict) or "structural" not in models:
        raise bad("no 'structural' predictor")
    for name, model in models.items():
        feats = model.get("features")
        if not isinstance(feats, list) or not all(isinstance(f, str) for f in feats):
            raise bad(f"predictor {name!r}: 'features' is not a list of names")
        n = len(feats)
        for key in ("mean", "scale", *(("low", "high") if "low" in model or "high" in model else ())):
            vals = model.get(key)
            if (
                not isinstance(vals, list)
                or len(vals) != n
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals)
            ):
                raise bad(f"predictor {name!r}: {key!r} must be {n} finite numbers")
        if any(v == 0 for v in model["scale"]):
            raise bad(f"predictor {name!r}: a zero in 'scale'")
        cands = model.get("candidates")
        if not isinstance(cands, list) or not cands:
            raise bad(f"predictor {name!r}: no candidates")
        for c in cands:
            ok = (
                isinstance(c, dict)
                and isinstance(c.get("operator"), str)
                and isinstance(c.get("params", {}), dict)
                and isinstance(c.get("intercept"), (int, float))
                and isinstance(c.get("coef"), list)
                and len(c["coef"]) == n
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in c["coef"])
                and isinstance(c.get("max_models", 0), (int, type(None)))
            )
            if not ok:
                raise bad(f"predictor {name!r}: a candidate is not {{operator, params, intercept, coef[{n}]}}")
    return data


def load_predictor(path=None):
    """The predictor data (checked); ``path`` defaults to the file shipped with git-theta."""
    path = Path(path or MODEL_FILE)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the auto predictor ({exc.strerror})", hint="reinstall git-theta"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: the auto predictor is not JSON ({exc.msg})", hint="reinstall git-theta") from None
    return _check(data, path)


def _recipe(c):
    return " ".join([c["operator"], *(f"{k}={v}" for k, v in sorted(c.get("params", {}).items()))])


def predict(features, n_models, data=None):
    """Every candidate's predicted normalized accuracy, best first: a Prediction (features as given;
    the functional predictor when its features are all present)."""
    data = data or load_predictor()
    name = "functional" if "functional" in data["models"] and all(k in features for k in FUNCTIONAL) else "structural"
    model = data["models"][name]
    x = dict(features, n_models=float(n_models))
    missing = [f for f in model["features"] if f not in x]
    if missing:
        raise ConfigError(
            f"auto predictor {name!r} needs features {', '.join(missing)}",
            hint="reinstall git-theta or refit with bench/fit_merge_auto.py",
        )
    values = [x[f] for f in model["features"]]
    if "low" in model:  # a linear model extrapolates badly: features outside the fitted range are clipped
        values = [min(max(v, lo), hi) for v, lo, hi in zip(values, model["low"], model["high"])]
    z = [(v - m) / s for v, m, s in zip(values, model["mean"], model["scale"])]
    scored = []
    for c in model["candidates"]:
        if c.get("max_models") and n_models > c["max_models"]:
            continue
        scored.append((c["intercept"] + sum(w * v for w, v in zip(c["coef"], z)), c))
    scored.sort(key=lambda s: -s[0])
    best = scored[0][1]
    return Prediction(
        best["operator"],
        {k: str(v) for k, v in best.get("params", {}).items()},
        {k: x[k] for k in model["features"]},
        [(_recipe(c), s) for s, c in scored],
        name,
    )


def choose_branches(pair_predictions, n_branches, set_score):
    """Greedy choice of branches for three or more models.

    ``pair_predictions[i]`` is the best predicted score of merging HEAD with branch i;
    ``set_score(indices)`` predicts the best score of merging HEAD with those branches. Branches are
    tried in descending pairwise order; one is kept when (tasks kept) × (predicted score) rises.
    Returns (indices kept in order, notes).
    """
    order = sorted(range(n_branches), key=lambda i: -pair_predictions[i])
    kept, total, notes = [], None, []
    for i in order:
        trial = kept + [i]
        score = set_score(trial)
        value = (len(trial) + 1) * score
        if total is None or value > total:
            kept, total = trial, value
        else:
            notes.append((i, score))
    return kept, notes
