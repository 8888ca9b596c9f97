"""The structural rules of a merge: what happens to each tensor, decided from manifest entries only.

Inputs are the base entry (the merge ancestor's; None when the tensor, or the whole file, did not
exist there) and one entry per side (ours first; None when that side does not have the tensor).
Nothing is loaded: entries are compared by digest, dtype and shape. Only a tensor that changed in
two or more different ways, with the same dtype and shape on every changed side, is left to an
operator (``operate``); the rest is taken from one side or reported as a conflict:

=======================================================  =========================================
case                                                     result
=======================================================  =========================================
unchanged on every side                                  base
changed on one side only (value, dtype, shape)           that side
the same change on every changed side                    that change
deleted on one side, unchanged on the others             deleted
deleted on one side, changed on another                  conflict
added on one side / added identically on several         added
added on several sides with different contents           operator if it needs no base, else conflict
changed on several sides, same dtype and shape           operator, the base as base
changed on several sides to different dtypes or shapes   conflict
changed on several sides to one new dtype or shape       operator if it needs no base, else conflict
changed on several sides, not a float dtype              conflict
=======================================================  =========================================
"""

from dataclasses import dataclass

#: dtypes the operators compute on (float32, or float64 for F64) and that results are cast back to.
MERGEABLE_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass
class Decision:
    """What the structural rules say about one tensor."""

    name: str
    action: str  # "take", "operate" or "conflict"
    reason: str
    entry: object = None  # the TensorEntry taken (None: the tensor is absent from the result)
    inputs: tuple = ()  # indices of the sides an operator merges (ours first)
    use_base: bool = False  # whether the base entry can serve as the operator's base


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.same_content(b)


def _who(labels, indices):
    return ", ".join(labels[i] for i in indices)


def _describe(entry):
    return f"{entry.dtype} [{','.join(map(str, entry.shape))}]"


def decide(name, base, sides, labels, every_tensor=False):
    """The :class:`Decision` for tensor ``name`` given its base entry and one entry per side."""
    if every_tensor:
        decision = _every_tensor(name, base, sides, labels)
        if decision is not None:
            return decision
    changed = [i for i, entry in enumerate(sides) if not _same(entry, base)]
    if not changed:
        return Decision(name, "take", "unchanged", base)
    versions = []
    for i in changed:
        if not any(_same(sides[i], sides[j]) for j in versions):
            versions.append(i)
    if len(versions) == 1:
        entry = sides[changed[0]]
        who = _who(labels, changed)
        if entry is None:
            reason = f"deleted in {who}"
        elif base is None:
            reason = f"added in {who}"
        elif len(changed) == 1:
            reason = f"changed only in {who}"
        else:
            reason = f"same change in {who}"
        return Decision(name, "take", reason, entry)
    deleted = [i for i in changed if sides[i] is None]
    if deleted:
        kept = [i for i in changed if sides[i] is not None]
        return Decision(name, "conflict", f"deleted in {_who(labels, deleted)}, changed in {_who(labels, kept)}")
    kinds = {(sides[i].dtype, sides[i].shape) for i in changed}
    if len(kinds) > 1:
        detail = "; ".join(f"{labels[i]} {_describe(sides[i])}" for i in changed)
        return Decision(name, "conflict", f"changed to different dtypes or shapes ({detail})")
    dtype, shape = kinds.pop()
    if dtype not in MERGEABLE_DTYPES:
        return Decision(
            name, "conflict", f"changed in {_who(labels, changed)}; {dtype} tensors are not merged arithmetically"
        )
    if base is None:
        reason = f"added in {_who(labels, changed)} with different values"
    elif (base.dtype, base.shape) != (dtype, shape):
        reason = f"changed in {_who(labels, changed)} from {_describe(base)} to {_describe(sides[changed[0]])}"
    else:
        reason = f"changed in {_who(labels, changed)}"
    use_base = base is not None and (base.dtype, base.shape) == (dtype, shape)
    return Decision(name, "operate", reason, inputs=tuple(changed), use_base=use_base)


def _every_tensor(name, base, sides, labels):
    """``--every-tensor``: every input goes to the operator when all sides have the tensor alike,
    even when they are all equal (as mergekit: a non-normalised ``linear`` with weights 0.6 and 0.6
    doubles-and-scales a tensor both sides share, and ``dare_linear`` sparsifies a single fine-tune)."""
    if any(entry is None for entry in sides):
        return None
    kinds = {(e.dtype, e.shape) for e in sides}
    if len(kinds) > 1 or next(iter(kinds))[0] not in MERGEABLE_DTYPES:
        return None
    use_base = base is not None and (base.dtype, base.shape) == next(iter(kinds))
    return Decision(name, "operate", "every tensor", inputs=tuple(range(len(sides))), use_base=use_base)
