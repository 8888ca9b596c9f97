"""mergekit YAML recipes: read one, check it, and plan it onto the merge engine.

A recipe (mergekit 0.1.5's ``MergeConfiguration``) names a ``merge_method``, its ``models`` (or
``slices`` of layers), an optional ``base_model``, and ``parameters`` globally, per model and per
slice. Values may be scalars, gradients or filter lists (:mod:`.params`). The recipe is read with
``yaml.safe_load`` (data only) and checked key by key: an unknown key is an error naming it; keys
that only matter to mergekit's tokenizer, hub or GPU handling are accepted and reported as notes.

Planning turns the recipe into what :func:`.engine.merge_manifests` merges: one manifest per input
position (ours first), a base manifest, and a :class:`RecipeConfig` that gives every tensor the
recipe's operator and its parameters for that tensor. Which model plays which part follows mergekit:

* methods on task vectors (``ties``, ``dare_*``, ``ram``, ...): the base is ``base_model`` and the
  inputs are the other models; a ``base_model`` listed under ``models`` is not an input;
* ``slerp``, ``nearswap``, ``arcee_fusion``: ``base_model`` is the first input (the t = 0 end),
  the other model the second;
* ``linear``, ``karcher``, ``passthrough``: every model is an input, ``base_model`` too (appended
  when it is not listed);
* ``nuslerp``, ``multislerp``: as task-vector methods with a ``base_model``, else on the weights.

With ``slices``, output layer ``j`` of a slice is layer ``layer_range[0] + j`` of each source;
parameters of a slice's sources, then of the slice, then global apply, and gradients run across the
slice (``x = j / (len − 1)``; 1 for a one-layer slice). Tensors outside the layer stack come from
the first slice's sources when their name holds ``embed``/``wte``/``wpe`` and from the last slice's
otherwise (mergekit reads this from the architecture; we read it from the name).
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

from git_theta.errors import UsageError
from git_theta.merge.config import Choice, MergeConfig
from git_theta.merge.params import evaluate, layer_count, layer_index, parse_setting

#: recipe keys this reads
TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype"}
#: keys that only shape mergekit's tokenizer output: accepted, noted, ignored
TOKENIZER_KEYS = {"tokenizer_source", "tokenizer", "chat_template"}
#: mergekit options (its command-line/hub/GPU/IO settings) some recipes carry: accepted, noted
OPTION_KEYS = {
    "allow_crimes",
    "unsafe_truncate_embeddings",
    "transformers_cache",
    "lora_merge_cache",
    "lora_merge_dtype",
    "cuda",
    "device",
    "low_cpu_memory",
    "out_shard_size",
    "copy_tokenizer",
    "clone_tensors",
    "trust_remote_code",
    "lazy_unpickle",
    "write_model_card",
    "safe_serialization",
    "verbosity",
    "quiet",
    "read_to_gpu",
    "multi_gpu",
    "num_threads",
    "gpu_rich",
    "async_write",
    "write_threads",
    "name",
}
MODEL_KEYS = {"model", "parameters"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
SLICE_KEYS = {"sources", "base_model", "parameters"}
#: the recipe's base_model is their first input (slerp's t = 0 end)
BASE_FIRST = {"slerp", "nearswap", "arcee_fusion"}
#: recipe dtype names -> git-theta dtype names
DTYPES = {
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "float64": "F64",
}
_EMBED = re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.")


@dataclass
class Source:
    """One input of a slice: a model reference, its layer range (None: all) and its parameters."""

    model: str
    layer_range: tuple = None
    params: dict = field(default_factory=dict)


@dataclass
class Slice:
    sources: list
    params: dict = field(default_factory=dict)
    base_model: str = None


@dataclass
class Recipe:
    """A checked mergekit recipe. ``slices`` is None for a ``models:`` recipe (then ``models``)."""

    source: str
    method: str
    base_model: str = None
    models: list = None  # [Source] (layer_range None)
    slices: list = None  # [Slice]
    params: dict = field(default_factory=dict)
    dtype: str = None
    out_dtype: str = None
    seed: int = None
    notes: list = field(default_factory=list)

    def references(self):
        """Every model reference, base first, each once, in recipe order."""
        refs = [self.base_model] if self.base_model else []
        for s in self.models or ():
            refs.append(s.model)
        for piece in self.slices or ():
            refs += [piece.base_model] if piece.base_model else []
            refs += [s.model for s in piece.sources]
        return list(dict.fromkeys(refs))


def load_recipe(path):
    """Read and check the recipe file ``path``; UsageError naming the file and key when it is wrong."""
    import yaml

    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the recipe ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(
            f"{path}: not valid YAML ({str(exc).splitlines()[0]})",
            hint="a mergekit recipe is a YAML mapping with merge_method and models or slices",
        ) from None
    return parse_recipe(data, path)


def parse_recipe(data, source="recipe"):
    """A :class:`Recipe` from the YAML data of a recipe (``source`` names it in messages)."""
    from git_theta.merge.engine import get_operator

    if not isinstance(data, dict):
        raise UsageError(
            f"{source}: a recipe is a mapping of keys, not {type(data).__name__}",
            hint="start from a mergekit recipe: merge_method, base_model, models, parameters",
        )
    recipe = Recipe(source, method=None)
    for key in data:
        if key in TOKENIZER_KEYS:
            recipe.notes.append(f"{source}: '{key}' ignored (an output folder gets the base model's tokenizer files)")
        elif key == "random_seed":
            recipe.seed = _int(data[key], source, key)
        elif key in OPTION_KEYS:
            recipe.notes.append(f"{source}: '{key}' ignored (a mergekit hub/GPU/IO option)")
        elif key == "modules":
            raise UsageError(
                f"{source}: 'modules' (multi-module models) is not supported", hint="use models: or slices:"
            )
        elif key not in TOP_KEYS:
            raise UsageError(
                f"{source}: unknown key {key!r}", hint=f"recipe keys: {', '.join(sorted(TOP_KEYS | TOKENIZER_KEYS))}"
            )
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise UsageError(f"{source}: 'merge_method' is missing", hint="for example merge_method: ties")
    get_operator(method, f"{source}: merge_method")  # an unknown method: error naming the valid ones
    recipe.method = method
    recipe.base_model = (
        _ref(data.get("base_model"), source, "base_model") if data.get("base_model") is not None else None
    )
    recipe.params = _params(data.get("parameters"), source, "parameters")
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None:
            name = str(data[key]).lower().replace("torch.", "")
            if name not in DTYPES:
                raise UsageError(
                    f"{source}: {key} {data[key]!r} is not a floating dtype", hint=f"one of {', '.join(sorted(DTYPES))}"
                )
            setattr(recipe, key, DTYPES[name])
    has_models, has_slices = data.get("models") is not None, data.get("slices") is not None
    if has_models == has_slices:
        raise UsageError(
            f"{source}: give exactly one of 'models' and 'slices'",
            hint="models: [{model: PATH}, ...] merges whole models; slices: stacks layer ranges",
        )
    if has_models:
        recipe.models = [
            _source(item, source, f"models[{i}]", MODEL_KEYS)
            for i, item in enumerate(_list(data["models"], source, "models"))
        ]
    else:
        recipe.slices = []
        for i, item in enumerate(_list(data["slices"], source, "slices")):
            where = f"slices[{i}]"
            _keys(item, SLICE_KEYS, source, where)
            sources = [
                _source(s, source, f"{where}.sources[{j}]", SOURCE_KEYS)
                for j, s in enumerate(_list(item.get("sources"), source, f"{where}.sources"))
            ]
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
            if len(lengths) > 1:
                raise UsageError(
                    f"{source}: {where}: every source must have the same number of layers",
                    hint="give each source a layer_range of the same length",
                )
            base = item.get("base_model")
            recipe.slices.append(
                Slice(
                    sources,
                    _params(item.get("parameters"), source, f"{where}.parameters"),
                    _ref(base, source, f"{where}.base_model") if base is not None else None,
                )
            )
        counts = {len(s.sources) for s in recipe.slices}
        if len(counts) > 1:
            raise UsageError(
                f"{source}: slices with different numbers of sources are not supported",
                hint="give every slice the same number of sources",
            )
    return recipe


def _keys(item, allowed, source, where):
    if not isinstance(item, dict):
        raise UsageError(f"{source}: {where} must be a mapping", hint=f"keys: {', '.join(sorted(allowed))}")
    for key in item:
        if key not in allowed:
            raise UsageError(f"{source}: {where}: unknown key {key!r}", hint=f"keys: {', '.join(sorted(allowed))}")


def _list(value, source, where):
    if not isinstance(value, list) or not value:
        raise UsageError(f"{source}: {where} must be a non-empty list")
    return value


def _int(value, source, key):
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{source}: {key} must be an integer, not {value!r}")
    return value


def _ref(value, source, where):
    """A model reference: a path or a git revision. LoRA references (``base+adapter``) are refused."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{source}: {where} must name a model (a path, or a revision for git theta merge)")
    if "+" in value and not Path(value).exists():
        raise UsageError(
            f"{source}: {where}: {value!r} applies a LoRA adapter, which recipes here do not",
            hint="merge the adapter first (git theta add --adapter), then name the result",
        )
    return value


