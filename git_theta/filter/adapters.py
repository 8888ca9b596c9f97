"""User-supplied updates: PEFT LoRA adapters and the older git-theta's side-loaded update files.

``git theta add model.safetensors --update-path adapter_model.safetensors`` says *how* the new
version came about. This module reads such a file into per-tensor updates, checks that each one
explains the change actually found in the checkpoint (an adapter is never substituted for the
file's values: what is stored always reproduces the file, with an exact residual for the last
bits), and hands the update type and its parameters to the encoder.

Accepted naming:

- PEFT: ``<module>.lora_A[.<adapter>].weight`` (r x in) and ``<module>.lora_B[.<adapter>].weight``
  (out x r), optionally prefixed ``base_model.model.``; the change of ``<module>.weight`` is
  ``scale * B @ A`` with ``scale = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) read from
  ``adapter_config.json`` next to the adapter file (1.0 without one), transposed when
  ``fan_in_fan_out``; ``lora_embedding_A/B`` give ``scale * (B @ A)^T`` for embeddings.
- older git-theta side-loading: ``<param>/R`` and ``<param>/C`` (change ``R @ C``),
  ``<param>/data|indices|indptr|shape`` (a CSR matrix added to the flattened tensor) and
  ``<param>/ia3`` (the new tensor is ``base * ia3``, broadcast).
"""

import json
import math
import os
import re

import numpy as np

from git_theta.tensors.bits import as_bits, to_float
from git_theta.dtypes import get_dtype
from git_theta.errors import UpdateError, UsageError
from git_theta.updates.low_rank import ulp_energy

_PEFT = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.[^.]+)?(?:\.weight)?$"
)
_SIDE = re.compile(r"^(?P<param>.+)/(?P<part>R|C|data|indices|indptr|shape|ia3)$")
#: relative energy of the change an adapter may leave unexplained (beyond rounding noise)
TOLERANCE = 1e-4


class SuppliedUpdate:
    """One tensor's user-supplied update: its update type and the options the encoder takes."""

    def __init__(self, key, update, **arrays):
        self.key = key  # the name in the adapter file (for messages)
        self.update = update  # "low-rank", "sparse" or "ia3"
        self.arrays = arrays

    def options(self):
        """Keyword arguments for the update type's ``encode``."""
        if self.update == "low-rank":
            return {"factors": (self.arrays["a"], self.arrays["b"])}
        if self.update == "ia3":
            return {"scale": self.arrays["scale"]}
        return {}  # sparse: the exact positions come from the data itself

    def predicted_change(self, base_values):
        """The new values this update predicts from ``base_values`` (float64, tensor shape)."""
        if self.update == "low-rank":
            a, b = self.arrays["a"], self.arrays["b"]
            if base_values.ndim != 2 or a.shape[0] != base_values.shape[0] or b.shape[1] != base_values.shape[1]:
                return None
            return base_values + a.astype(np.float64) @ b.astype(np.float64)
        if self.update == "ia3":
            try:
                return base_values * self.arrays["scale"].astype(np.float64)
            except ValueError:
                return None
        positions, values = self.arrays["positions"], self.arrays["values"]
        if len(positions) and (positions.min() < 0 or positions.max() >= base_values.size):
            return None
        out = base_values.astype(np.float64, copy=True).ravel()
        np.add.at(out, positions, values.astype(np.float64))
        return out.reshape(base_values.shape)

    def is_identity(self):
        """True when the update changes nothing (a freshly initialised LoRA, an all-ones ia3)."""
        if self.update == "low-rank":
            return not np.any(self.arrays["a"]) or not np.any(self.arrays["b"])
        if self.update == "ia3":
            return bool(np.all(self.arrays["scale"] == 1))
        return not np.any(self.arrays["values"])


