"""git-theta: version machine-learning checkpoints with git.

Importing the package is cheap; the heavy parts (numpy, torch, zstandard) load only when used.

Python API (see the README, "Diffs, history and loading")::

    import git_theta
    tensors = git_theta.load("model.safetensors", rev="v1.2")           # {name: numpy array}
    tensors = git_theta.load("llama/", rev="v1.2")                      # a sharded folder: all shards
    changes = git_theta.diff("model.safetensors", "v1.2", "HEAD")        # what --json prints
"""

from __future__ import annotations

import sys
import types

# ``typing`` is not imported at run time: the filter process imports this package, and its
# start-up stays light (mypy reads any name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any, Literal

__version__ = "0.2.0"

#: side names for :func:`diff`: the staged content and the files on disk
INDEX = ":index"
WORKTREE = ":worktree"


def load(
    path: str,
    rev: str | None = "HEAD",
    repo: str = ".",
    params: Iterable[str] | None = None,
    framework: Literal["numpy", "torch"] = "numpy",
    upcast: bool = False,
) -> dict[str, Any]:
    """The tensors of checkpoint ``path`` at revision ``rev`` as ``{name: tensor}``, bit-identical,
    read from the object store without touching the work tree.

    ``rev`` is any git revision, or ``git_theta.INDEX`` (or None) for the staged version. ``params``
    limits the result to some tensors (names or fnmatch globs). ``framework`` is ``"numpy"`` or
    ``"torch"``. numpy has no bf16/float8 dtypes: those come back as raw bit patterns (uint16 /
    uint8) unless ``upcast=True`` (float32, exact); torch gives torch.bfloat16 etc.
    """
    from git_theta.porcelain.api import load as _load

    return _load(path, rev=rev, repo=repo, params=params, framework=framework, upcast=upcast)


def diff(
    path: str | list[str] | None = None,
    rev_a: str | None = "HEAD",
    rev_b: str | None = WORKTREE,
    repo: str = ".",
    stat: bool = False,
    sort: str = "name",
    by_file: bool = False,
) -> dict[str, Any]:
    """The changes from ``rev_a`` to ``rev_b`` as the dict ``git theta diff --json`` prints.

    ``path`` is a file, directory, glob or a list of them (None: every tracked checkpoint);
    revisions may be ``git_theta.INDEX`` or ``git_theta.WORKTREE``. ``stat=True`` loads no tensor.
    A sharded folder is one model entry (tensors by name across shards); ``by_file=True`` gives
    one entry per file instead (docs/models.md).
    """
    from git_theta.porcelain.api import diff as _diff

    return _diff(path, rev_a=rev_a, rev_b=rev_b, repo=repo, stat=stat, sort=sort, by_file=by_file)


class _CallableDiffPackage(types.ModuleType):
    """The subpackage ``git_theta.diff`` (the diff engine), callable as the function :func:`diff`."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return _diff_function(*args, **kwargs)


class _Package(types.ModuleType):
    """This package's module type: importing the subpackage ``git_theta.diff`` (which the import
    system then sets as the attribute ``diff``) keeps ``git_theta.diff(...)`` working, because the
    subpackage becomes callable as the public function it replaces."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "diff" and isinstance(value, types.ModuleType) and not callable(value):
            value.__class__ = _CallableDiffPackage
        super().__setattr__(name, value)


_diff_function = diff
sys.modules[__name__].__class__ = _Package
