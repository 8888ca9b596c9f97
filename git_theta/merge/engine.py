"""Merging manifests: the structural rules per tensor, then the operators, tensor by tensor.

:func:`merge_manifests` is shared by the merge driver (two sides: ours, theirs), the porcelain
(any number of sides) and ``merge-files``. Tensors decided by the structural rules (:mod:`.plan`)
are taken without being loaded. A tensor left to an operator is decoded from the store, widened to
float32 (float64 for F64), merged, rounded back to its dtype and stored: inside git as the smallest
exact encoding against ours, theirs or the base (:class:`DeltaPolicy`), else densely. Parameters are
evaluated per tensor (gradients at its layer, filter lists by its name). Only the tensors of the
merges in flight (a few, within a byte budget) are in memory, never the models.
"""

import hashlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from git_theta import registry as plugins
from git_theta.dtypes import nbytes
from git_theta.errors import GitThetaError, UsageError
from git_theta.manifest import Manifest
from git_theta.merge.operator import OperatorError
from git_theta.merge.params import describe, layer_count, position
from git_theta.merge.plan import decide

#: operators that pick one input: resolved by entry, bit for bit, whatever the dtype or shape
PICKS = ("ours", "theirs", "base")
AUTO = "auto"
#: the operators ``auto`` can pick (see :func:`.signals.choose`)
AUTO_CHOICES = ("linear", "task_arithmetic", "ties")


@dataclass
class Outcome:
    """What happened to one tensor (or one file-level field, named ``field:KEY``)."""

    name: str
    action: str  # "take", "pick", "operator", "conflict"
    reason: str
    operator: str = ""
    origin: str = ""
    params: dict = field(default_factory=dict)
    signals: dict = field(default_factory=dict)


@dataclass
class FileMerge:
    """The merged manifest of one checkpoint (ours kept for conflicts) and what happened per tensor."""

    path: str
    manifest: Manifest
    outcomes: list

    @property
    def conflicts(self):
        return [o for o in self.outcomes if o.action == "conflict"]

    def count(self, action):
        return sum(1 for o in self.outcomes if o.action == action)


def get_operator(name, origin=""):
    """The merge operator plugin ``name``; UsageError naming the valid operators if unknown."""
    if name == AUTO or name in PICKS:  # resolved by the engine itself
        return None
    if name not in plugins.names("merge"):
        valid = ", ".join(plugins.names("merge") + [AUTO]) or "none installed"
        where = f" (from {origin})" if origin else ""
        package = plugins.KNOWN_PACKAGES.get(("merge", name))
        hint = f"valid operators: {valid}" + (
            f"; '{name}' is in the package {package} (pip install {package})" if package else ""
        )
        raise UsageError(f"unknown merge operator {name!r}{where}", hint=hint)
    return plugins.get("merge", name)


def check_config(config, n_sides=2):
    """Fail early, before anything is merged, on unknown operators and bad parameters.

    Returns notes (one line each) about parameters from git config that an operator does not take:
    they apply to the operators that take them and are ignored by the others. Only an explicit
    ``--param`` (``config.explicit``) that the operator does not take is an error, naming its origin.
    """
    names = [
        (r.operator, f"rule '{r.glob} {r.operator}' ({r.source})", r.params, frozenset(r.params)) for r in config.rules
    ]
    names += [(a, "attribute theta-merge", config.params, config.explicit) for a in config.attributes.values() if a]
    if config.operator:
        names.append((config.operator, config.operator_origin, config.params, config.explicit))
    accepted = set()  # every parameter name some configured operator takes
    notes = []
    for name, origin, params, strict in names:
        op = get_operator(name, origin)
        if name == AUTO:
            accepted.update(*(plugins.get("merge", n).params for n in AUTO_CHOICES if n in plugins.names("merge")))
        if op is None:
            continue
        accepted.update(op.params)
        for key in sorted(set(strict) - set(op.params)):
            where = config.origins.get(key, origin) if strict is config.explicit else origin
            raise UsageError(
                f"merge operator {name!r} has no parameter {key!r} (from {where})",
                hint=f"{describe(op)}; drop the parameter or pick an operator that takes it",
            )
        from git_theta.merge.params import resolve

        try:
            resolve(op, _known(op, params, strict=strict), n_sides)
        except UsageError as exc:
            raise UsageError(f"{exc.message} (from {origin})", hint=exc.hint) from None
    configured = sorted({name for name, _, _, _ in names if name not in PICKS})
    known = set().union(*(plugins.get("merge", n).params for n in plugins.names("merge")))
    typos = sorted(set(config.params) - known - accepted)
    if configured and typos:
        # a name no installed operator takes is a typo (mergekit would ignore 'normalise' silently)
        raise UsageError(
            f"{', '.join(config.origins.get(k, repr(k)) for k in typos)}: no merge operator has a parameter "
            f"{', '.join(map(repr, typos))}",
            hint=f"parameters the configured operators ({', '.join(configured)}) take: {', '.join(sorted(accepted)) or 'none'}",
        )
    for key in sorted(set(config.params) - set(config.explicit)):
        for name in configured:
            op = get_operator(name)
            if op is not None and key not in op.params:
                notes.append(f"{config.origins.get(key, key)} is ignored by {name}, which does not take {key!r}")
    return notes