def _source(item, source, where, allowed):
    _keys(item, allowed, source, where)
    if "model" not in item:
        raise UsageError(f"{source}: {where}: 'model' is missing")
    layer_range = None
    if "layer_range" in allowed:
        lr = item.get("layer_range")
        if (
            not isinstance(lr, list)
            or len(lr) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in lr)
            or not 0 <= lr[0] < lr[1]
        ):
            raise UsageError(f"{source}: {where}: layer_range must be [start, end) with 0 <= start < end, not {lr!r}")
        layer_range = (lr[0], lr[1])
    return Source(
        _ref(item["model"], source, f"{where}.model"),
        layer_range,
        _params(item.get("parameters"), source, f"{where}.parameters"),
    )


def _params(value, source, where):
    """{name: setting} of a ``parameters:`` mapping, each value checked as a setting."""
    from git_theta.merge.params import canonical

    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{source}: {where} must be a mapping of parameter names to values")
    return {canonical(str(k)): parse_setting(v, f"{source}: {where}.{k}") for k, v in value.items()}


# ------------------------------------------------------------------------------------------------
# planning


@dataclass
class Part:
    """The recipe's roles for one output layer range: input sources in side order and the base."""

    inputs: list  # [Source]
    base: Source = None
    params: dict = field(default_factory=dict)


