"""The stable names a git-theta plugin imports: the only module plugins should import from.

A plugin (a checkpoint format, an update type or a merge operator) is a class registered as an entry
point in the group of its kind (``git_theta.formats``, ``git_theta.updates``,
``git_theta.merge_operators``); the built-ins register the same way. Everything a plugin needs is
re-exported here under a name that stays when the package's modules move, so the plugin keeps
working across git-theta's internal reorganisations:

- formats: :class:`CheckpointFormat`, :class:`CheckpointReader`, :class:`TensorSource`,
  :class:`TensorRun` (many small tensors over one buffer, what ``CheckpointReader.runs`` may
  yield), :class:`ByteCursor` (reading headers from git's pipe), :func:`dump_json`, :func:`put_json`,
  :func:`get_json`, :func:`escape_name` / :func:`unescape_name` (tensor names in manifests);
- update types: :class:`UpdateType`, :class:`Encoded`, :class:`TensorData`, :func:`writable_base`;
- merge operators: :class:`MergeOperator`, :class:`Param`, :class:`OperatorError`,
  :func:`resolve_params`;
- dtypes: :class:`DType`, :func:`get_dtype`, :func:`nbytes`, :func:`element_count`;
- errors: :class:`GitThetaError` and the typed errors a plugin raises (:class:`CheckpointError`,
  :class:`UnsafeCheckpointError`, :class:`UsageError`, :class:`UpdateError`, :class:`PluginError`);
- testing: :class:`MemorySource`, :func:`roundtrip` (split then join in memory, as clean then
  smudge would), :class:`Manifest` (read what a commit stored), :func:`get_plugin` /
  :func:`plugin_names` (what the registry finds).

Importing this module is cheap (no numpy, no torch): a format plugin loads in the filter process.
"""

from __future__ import annotations

from git_theta.dtypes import DType, element_count, get_dtype, nbytes
from git_theta.errors import (
    CheckpointError,
    GitThetaError,
    PluginError,
    UnsafeCheckpointError,
    UpdateError,
    UsageError,
)
from git_theta.formats.base import (
    CheckpointFormat,
    CheckpointReader,
    TensorSource,
    dump_json,
    get_json,
    put_json,
)
from git_theta.formats.memory import MemorySource, roundtrip
from git_theta.formats.stream import ByteCursor
from git_theta.manifest import Manifest, escape_name, unescape_name
from git_theta.merge.operator import MergeOperator, OperatorError, Param
from git_theta.merge.params import resolve as _resolve
from git_theta.updates.base import Encoded, TensorData, TensorRun, UpdateType, writable_base

#: the plugin kinds, as :func:`get_plugin` and :func:`plugin_names` name them
KINDS = ("format", "update", "merge")


def resolve_params(operator: MergeOperator, raw: dict[str, object], n_models: int) -> dict[str, object]:
    """Checked parameters of merge ``operator`` for ``n_models`` models, from raw strings or lists
    (what ``--param K=V`` and git config give); missing ones get their defaults. UsageError when a
    parameter is unknown, out of range or has the wrong number of per-model values."""
    return _resolve(operator, raw, n_models)


def get_plugin(kind: str, name: str) -> object:
    """The installed plugin ``name`` of ``kind`` (one of :data:`KINDS`), checked as git-theta checks
    it before use; PluginError saying what to install when there is none."""
    from git_theta import registry as plugins

    return plugins.get(kind, name)


def plugin_names(kind: str) -> list[str]:
    """Sorted names of the installed plugins of ``kind`` (one of :data:`KINDS`)."""
    from git_theta import registry as plugins

    return plugins.names(kind)


__all__ = [
    "KINDS",
    "ByteCursor",
    "CheckpointError",
    "CheckpointFormat",
    "CheckpointReader",
    "DType",
    "Encoded",
    "GitThetaError",
    "Manifest",
    "MemorySource",
    "MergeOperator",
    "OperatorError",
    "Param",
    "PluginError",
    "TensorData",
    "TensorRun",
    "TensorSource",
    "UnsafeCheckpointError",
    "UpdateError",
    "UpdateType",
    "UsageError",
    "dump_json",
    "element_count",
    "escape_name",
    "get_dtype",
    "get_json",
    "get_plugin",
    "nbytes",
    "plugin_names",
    "put_json",
    "resolve_params",
    "roundtrip",
    "unescape_name",
    "writable_base",
]