def _known(op, params, strict):
    """The parameters passed to ``op``: all of ``strict`` (unknown ones are errors), and the
    others only when ``op`` has them (global settings shared by the operators of several rules)."""
    return {k: v for k, v in params.items() if k in strict or k in op.params}


def _subset(op, params, inputs, n_sides):
    """Per-model comma lists given for every side, cut down to the sides being merged."""
    if len(inputs) == n_sides:
        return params
    out = {}
    for key, value in params.items():
        spec = op.params.get(key)
        parts = value.split(",") if isinstance(value, str) else None
        if spec is not None and spec.per_model and parts is not None and len(parts) == n_sides:
            value = ",".join(parts[i] for i in inputs)
        out[key] = value
    return out


def seed_for(config, name, entries):
    """The seed of a random operator for one tensor: from ``theta.merge.seed`` if set, else from the
    digests of its inputs, so the same merge gives the same bytes on any machine."""
    h = hashlib.sha256()
    if config.seed is not None:
        h.update(f"seed:{config.seed}".encode())
    else:
        for entry in entries:
            h.update((entry.digest if entry is not None else "-").encode())
    h.update(b"\0" + name.encode("utf-8"))
    return int.from_bytes(h.digest()[:8], "little")


class Loader:
    """Decodes tensors from a store as float arrays in the compute precision.

    ``side`` (a :class:`.side.SideData` or None) supplies the side files of operators that declare
    ``side_files``.
    """

    def __init__(self, store, path, side=None, deltas=None):
        self.store = store
        self.path = path
        self.side = side
        self.deltas = deltas  # a DeltaPolicy: store results as deltas of an input (None: dense)

    def raw(self, entry):
        from git_theta.updates.chain import decode_tensor

        # merge-files reads input tensors from their files (files.StreamedStore), not the store
        read = getattr(self.store, "read_tensor", None)
        data = read(entry) if read is not None else None
        return data if data is not None else decode_tensor(self.store, entry, self.path)

    def values(self, entry, raw=None):
        import numpy as np

        from git_theta.tensors.bits import to_float

        precision = np.float64 if entry.dtype == "F64" else np.float32
        return to_float(self.raw(entry) if raw is None else raw, entry.dtype, entry.shape, precision)


@dataclass(frozen=True)
class DeltaPolicy:
    """How merge results are stored: as the smallest exact encoding against ours, theirs or the
    base (the same choice clean makes, :mod:`git_theta.updates.choose`), within clean's chain limits."""

    max_depth: int = 8  # theta.maxChainDepth
    max_full: int = 1  # theta.maxFullDeltas

    @classmethod
    def from_settings(cls, settings):
        return cls(settings.get_int("maxChainDepth"), max(1, settings.get_int("maxFullDeltas")))