def roles(recipe, sources, base_ref):
    """(inputs, base) among ``sources`` for the recipe's method (see the module doc)."""
    from git_theta.merge.engine import get_operator

    op = get_operator(recipe.method, recipe.source)
    base = next((s for s in sources if s.model == base_ref), None) if base_ref else None
    if base_ref and base is None:
        base = Source(base_ref, sources[0].layer_range)
    others = [s for s in sources if base is None or s.model != base.model]
    if recipe.method in BASE_FIRST:
        if base is None:
            raise UsageError(
                f"{recipe.source}: {recipe.method} needs base_model (its t = 0 end)",
                hint="name one of the two models as base_model",
            )
        return [base] + others, None
    if op.needs_base and not op.base_optional:
        if base is None:
            raise UsageError(
                f"{recipe.source}: {recipe.method} needs base_model",
                hint="name the model the others were fine-tuned from as base_model",
            )
        return others, base
    if op.base_optional:
        return others, base
    return others + ([base] if base is not None else []), None


def parts(recipe):
    """One :class:`Part` per slice (a ``models:`` recipe is one part over all layers)."""
    if recipe.slices is None:
        inputs, base = roles(recipe, recipe.models, recipe.base_model)
        return [Part(inputs, base)]
    out = []
    for piece in recipe.slices:
        inputs, base = roles(recipe, piece.sources, piece.base_model or recipe.base_model)
        out.append(Part(inputs, base, piece.params))
    return out


class RecipeConfig(MergeConfig):
    """A MergeConfig that gives each tensor the recipe's operator and parameters for it.

    ``layout`` maps an output tensor name to (part index, gradient position) for sliced recipes;
    for a ``models:`` recipe it is empty and the engine evaluates gradients at the tensor's layer.
    """

    def __init__(self, recipe, plan, layout=None):
        super().__init__(operator=recipe.method, seed=recipe.seed)
        self.recipe = recipe
        self.plan = plan
        self.layout = layout or {}
        self.operator_origin = f"recipe {recipe.source}"
        self.params = {k: v for k, v in self.raw(plan[0]).items()}  # checked by engine.check_config

    def choose(self, path, tensor_name):
        index, x = self.layout.get(tensor_name, (0, None))
        part = self.plan[index]
        raw = self.raw(part)
        if x is not None:  # sliced: this tensor's position in its slice
            raw = {k: [evaluate(v, tensor_name, x) for v in values] for k, values in raw.items()}
            raw = {k: [self._default(k) if v is None else v for v in values] for k, values in raw.items()}
        return Choice(self.recipe.method, raw, self.operator_origin, frozenset(raw))

    def _default(self, key):
        from git_theta.merge.engine import get_operator

        return get_operator(self.recipe.method).params[key].default

    def raw(self, part):
        """{param: [setting per input]} for per-model parameters, {param: [setting]} for the others.

        A model's own value wins over its slice's, which wins over the global one (as mergekit);
        names the method does not take are left out (see :func:`check`).
        """
        from git_theta.merge.engine import get_operator

        op = get_operator(self.recipe.method)
        out = {}
        for key, spec in op.params.items():
            common = part.params.get(key, self.recipe.params.get(key))
            if spec.per_model:
                values = [s.params.get(key, common) for s in part.inputs]
                if all(v is None for v in values):
                    continue
                out[key] = [spec.default if v is None else v for v in values]
            elif common is not None:
                out[key] = [common]
        return out


