"""The merge-operator plugin interface.

A merge operator combines the versions of ONE tensor: ``models`` (ours first, then theirs, then any
further branches of an octopus merge) and optionally ``base`` (the merge base, the "pre-trained
model" of the model-merging literature). Operators are plugins in the ``git_theta.merge_operators``
entry-point group; the entry point's name is the operator's ``name`` and is stable forever (it is
written into git config, attributes and merge commit messages).

Parameter names and defaults follow mergekit 0.1.5 so its recipes carry over; see
``docs/operators.md`` for the table and the places where we depart from it.
"""

from dataclasses import dataclass, field

from git_theta.errors import GitThetaError, UsageError


class OperatorError(GitThetaError):
    """An operator's formula is undefined for these inputs (the driver adds file and tensor names)."""


@dataclass(frozen=True)
class Param:
    """One parameter of an operator.

    ``kind`` is "float", "int", "bool" or "str"; ``per_model`` parameters take one value per input
    model (a single value is broadcast); ``low``/``high`` are inclusive bounds (None: unbounded);
    ``choices`` lists the valid values of a "str" parameter.
    """

    default: object
    kind: str = "float"
    per_model: bool = False
    low: float = None
    high: float = None
    choices: tuple = field(default_factory=tuple)
    doc: str = ""


class MergeOperator:
    """Base class of merge operators (subclass it, set the class attributes, implement merge)."""

    #: entry-point name; stable forever
    name = ""
    #: the operator uses ``base`` (the driver then loads the merge base for it)
    needs_base = True
    #: the operator also works without a base (``git theta merge-files`` without ``--base``)
    base_optional = False
    #: the operator draws random numbers (only through the ``rng`` it is given)
    random = False
    #: fewest / most input models (not counting the base); None = no upper limit
    min_models = 1
    max_models = None
    params = {}
    #: files next to the checkpoint whose same-named tensors the operator needs from each side, e.g.
    #: ("fisher.safetensors",); merge() is then called with ``side={file: [values or None per model]}``
    #: (see git_theta.merge.side)
    side_files = ()
    #: one line: the formula
    summary = ""
    #: the paper (or "—" when the method has none)
    paper = ""

    def merge(self, models, base, params, rng):
        """Merge ``models`` (equal-shape numpy arrays in the compute dtype, ours first).

        ``base`` is the merge base (same shape) or None; ``params`` the dict returned by
        :func:`git_theta.merge.params.resolve` (per-model values are lists of len(models));
        ``rng`` a ``numpy.random.Generator`` or None. Returns a new array of the same shape in the
        compute dtype; never modifies its inputs.
        """
        raise NotImplementedError

    def validate(self, params, n_models):
        """Check constraints that involve several parameters or the number of models.

        Raise :class:`~git_theta.errors.UsageError`; the default checks the model count.
        """
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            if self.max_models == self.min_models:
                want = f"exactly {self.min_models}"
            elif self.max_models is None:
                want = f"at least {self.min_models}"
            else:
                want = f"{self.min_models} to {self.max_models}"
            raise UsageError(
                f"merge operator {self.name!r} takes {want} models to merge, got {n_models}",
                hint="merge fewer branches at a time, or pick an operator that takes any number "
                "(linear, task_arithmetic, ties, ...)",
            )

    def __repr__(self):
        return f"<merge operator {self.name}>"