def engine_options(settings):
    """What every :func:`merge_manifests` call takes from the settings: worker threads, the memory
    budget and how merged tensors are stored (as deltas, like a clean)."""
    return dict(
        workers=settings.threads(),
        budget=settings.get_int("memoryBudget"),
        deltas=DeltaPolicy.from_settings(settings),
    )


def store_compact(store, tensor, candidates, policy):
    """Store merged ``tensor`` as the smallest encoding against any of ``candidates`` ((entry, raw
    bytes) of the inputs and the base), or dense; return its TensorEntry.

    A candidate is skipped when a delta on it would pass ``theta.maxChainDepth``; one whose chain
    holds ``theta.maxFullDeltas`` whole-tensor deltas takes only a partial (sparse) delta, as in clean.
    """
    from git_theta.updates.choose import choose
    from git_theta.filter.clean import _partial_delta
    from git_theta.updates.chain import encode_tensor, encoded_size, store_encoded
    from git_theta.updates.base import TensorData

    best, seen = None, set()
    for entry, raw in candidates:
        if (
            entry is None
            or entry.digest in seen
            or entry.dtype != tensor.dtype
            or tuple(entry.shape) != tuple(tensor.shape)
            or entry.chain_depth + 1 > policy.max_depth
        ):
            continue
        seen.add(entry.digest)
        base = TensorData(entry.name, entry.dtype, tuple(entry.shape), raw, entry.digest)
        result = choose(tensor, base)
        if (
            not result[0].keyframe
            and getattr(result[0], "full_pass", True)
            and _full_deltas(store, entry) >= policy.max_full
        ):
            result = _partial_delta(tensor, base, None)
            if result is None:
                continue
        if best is None or encoded_size(result[1]) < encoded_size(best[0][1]):
            best = (result, base, entry)
    if best is None:
        return encode_tensor(store, tensor)
    (update, encoded), base, entry = best
    return store_encoded(store, tensor, update, encoded, base=base, base_entry=entry)


def _full_deltas(store, entry):
    """How many whole-tensor deltas (int-delta, low-rank, ...) ``entry``'s chain stacks."""
    from git_theta.updates.chain import chain_headers

    if entry.chain_depth == 0:
        return 0
    headers = chain_headers(store, entry)
    return sum(getattr(plugins.get("update", h.get("update")), "full_pass", True) for h in headers[:-1])


def merge_manifests(
    path,
    base,
    sides,
    labels,
    config,
    store,
    every_tensor=False,
    dry_run=False,
    with_signals=False,
    side_data=None,
    workers=1,
    budget=192 << 20,
    deltas=None,
):
    """Merge manifests ``sides`` (ours first) against ``base`` (a Manifest or None).

    Returns a :class:`FileMerge`; conflicting tensors keep ours. With ``dry_run`` nothing is decoded
    or stored except to compute signals when ``with_signals`` is set. ``side_data`` (a
    :class:`.side.SideData`) gives operators with ``side_files`` their per-side tensors. Up to
    ``workers`` tensors are merged at once (numpy, zstandard and hashlib release the GIL) while the
    raw bytes of their inputs stay under ``budget``; one merge always proceeds, so memory is bounded
    by the largest tensor's merge (a small multiple of its inputs), never by the models. With
    ``deltas`` (a :class:`DeltaPolicy`) a merged tensor is stored as a delta of an input when that
    is smaller (a merge commit then costs about what its change costs); without, dense.
    """
    ours = sides[0]
    formats = {m.format for m in sides}
    if len(formats) > 1:
        detail = ", ".join(f"{label} {m.format}" for label, m in zip(labels, sides))
        return FileMerge(path, ours, [Outcome("format", "conflict", f"different formats ({detail})")])
    merged = Manifest(format=ours.format)
    outcomes = []
    for table in ("fields", "blobs"):
        merged_table, table_outcomes = _merge_table(
            table, getattr(base, table) if base is not None else {}, [getattr(m, table) for m in sides], labels
        )
        setattr(merged, table, merged_table)
        outcomes += table_outcomes
    loader = Loader(store, path, side_data, deltas)
    names = sorted(set().union(*(m.tensors for m in sides), base.tensors if base is not None else ()))
    layers = layer_count(names)  # for gradient parameters (params.position)
    pending = deque()  # (name, input bytes, future) of operator merges in flight, oldest first
    pool = ThreadPoolExecutor(workers, thread_name_prefix="theta-merge") if workers > 1 else None

    def settle(incoming):
        while pending and (len(pending) >= workers or sum(p[1] for p in pending) + incoming > budget):
            done_name, _, future = pending.popleft()
            merged.tensors[done_name] = future.result()

    try:
        for name in names:
            base_entry = base.tensors.get(name) if base is not None else None
            entries = [m.tensors.get(name) for m in sides]
            outcome, entry = _merge_tensor(
                path,
                name,
                base_entry,
                entries,
                labels,
                config,
                loader,
                store,
                every_tensor,
                dry_run,
                with_signals,
                layers,
            )
            outcomes.append(outcome)
            if callable(entry):  # an operator merge: run it (in the pool when there is one)
                if pool is None:
                    merged.tensors[name] = entry()
                else:
                    size = entry.input_bytes
                    settle(size)
                    pending.append((name, size, pool.submit(entry)))
            elif entry is not None:
                merged.tensors[name] = entry
        while pending:  # the merges still in flight
            done_name, _, future = pending.popleft()
            merged.tensors[done_name] = future.result()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    merged.tensors = dict(sorted(merged.tensors.items()))
    return FileMerge(path, merged, outcomes)