def check(recipe, plan):
    """Notes for parameter names the method does not take; errors for names no method has."""
    from git_theta import registry as plugins
    from git_theta.merge.engine import get_operator

    op = get_operator(recipe.method)
    known = set().union(*(plugins.get("merge", n).params for n in plugins.names("merge")))
    given = set(recipe.params)
    for piece in recipe.slices or ():
        given |= set(piece.params)
        for s in piece.sources:
            given |= set(s.params)
    for s in recipe.models or ():
        given |= set(s.params)
    notes = []
    for key in sorted(given - set(op.params)):
        if key not in known:
            raise UsageError(
                f"{recipe.source}: unknown parameter {key!r} (no merge method takes it)",
                hint=f"parameters of {recipe.method}: {', '.join(sorted(op.params)) or 'none'}",
            )
        notes.append(f"{recipe.source}: parameter {key!r} ignored ({recipe.method} does not take it)")
    return notes


def sliced_manifests(recipe, plan, manifests, fmt):
    """Sides, base and layout of a sliced recipe: per input position a manifest whose tensors are
    renamed from each source's layers to the output layers (``manifests``: model ref -> Manifest)."""
    from git_theta.manifest import Manifest

    n_inputs = len(plan[0].inputs)
    sides = [Manifest(format=fmt) for _ in range(n_inputs)]
    has_base = plan[0].base is not None
    base = Manifest(format=fmt) if has_base else None
    layout, out_layer = {}, 0
    for index, part in enumerate(plan):
        length = part.inputs[0].layer_range[1] - part.inputs[0].layer_range[0]
        for j in range(length):
            x = j / (length - 1) if length > 1 else 1.0
            for k, src in enumerate(part.inputs + ([part.base] if has_base else [])):
                target = sides[k] if k < n_inputs else base
                names = _layer_tensors(manifests[src.model], src.layer_range[0] + j, recipe.source, src)
                for name, entry in names.items():
                    out = _with_layer(name, out_layer)
                    target.tensors[out] = _renamed(entry, out)
                    layout[out] = (index, x)
            out_layer += 1
    for index, pick in ((0, lambda n: _EMBED.search(n)), (len(plan) - 1, lambda n: not _EMBED.search(n))):
        part = plan[index]
        for k, src in enumerate(part.inputs + ([part.base] if has_base else [])):
            target = sides[k] if k < n_inputs else base
            manifest = manifests[src.model]
            for name, entry in manifest.tensors.items():
                if layer_index(name) is None and pick(name):
                    target.tensors[name] = entry
                    layout[name] = (index, 0.0)
            if k == 0 and index == 0:
                for side in sides + ([base] if base is not None else []):
                    side.fields = dict(manifest.fields)
    for m in sides + ([base] if base is not None else []):
        m.tensors = dict(sorted(m.tensors.items()))
    return sides, base, layout


def _layer_tensors(manifest, layer, source, src):
    found = {n: e for n, e in manifest.tensors.items() if layer_index(n) == layer}
    if not found:
        raise UsageError(
            f"{source}: {src.model} has no layer {layer} (layer_range {list(src.layer_range)}; "
            f"it has {layer_count(manifest.tensors)} layers)",
            hint="fix the layer_range",
        )
    return found


_LAYER_SUB = re.compile(r"((?:^|\.)(?:layers|layer|h|blocks|block)\.)(\d+)(?=\.|$)")


def _with_layer(name, layer):
    return _LAYER_SUB.sub(lambda m: f"{m.group(1)}{layer}", name, count=1)


def _renamed(entry, name):
    from git_theta.manifest import TensorEntry

    return TensorEntry(name, entry.dtype, entry.shape, entry.digest, entry.update, entry.objects)