class Adapter:
    """The updates of one adapter file, matched to a checkpoint's tensor names."""

    def __init__(self, source, updates):
        self.source = source
        self.updates = updates  # target tensor name (as written in the adapter) -> SuppliedUpdate
        self.used = set()

    def lookup(self, name):
        """The SuppliedUpdate for checkpoint tensor ``name`` (exact or dotted-suffix match)."""
        if name in self.updates:
            return name, self.updates[name]
        hits = [k for k in self.updates if name.endswith("." + k) or k.endswith("." + name)]
        if len(hits) == 1:
            return hits[0], self.updates[hits[0]]
        return None, None

    def targets_in(self, names):
        """The adapter targets that match one of the checkpoint tensor ``names`` (the rule of
        :meth:`lookup` and :meth:`finish`)."""
        names = list(names)
        return sorted(
            key
            for key in self.updates
            if any(n == key or n.endswith("." + key) or key.endswith("." + n) for n in names)
        )

    def restrict(self, keys):
        """Keep only the updates of ``keys``: the targets one shard of a sharded model holds."""
        self.updates = {k: u for k, u in self.updates.items() if k in set(keys)}

    def check(self, path, tensor, base, supplied):
        """Raise UpdateError unless ``supplied`` explains the change from ``base`` to ``tensor``."""
        shape = tuple(tensor.shape)
        if tensor.dtype not in ("F64", "F32", "F16", "BF16"):
            raise UpdateError(
                f"{path}: tensor {tensor.name!r} is {tensor.dtype}: {self.source} can only update float tensors"
            )
        with np.errstate(all="ignore"):
            new = to_float(tensor.data, tensor.dtype, shape)
            old = to_float(base.data, base.dtype, shape)
            predicted = supplied.predicted_change(old)
            if predicted is None or predicted.shape != shape:
                raise UpdateError(
                    f"{path}: tensor {tensor.name!r} {list(shape)}: update {supplied.key!r} in "
                    f"{self.source} has a different shape",
                    hint="check that the adapter belongs to this model",
                )
            same = (as_bits(tensor.data, tensor.dtype) == as_bits(base.data, base.dtype)).reshape(shape)
            error = np.where(same | ~np.isfinite(new), 0.0, new - predicted)
            change = np.where(same | ~np.isfinite(new), 0.0, new - old)
            error[~np.isfinite(error)] = np.inf
            err_energy = float(np.sum(error * error))
            change_energy = float(np.sum(change * change))
        allowed = max(TOLERANCE * change_energy, 4.0 * ulp_energy(tensor.data, tensor.dtype, shape))
        if not err_energy <= allowed:
            rel = math.sqrt(err_energy / change_energy) if change_energy else float("inf")
            raise UpdateError(
                f"{path}: tensor {tensor.name!r}: update {supplied.key!r} from {self.source} does not "
                f"explain the change (unexplained part: {rel:.3g} of the change's norm)",
                hint="check that this adapter (and its scaling: lora_alpha, r) is what was merged into "
                "this version, and that the base is right (--base REV:PATH); or add without --update-path",
            )

    def finish(self, path, names):
        """Raise UpdateError for adapter updates that matched no tensor, or an unchanged one."""
        for key, supplied in sorted(self.updates.items()):
            if key in self.used:
                continue
            matched = [n for n in names if key in self.targets_in([n])]
            if not matched:
                raise UpdateError(
                    f"{path}: update {supplied.key!r} in {self.source} matches no tensor of the checkpoint",
                    hint="check that the adapter belongs to this model",
                )
            if not supplied.is_identity():
                raise UpdateError(
                    f"{path}: tensor {matched[0]!r} did not change, but update {supplied.key!r} in "
                    f"{self.source} changes it",
                    hint="check that the adapter was merged into this version (and the base: --base REV:PATH)",
                )