def _merge_table(kind, base, tables, labels):
    """Three-way (N-way) merge of file-level fields or blobs: like tensors, by value."""
    merged, outcomes = {}, []
    for key in sorted(set(base).union(*tables)):
        old = base.get(key)
        values = [t.get(key) for t in tables]
        changed = [i for i, v in enumerate(values) if v != old]
        distinct = {values[i] for i in changed}
        if not changed:
            value = old
        elif len(distinct) == 1:
            value = values[changed[0]]
        else:
            value = values[0]
            who = ", ".join(labels[i] for i in changed)
            outcomes.append(Outcome(f"{kind[:-1]}:{key}", "conflict", f"file-level {kind[:-1]} changed in {who}"))
        if value is not None:
            merged[key] = value
    return merged, outcomes


def _merge_tensor(
    path, name, base, entries, labels, config, loader, store, every_tensor, dry_run, with_signals, layers=0
):
    """(Outcome, merged entry or None) for one tensor (``layers``: the file's layer count, for gradients)."""
    decision = decide(name, base, entries, labels, every_tensor)
    if decision.action == "take":
        return Outcome(name, "take", decision.reason), decision.entry
    choice = config.choose(path, name)
    if choice is not None and choice.operator in PICKS:
        index = {"ours": 0, "theirs": 1}.get(choice.operator)
        entry = base if index is None else entries[min(index, len(entries) - 1)]
        return Outcome(name, "pick", decision.reason, choice.operator, choice.origin), entry
    if decision.action == "conflict":
        return Outcome(name, "conflict", decision.reason), entries[0]
    if choice is None:
        return Outcome(name, "conflict", f"{decision.reason}; no merge operator is configured"), entries[0]

    inputs = [entries[i] for i in decision.inputs]
    base_entry = base if decision.use_base else None
    signals = {}
    operator_name, params, origin = choice.operator, choice.params, choice.origin
    if operator_name == AUTO or (dry_run and with_signals):
        signals = _signals(loader, inputs, base_entry)
        if operator_name == AUTO:
            operator_name, auto_params, reason = _auto(signals)
            params = {**params, **auto_params}
            origin = f"auto -> {reason} ({origin})"
    op = get_operator(operator_name, origin)
    if base_entry is None and op.needs_base and not op.base_optional:
        why = "no common base" if base is None else "its dtype or shape differs from the base"
        return Outcome(
            name,
            "conflict",
            f"{decision.reason}; {operator_name} needs a base ({why})",
            operator_name,
            origin,
            signals=signals,
        ), entries[0]
    raw = _subset(
        op,
        _known(op, params, choice.strict if choice.operator != AUTO else frozenset()),
        list(decision.inputs),
        len(entries),
    )
    from git_theta.merge.params import resolve

    try:
        resolved = resolve(op, raw, len(inputs), tensor=name, x=position(name, layers))
    except UsageError as exc:
        raise UsageError(f"{path}: tensor {name!r}: {exc.message} (from {origin})", hint=exc.hint) from None
    outcome = Outcome(name, "operator", decision.reason, operator_name, origin, resolved, signals)
    if dry_run:
        return outcome, entries[0]
    job = partial(
        _run_operator, op, resolved, name, inputs, base_entry, base, config, loader, store, list(decision.inputs)
    )
    job.input_bytes = sum(nbytes(e.dtype, e.shape) for e in (*inputs, base_entry) if e is not None)
    return outcome, job


