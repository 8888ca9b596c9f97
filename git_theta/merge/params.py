"""Turn user-given operator parameters (git config values, ``--param K=V``) into checked values.

Values arrive as strings ("0.2", "true", "0.7,0.3") or lists of per-model values. Unknown
parameters, a wrong number of per-model values and out-of-range values are errors that name the
operator and its valid parameters. (mergekit silently ignores unknown parameters, so a typo such as
``normalise`` goes unnoticed there; here it is refused.)
"""

import math

from ..errors import UsageError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def describe(operator):
    """'name=default (kind[, per model])' for every parameter, for hints and help."""
    if not operator.params:
        return f"{operator.name} takes no parameters"
    parts = []
    for key, spec in sorted(operator.params.items()):
        extra = ", per model" if spec.per_model else ""
        parts.append(f"{key}={_show(spec.default)} ({spec.kind}{extra})")
    return f"parameters of {operator.name}: " + ", ".join(parts)


def _show(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_one(operator, key, spec, value):
    """One scalar value of parameter ``key`` from a string (or an already typed value)."""
    where = f"parameter {key!r} of merge operator {operator.name!r}"
    text = value.strip() if isinstance(value, str) else value
    try:
        if spec.kind == "bool":
            if isinstance(text, bool):
                out = text
            elif str(text).lower() in _TRUE:
                out = True
            elif str(text).lower() in _FALSE:
                out = False
            else:
                raise ValueError
        elif spec.kind == "int":
            if isinstance(text, bool):
                raise ValueError
            out = int(text)
        elif spec.kind == "float":
            if isinstance(text, bool):
                raise ValueError
            out = float(text)
            if not math.isfinite(out):
                raise ValueError
        elif spec.kind == "str":
            out = str(text)
            if spec.choices and out not in spec.choices:
                raise UsageError(
                    f"{where} must be one of {', '.join(spec.choices)}, not {out!r}",
                    hint=describe(operator),
                )
        else:  # a plugin declared a kind we do not know: its bug, not the user's
            raise UsageError(f"{where} has unknown kind {spec.kind!r}", hint="fix the operator plugin")
    except ValueError:
        raise UsageError(
            f"{where} must be a finite {spec.kind}, not {value!r}", hint=describe(operator)
        ) from None
    if spec.kind in ("float", "int"):
        if (spec.low is not None and out < spec.low) or (spec.high is not None and out > spec.high):
            lo = "-inf" if spec.low is None else spec.low
            hi = "inf" if spec.high is None else spec.high
            raise UsageError(
                f"{where} must be in [{lo}, {hi}], got {out}", hint=describe(operator)
            )
    return out


def _values(raw):
    """The list of raw values given for one parameter (comma list or list)."""
    if isinstance(raw, (list, tuple)):
        return list(raw)
    if isinstance(raw, str):
        return [part for part in raw.split(",")]
    return [raw]


def canonical(key):
    """The parameter name ``key`` stands for: lower case, '-' read as '_' (git config names are
    case-insensitive and cannot hold '_', so ``theta.merge.select-topk`` means ``select_topk``)."""
    return key.strip().lower().replace("-", "_")


def _canonical_keys(operator, raw):
    """``raw`` with :func:`canonical` keys; the same parameter given twice is an error."""
    out = {}
    for key, value in raw.items():
        canon = canonical(key)
        if canon in out:
            raise UsageError(
                f"parameter {canon!r} of merge operator {operator.name!r} is given twice",
                hint="give each parameter once ('-' and '_' are the same)",
            )
        out[canon] = value
    return out


def resolve(operator, raw, n_models):
    """Checked parameters of ``operator`` for a merge of ``n_models`` models.

    ``raw`` maps parameter names (case-insensitive, '-' = '_') to strings or lists (per-model values in model order, ours
    first); a single per-model value is broadcast to every model. Missing parameters get their
    (mergekit) defaults. Returns a dict with every parameter of the operator; per-model values are
    lists of length ``n_models``. Raises UsageError for unknown parameters, wrong counts and
    out-of-range values, and for the operator's own cross-parameter constraints.
    """
    raw = _canonical_keys(operator, raw)
    unknown = sorted(set(raw) - set(operator.params))
    if unknown:
        raise UsageError(
            f"merge operator {operator.name!r} has no parameter {', '.join(map(repr, unknown))}",
            hint=describe(operator),
        )
    out = {}
    for key, spec in operator.params.items():
        if key in raw:
            values = _values(raw[key])
            if spec.per_model:
                if len(values) == 1:
                    values = values * n_models
                elif len(values) != n_models:
                    raise UsageError(
                        f"parameter {key!r} of merge operator {operator.name!r} takes one value "
                        f"or one per model ({n_models}: ours first), got {len(values)}",
                        hint=f"for example {key}={','.join([_show(spec.default)] * n_models)}",
                    )
                out[key] = [_parse_one(operator, key, spec, v) for v in values]
            else:
                if len(values) != 1:
                    raise UsageError(
                        f"parameter {key!r} of merge operator {operator.name!r} takes a single "
                        f"value, got {len(values)}",
                        hint=describe(operator),
                    )
                out[key] = _parse_one(operator, key, spec, values[0])
        else:
            out[key] = [spec.default] * n_models if spec.per_model else spec.default
    operator.validate(out, n_models)
    return out
