"""Turn user-given operator parameters (git config values, ``--param K=V``) into checked values.

Values arrive as strings ("0.2", "true", "0.7,0.3") or lists of per-model values. Unknown
parameters, a wrong number of per-model values and out-of-range values are errors that name the
operator and its valid parameters. (mergekit silently ignores unknown parameters, so a typo such as
``normalise`` goes unnoticed there; here it is refused.)

A value may also vary by tensor, as in mergekit recipes (``MERGE-OPERATORS.md`` §1): a **gradient**
``[0, 0.5, 1]`` is interpolated linearly at the tensor's layer position ``x = layer/(layers−1)``
(tensors outside the layer stack take ``x = 0``, i.e. the first value), and a **filter list**
``[{filter: self_attn, value: 0.3}, {value: 0.5}]`` takes the first entry whose ``filter`` is a
substring of the tensor name (no filter or ``"*"``: any tensor). In text (git config, ``--param``,
``.thetamerge``) such a value is written in YAML flow syntax; per-model values are still separated
by top-level commas: ``weight=[0,1],0.5`` gives ours a gradient and theirs 0.5. Nothing is executed:
the text is read with ``yaml.safe_load``.
"""

import math
import re

from git_theta.errors import UsageError

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
    if value is None:
        return "(required)"
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
        raise UsageError(f"{where} must be a finite {spec.kind}, not {value!r}", hint=describe(operator)) from None
    if spec.kind in ("float", "int"):
        if (spec.low is not None and out < spec.low) or (spec.high is not None and out > spec.high):
            lo = "-inf" if spec.low is None else spec.low
            hi = "inf" if spec.high is None else spec.high
            raise UsageError(f"{where} must be in [{lo}, {hi}], got {out}", hint=describe(operator))
    return out


def _split_top(text):
    """``text`` split at commas outside brackets and braces ("[0,1],0.5" -> ["[0,1]", "0.5"])."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _values(raw):
    """The list of raw values given for one parameter (comma list or list)."""
    if isinstance(raw, (list, tuple)):
        return list(raw)
    if isinstance(raw, str):
        return _split_top(raw)
    return [raw]


def parse_setting(value, where):
    """A value as given (string, number, list, dict) -> a scalar, gradient list or filter list.

    Strings starting with ``[`` or ``{`` are YAML flow text; UsageError when they do not parse.
    """
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UsageError(
                f"{where}: cannot read {value.strip()!r} ({str(exc).splitlines()[0]})",
                hint="write a gradient as [0, 0.5, 1] and a filter list as [{filter: mlp, value: 0.3}, {value: 0.5}]",
            ) from None
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if not value:
            raise UsageError(f"{where}: an empty list is no value", hint="give a number, a gradient or a filter list")
        for item in value:
            if isinstance(item, dict):
                extra = sorted(set(item) - {"filter", "value"})
                if extra or "value" not in item:
                    raise UsageError(
                        f"{where}: a filter entry takes 'filter' and 'value', got {sorted(item)}",
                        hint="for example [{filter: self_attn, value: 0.3}, {value: 0.5}]",
                    )
                item["value"] = parse_setting(item["value"], where)
            elif isinstance(item, list):
                raise UsageError(f"{where}: a gradient holds numbers, not lists", hint="for example [0, 0.5, 1]")
    return value


def evaluate(setting, tensor, x):
    """The scalar ``setting`` takes for tensor ``tensor`` at layer position ``x`` (mergekit's rule);
    None when a filter list has no entry for this tensor (the default then applies)."""
    if not isinstance(setting, list):
        return setting
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        scaled = x * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if not any(isinstance(v, dict) for v in setting):
        return setting[int(x * (len(setting) - 1))]  # a list of non-numbers: stepwise, as mergekit
    for cond in setting:
        where = cond.get("filter") if isinstance(cond, dict) else None
        if where is None or where == "*" or (tensor and str(where) in tensor):
            return evaluate(cond["value"] if isinstance(cond, dict) else cond, tensor, x)
    return None


def leaves(setting):
    """Every scalar a setting can take (to check them all before anything is merged)."""
    if not isinstance(setting, list):
        return [setting]
    out = []
    for item in setting:
        out += leaves(item["value"] if isinstance(item, dict) else item)
    return out


#: the layer index in a tensor name: model.layers.3.mlp..., transformer.h.3..., blocks.3...
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(name):
    """The layer index in tensor name ``name``, or None for tensors outside the layer stack."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_count(names):
    """The number of layers of a model with tensors ``names`` (largest layer index + 1; 0 if none)."""
    found = [layer_index(n) for n in names]
    return max((i for i in found if i is not None), default=-1) + 1


def position(name, layers):
    """mergekit's gradient position of tensor ``name`` in a stack of ``layers`` layers: layer/(layers−1);
    0 outside the stack (embeddings, final norm, lm_head); 1 in a one-layer stack (as mergekit)."""
    index = layer_index(name)
    if index is None or layers <= 0:
        return 0.0
    return index / (layers - 1) if layers > 1 else 1.0


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


def resolve(operator, raw, n_models, tensor=None, x=0.0):
    """Checked parameters of ``operator`` for a merge of ``n_models`` models.

    ``raw`` maps parameter names (case-insensitive, '-' = '_') to strings or lists (per-model values in model order, ours
    first); a single per-model value is broadcast to every model. Missing parameters get their
    (mergekit) defaults. Gradients and filter lists are evaluated for tensor ``tensor`` at layer
    position ``x``; with ``tensor`` None (a check before merging) every value they can take is
    checked and the first one returned. Returns a dict with every parameter of the operator;
    per-model values are lists of length ``n_models``. Raises UsageError for unknown parameters,
    wrong counts and out-of-range values, and for the operator's own cross-parameter constraints.
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
                out[key] = [_setting(operator, key, spec, v, tensor, x) for v in values]
            else:
                if len(values) != 1:
                    raise UsageError(
                        f"parameter {key!r} of merge operator {operator.name!r} takes a single "
                        f"value, got {len(values)}",
                        hint=describe(operator),
                    )
                out[key] = _setting(operator, key, spec, values[0], tensor, x)
        else:
            out[key] = [spec.default] * n_models if spec.per_model else spec.default
    operator.validate(out, n_models)
    return out


def _setting(operator, key, spec, value, tensor, x):
    """One (per-model) value of ``key``: a scalar, or a gradient/filter list evaluated here."""
    setting = parse_setting(value, f"parameter {key!r} of merge operator {operator.name!r}")
    if not isinstance(setting, list):
        return _parse_one(operator, key, spec, setting)
    if tensor is None:
        checked = [_parse_one(operator, key, spec, v) for v in leaves(setting)]
        value = evaluate(setting, None, 0.0)
        return checked[0] if value is None else _parse_one(operator, key, spec, value)
    value = evaluate(setting, tensor, x)
    return spec.default if value is None else _parse_one(operator, key, spec, value)