def _read_arrays(path):
    """{name: float64/int array} of every tensor in an adapter file (any checkpoint format)."""
    from git_theta.formats.detect import detect_format

    with open(path, "rb") as stream:
        head = stream.read(4096)
        stream.seek(0)
        fmt = detect_format(None, path, head)
        arrays = {}
        for t in fmt.split(stream, path).tensors():
            shape = tuple(t.shape)
            data = bytes(t.data)
            if t.dtype.startswith(("I", "U")):  # CSR indices and shapes
                integers = np.frombuffer(data, dtype=get_dtype(t.dtype).numpy_name)
                arrays[t.name] = integers.reshape(shape).astype(np.int64)
            else:
                arrays[t.name] = to_float(data, t.dtype, shape)
    return arrays


def _peft_config(path):
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"{config_path}: cannot read the adapter config: {exc}") from None


def _pattern(table, module, default):
    for key, value in (table or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def _peft_updates(arrays, config, source):
    pairs = {}
    for key, value in arrays.items():
        m = _PEFT.match(key)
        if m:
            pairs.setdefault((m["module"], bool(m["emb"])), {})[m["ab"]] = (key, value)
    updates = {}
    for (module, embedding), parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            raise UsageError(f"{source}: LoRA module {module!r} has lora_{''.join(parts)} but not both A and B")
        (key, a), (_, b) = parts["A"], parts["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise UsageError(f"{source}: LoRA factors of {module!r} have shapes {a.shape} and {b.shape}")
        rank = a.shape[0]
        alpha = _pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        if embedding or config.get("fan_in_fan_out"):
            factors = (a.T, b.T * scale)  # delta = scale * (B @ A)^T = A^T @ (scale * B^T)
        else:
            factors = (b * scale, a)
        updates[module + ".weight"] = SuppliedUpdate(key, "low-rank", a=factors[0], b=factors[1])
    return updates


def _side_load_updates(arrays, source):
    groups = {}
    for key, value in arrays.items():
        m = _SIDE.match(key)
        if m:
            groups.setdefault(m["param"], {})[m["part"]] = value
    updates = {}
    for param, parts in sorted(groups.items()):
        key = f"{param}/{'|'.join(sorted(parts))}"
        if set(parts) == {"R", "C"}:
            updates[param] = SuppliedUpdate(key, "low-rank", a=parts["R"], b=parts["C"])
        elif set(parts) == {"ia3"}:
            updates[param] = SuppliedUpdate(key, "ia3", scale=parts["ia3"])
        elif set(parts) == {"data", "indices", "indptr", "shape"}:
            indptr = parts["indptr"].astype(np.int64).ravel()
            total = int(np.prod(parts["shape"])) if parts["shape"].size else 1
            rows = max(1, len(indptr) - 1)
            cols = total // rows
            row_of = np.repeat(np.arange(rows), np.diff(indptr))
            positions = row_of * cols + parts["indices"].astype(np.int64).ravel()
            updates[param] = SuppliedUpdate(key, "sparse", positions=positions, values=parts["data"].ravel())
        else:
            raise UsageError(
                f"{source}: side-loaded update of {param!r} has parts {sorted(parts)}",
                hint="low rank needs R and C, sparse needs data, indices, indptr and shape, ia3 needs ia3",
            )
    return updates


def load_adapter(path, update_type=None):
    """Read an adapter file into an :class:`Adapter`; ``update_type`` (if given) must match it."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such adapter file")
    arrays = _read_arrays(path)
    updates = _peft_updates(arrays, _peft_config(path), path)
    updates.update(_side_load_updates(arrays, path))
    if not updates:
        raise UsageError(
            f"{path}: no updates found (expected PEFT lora_A/lora_B tensors or <param>/R|C, "
            "<param>/data|indices|indptr|shape, <param>/ia3)",
        )
    if update_type is not None:
        wrong = sorted(k for k, u in updates.items() if u.update != update_type)
        if wrong:
            raise UsageError(
                f"{path}: --update-type {update_type} but {wrong[0]!r} is a {updates[wrong[0]].update} update",
                hint="leave out --update-type to take the type from the adapter file",
            )
    return Adapter(path, updates)
