"""Spherical interpolation: ``slerp``, ``nuslerp``, ``multislerp``, ``karcher``.

Each tensor is a vector (flattened, unless ``nuslerp`` is told otherwise) and the operators
interpolate its direction on the sphere while blending norms, as mergekit does. ``slerp`` and
``karcher`` ignore the merge base; ``nuslerp`` and ``multislerp`` work on task vectors when there is
a base (always, inside ``git merge``) and on the weights themselves without one.
"""

import math

from git_theta.merge.operator import MergeOperator, OperatorError, Param
from git_theta.merge.operators.basic import WEIGHT


def _lerp(t, a, b):
    dtype = a.dtype.type
    return dtype(1 - t) * a + dtype(t) * b


class Slerp(MergeOperator):
    name = "slerp"
    needs_base = False
    min_models = max_models = 2
    params = {
        "t": Param(0.5, "float", low=0.0, high=1.0, doc="interpolation factor: 0 = ours, 1 = theirs"),
    }
    summary = "out = sin((1−t)Ω)/sin Ω·A + sin(tΩ)/sin Ω·B, cos Ω = Â·B̂; lerp if |cos Ω| > 0.9995"
    paper = "Shoemake 1985 (quaternion slerp); applied to flattened tensors by mergekit"

    #: above this |cos| (colinear or antipodal) slerp degenerates: mergekit lerps instead
    DOT_THRESHOLD = 0.9995

    def merge(self, models, base, params, rng):
        import numpy as np

        a, b = models
        t = params["t"]
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        ua = a / na if na > 1e-8 else a
        ub = b / nb if nb > 1e-8 else b
        dot = float(np.clip(np.vdot(ua, ub), -1.0, 1.0))
        if abs(dot) > self.DOT_THRESHOLD:
            return np.asarray(_lerp(t, a, b), dtype=a.dtype)
        omega = math.acos(dot)
        s = math.sin(omega)
        dtype = a.dtype.type
        out = dtype(math.sin((1 - t) * omega) / s) * a + dtype(math.sin(t * omega) / s) * b
        return np.asarray(out, dtype=a.dtype)


def _nuslerp(t, v0, v1, eps=1e-7):
    """Slerp along the last axis of ``v0``/``v1`` (rows), lerp where a pair is exactly colinear.

    The operations are mergekit's, in its order (sum of the two sine terms, then one division by
    sin Ω), so float32 rounding agrees with it entry for entry, not only to a tolerance.
    """
    import numpy as np

    dtype = v0.dtype.type
    u0 = v0 / np.maximum(np.linalg.norm(v0, axis=-1, keepdims=True), dtype(eps))
    u1 = v1 / np.maximum(np.linalg.norm(v1, axis=-1, keepdims=True), dtype(eps))
    c = np.clip((u0 * u1).sum(axis=-1, keepdims=True), -1, 1)
    del u0, u1
    colinear = (1 - c * c) <= 1e-16
    if colinear.all():
        return _lerp(t, v0, v1)
    omega = np.arccos(np.where(colinear, dtype(0), c))
    with np.errstate(divide="ignore", invalid="ignore"):  # colinear rows divide by 0; replaced below
        out = np.sin(dtype(1 - t) * omega) * v0
        out += np.sin(dtype(t) * omega) * v1
        out /= np.sin(omega)
    if colinear.any():
        out = np.where(colinear, _lerp(t, v0, v1), out)
    return out


class Nuslerp(MergeOperator):
    name = "nuslerp"
    base_optional = True
    min_models = max_models = 2
    params = {
        "weight": WEIGHT,
        "nuslerp_flatten": Param(True, "bool", doc="treat the whole tensor as one vector"),
        "nuslerp_row_wise": Param(False, "bool", doc="slerp columns (dim 0) instead of rows"),
    }
    summary = "out = θ0 + slerp(t, δA, δB), t = w_B/(w_A+w_B) (no base: slerp of θA, θB)"
    paper = "— (mergekit; slerp of task vectors)"

    def merge(self, models, base, params, rng):
        import numpy as np

        w0, w1 = params["weight"]
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        v0, v1 = (m - base for m in models) if base is not None else models
        shape = v0.shape
        if params["nuslerp_row_wise"] and v0.ndim >= 2:
            v0, v1 = np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)
        if params["nuslerp_flatten"]:
            out = _nuslerp(t, v0.reshape(-1), v1.reshape(-1)).reshape(shape)
        else:
            out = _nuslerp(t, v0, v1)
            if params["nuslerp_row_wise"] and v0.ndim >= 2:
                out = np.swapaxes(out, 0, -1)
        out = out.reshape(shape)
        if base is not None:
            out = base + out
        return np.asarray(out, dtype=models[0].dtype)