def _run_operator(op, params, name, inputs, base_entry, base, config, loader, store, indices=None):
    """Decode, merge, round back and store one tensor; reuse an input entry if the result equals it.

    ``indices`` are the sides the inputs come from (for operators that read side files).
    """
    import numpy as np

    from git_theta.tensors.bits import from_float
    from git_theta.updates.chain import encode_tensor, tensor_digest
    from git_theta.updates.base import TensorData

    like = inputs[0]
    raws = [loader.raw(e) for e in (*inputs, base_entry) if e is not None]
    models = [loader.values(e, r) for e, r in zip(inputs, raws)]
    base_values = loader.values(base_entry, raws[-1]) if base_entry is not None else None
    if loader.deltas is None:
        raws = None  # nothing to encode against: free the bytes now
    rng = np.random.default_rng(seed_for(config, name, [base, *inputs])) if op.random else None
    extra = {}
    files = tuple(getattr(op, "side_files", ()) or ())
    if files:
        indices = list(range(len(inputs))) if indices is None else indices
        extra["side"] = (
            loader.side.tensors(files, loader.path, name, indices)
            if loader.side is not None
            else {f: [None] * len(inputs) for f in files}
        )
    try:
        out = np.asarray(op.merge(models, base_values, params, rng, **extra))
    except OperatorError as exc:
        raise OperatorError(f"{loader.path}: tensor {name!r}: {exc.message}", hint=exc.hint) from None
    if out.shape != tuple(like.shape):
        raise GitThetaError(
            f"{loader.path}: tensor {name!r}: merge operator {op.name!r} returned shape {list(out.shape)}, "
            f"expected {list(like.shape)}",
            hint="this is a bug in the operator plugin",
        )
    del models, base_values
    data = from_float(out, like.dtype)
    digest = tensor_digest(data)
    for entry in (*inputs, base_entry):
        if entry is not None and entry.digest == digest:
            return entry  # e.g. an operator that returned one input: keep its objects (and delta chain)
    tensor = TensorData(name, like.dtype, tuple(like.shape), data, digest)
    if loader.deltas is not None:
        candidates = list(zip([e for e in (*inputs, base_entry) if e is not None], raws))
        return store_compact(store, tensor, candidates, loader.deltas)
    return encode_tensor(store, tensor)


def _signals(loader, inputs, base_entry):
    """Similarity signals between the task vectors of the inputs (:func:`.signals.measure`); none
    without a base (there are no task vectors then)."""
    if base_entry is None:
        return {}
    from git_theta.merge.signals import measure

    models = [loader.values(e) for e in inputs]
    return measure(models, loader.values(base_entry))


def _auto(signals):
    """(operator name, raw params, reason) picked by the signal rule for ``--operator auto``."""
    from git_theta.merge.auto import current_pick
    from git_theta.merge.signals import choose

    if not signals:
        return "linear", {}, "linear (no base)"
    pick = current_pick()
    if pick is not None:  # predicted once for the whole merge (git theta merge --operator auto)
        return pick.operator, dict(pick.params), f"{pick.recipe} (predicted for the whole merge)"
    name, params = choose(signals)
    detail = " ".join(f"{k}={v}" for k, v in sorted(params.items()))
    return name, params, f"{name} {detail}".strip()
