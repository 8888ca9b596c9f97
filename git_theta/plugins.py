"""One registry for the three kinds of plugin: checkpoint formats, update types, merge operators.

Every plugin, built-in or third-party, is a Python entry point in one of the groups below whose
object is a class (instantiated once) or an instance with a ``name`` attribute equal to the entry
point's name. Entry points are read on first use and each plugin is imported only when needed, so
the filter's start-up stays light. A duplicate or malformed name is an error when the group loads.
"""

import re
import threading

from .errors import PluginError

GROUPS = {
    "format": "git_theta.formats",
    "update": "git_theta.updates",
    "merge": "git_theta.merge_operators",
}
_NAME = re.compile(r"[a-z][a-z0-9_-]*\Z")
_lock = threading.Lock()
_entry_points = {}  # kind -> {name: EntryPoint}
_loaded = {}  # (kind, name) -> plugin object


def _group(kind):
    with _lock:
        if kind not in _entry_points:
            from importlib.metadata import entry_points

            found = {}
            for ep in entry_points(group=GROUPS[kind]):
                if not _NAME.match(ep.name):
                    raise PluginError(
                        f"malformed {kind} plugin name {ep.name!r} (from {_origin(ep)})",
                        hint="names are lowercase letters, digits, '-' and '_'",
                    )
                if ep.name in found and found[ep.name].value != ep.value:
                    raise PluginError(
                        f"{kind} plugin {ep.name!r} is registered twice: "
                        f"by {_origin(found[ep.name])} and by {_origin(ep)}",
                        hint="uninstall one of the two packages",
                    )
                found[ep.name] = ep
            _entry_points[kind] = found
        return _entry_points[kind]


def _origin(ep):
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ep.value
    return f"{dist.metadata['Name']} {dist.version}"


def names(kind):
    """Sorted names of the installed plugins of ``kind``."""
    return sorted(_group(kind))


def get(kind, name, needed_by=None):
    """The plugin object called ``name``; PluginError naming what to install when it is missing."""
    key = (kind, name)
    if key in _loaded:
        return _loaded[key]
    group = _group(kind)
    ep = group.get(name)
    if ep is None:
        where = f" (needed by {needed_by})" if needed_by else ""
        raise PluginError(
            f"no {kind} plugin named {name!r} is installed{where}",
            hint=f"install the package that provides the '{GROUPS[kind]}' entry point '{name}'; "
            f"installed: {', '.join(sorted(group)) or 'none'}",
        )
    try:
        obj = ep.load()
    except Exception as exc:
        raise PluginError(f"{kind} plugin {name!r} from {_origin(ep)} failed to load: {exc}") from exc
    if isinstance(obj, type):
        obj = obj()
    if getattr(obj, "name", None) != name:
        raise PluginError(
            f"{kind} plugin {name!r} from {_origin(ep)} calls itself {getattr(obj, 'name', None)!r}",
            hint="the entry point name and the plugin's name attribute must match",
        )
    with _lock:
        _loaded.setdefault(key, obj)
    return _loaded[key]


def all_plugins(kind):
    """Every plugin of ``kind``, loaded, in name order."""
    return [get(kind, name) for name in names(kind)]


def describe():
    """(kind, name, distribution, version, entry point value) for every installed plugin."""
    rows = []
    for kind in GROUPS:
        for name, ep in sorted(_group(kind).items()):
            dist = getattr(ep, "dist", None)
            rows.append(
                (
                    kind,
                    name,
                    dist.metadata["Name"] if dist else "?",
                    dist.version if dist else "?",
                    ep.value,
                )
            )
    return rows


def reset():
    """Forget what was loaded (tests that install plugins at run time call this)."""
    with _lock:
        _entry_points.clear()
        _loaded.clear()