class Multislerp(MergeOperator):
    name = "multislerp"
    base_optional = True
    params = {
        "weight": WEIGHT,
        "normalize_weights": Param(True, "bool", doc="divide the weights by their sum"),
        "eps": Param(1e-8, "float", low=0.0, doc="numerical floor"),
    }
    summary = "out = θ0 + exp_m̂(Σ wi·log_m̂(δ̂i))·Σ wi‖δi‖, m̂ = normalised Σ wi δ̂i (one tangent step)"
    paper = "— (mergekit; C. Goddard's multislerp blog post, one-step spherical barycentre)"

    def merge(self, models, base, params, rng):
        import numpy as np

        dtype = models[0].dtype
        if len(models) == 1:
            return models[0].copy()
        eps = dtype.type(params["eps"])
        x = np.stack([(m - base) if base is not None else m for m in models]).reshape(len(models), -1)
        w = np.asarray(params["weight"], dtype=dtype)
        if params["normalize_weights"]:
            w = w / w.sum()
        norms = np.linalg.norm(x, axis=1)
        # unit vectors ui = xi/(ni+eps) are never materialised: m = Σ wi ui = (w/(n+eps)) @ x, and the
        # tangent mean Σ wi (ui − (ui·m̂) m̂) = m − (Σ wi ui·m̂) m̂ (memory: the stacked inputs + 2).
        # That is m − (m·m̂) m̂ = 0 analytically: the step only carries rounding, as in mergekit, and
        # the result is m̂·Σ wi‖xi‖ (kept in mergekit's form so the two agree to rounding)
        inv = dtype.type(1) / (norms + eps)
        mean = (w * inv) @ x
        mean_norm = np.linalg.norm(mean)
        if mean_norm < eps:
            if len(models) != 2:
                raise OperatorError(
                    "multislerp: the weighted unit task vectors cancel out, so their direction is undefined",
                    hint="use linear or task_arithmetic for this tensor",
                )
            out = w[0] * x[0] + w[1] * x[1]
        else:
            mean /= mean_norm
            dots = (x @ mean) * inv
            tau = mean * (mean_norm - (w @ dots))
            tau_norm = np.linalg.norm(tau) + eps
            out = mean * np.cos(tau_norm)
            out += tau * (np.sin(tau_norm) / tau_norm)
            out *= (norms * w).sum()
        out = out.reshape(models[0].shape)
        if base is not None:
            out = base + out
        return np.asarray(out, dtype=dtype)


class Karcher(MergeOperator):
    name = "karcher"
    needs_base = False
    params = {
        "max_iter": Param(10, "int", low=1, doc="iterations of the Riemannian mean"),
        "tol": Param(1e-5, "float", low=0.0, doc="convergence tolerance"),
    }
    summary = "out = (mean ‖θi‖)·μ, μ = Karcher mean of θi/‖θi‖ on the unit sphere"
    paper = "Karcher 1977 (Riemannian centre of mass); mergekit cites arXiv:2603.04972"

    def merge(self, models, base, params, rng):
        import numpy as np

        dtype = models[0].dtype
        tol = params["tol"]
        alpha = 1.0 / len(models)
        norms = [float(np.linalg.norm(m)) for m in models]
        units = [m.reshape(-1) / dtype.type(n) for m, n in zip(models, norms) if n > tol]
        if not units:
            return np.zeros_like(models[0])
        a = 1.0 / len(units)  # weights renormalised over the inputs that have a direction
        mu = sum(dtype.type(a) * u for u in units)
        mu_norm = float(np.linalg.norm(mu))
        mu = units[0].copy() if mu_norm < tol else mu / dtype.type(mu_norm)
        for _ in range(params["max_iter"]):
            step = np.zeros_like(mu)
            for u in units:
                c = float(np.clip(np.vdot(mu, u), -1.0, 1.0))
                phi = math.acos(c)
                s = math.sin(phi)
                if phi < tol or s < tol:  # at μ already, or antipodal (log map undefined)
                    continue
                step += dtype.type(a * phi / s) * (u - dtype.type(c) * mu)
            step_norm = float(np.linalg.norm(step))
            if step_norm < tol:
                break
            mu = dtype.type(math.cos(step_norm)) * mu + dtype.type(math.sin(step_norm) / step_norm) * step
            mu_norm = float(np.linalg.norm(mu))
            if mu_norm > tol:
                mu = mu / dtype.type(mu_norm)
        scale = sum(alpha * n for n in norms)
        return np.asarray((dtype.type(scale) * mu).reshape(models[0].shape), dtype=dtype)
