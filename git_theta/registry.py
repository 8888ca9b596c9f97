"""One registry for the three kinds of plugin: checkpoint formats, update types, merge operators.

Every plugin, built-in or third-party, is a Python entry point in one of the groups below whose
object is a class (instantiated once) or an instance with a ``name`` attribute equal to the entry
point's name. Entry points are read on first use (from a per-user cache while the installed
distributions have not changed, :mod:`git_theta.entry_points`) and each plugin is imported only
when needed, so the filter's start-up stays light.

Checks, so a bad plugin fails loudly and early rather than corrupting a manifest:

- when a group is read: a malformed name, or one name registered by two packages, is an error
  naming the packages;
- when a plugin is loaded: it must import, call itself by its entry point's name and have the
  methods of its interface (:data:`INTERFACES`);
- a name nobody provides (a manifest written with a plugin that is not installed here) is an
  error whose hint says which package to install: the package the manifest recorded (field
  ``plugin.package``), else a known package for that name, else the entry point to look for.
"""

import re
import threading

from git_theta.errors import PluginError

GROUPS = {
    "format": "git_theta.formats",
    "update": "git_theta.updates",
    "merge": "git_theta.merge_operators",
}
#: Methods each kind of plugin must have (the interfaces are documented in plugins/README.md).
INTERFACES = {
    "format": ("sniff", "split", "join"),
    "update": ("encode", "decode"),
    "merge": ("merge",),
}
#: The distribution of git-theta itself: its plugins are the built-ins.
BUILTIN_PACKAGE = "git-theta"
#: Where to get plugins that live in this repository's ``plugins/`` folder (for the missing-plugin hint).
KNOWN_PACKAGES = {
    ("format", "gguf"): "git-theta-gguf",
    ("format", "onnx"): "git-theta-onnx",
    ("merge", "fisher"): "git-theta-fisher",
}
#: The manifest field in which clean records the package of a third-party format.
PACKAGE_FIELD = "plugin.package"

_NAME = re.compile(r"[a-z][a-z0-9_-]*\Z")
_lock = threading.Lock()
_declared = None  # {group: [entry_points.Entry]} of every group, read once
_entry_points = {}  # kind -> {name: entry_points.Entry}, checked
_loaded = {}  # (kind, name) -> plugin object


def _group(kind):
    with _lock:
        if kind not in _entry_points:
            global _declared
            if _declared is None:
                from git_theta import entry_points

                _declared = entry_points.read(list(GROUPS.values()))  # every group at once
            found = {}
            for ep in _declared[GROUPS[kind]]:
                if not _NAME.match(ep.name):
                    raise PluginError(
                        f"malformed {kind} plugin name {ep.name!r} (from {_origin(ep)})",
                        hint="names are lowercase letters, digits, '-' and '_', starting with a letter; "
                        f"fix or uninstall {package_of(ep)}",
                    )
                if ep.name in found and found[ep.name].value != ep.value:
                    raise PluginError(
                        f"{kind} plugin {ep.name!r} is registered twice: "
                        f"by {_origin(found[ep.name])} and by {_origin(ep)}",
                        hint=f"names are written into manifests and must be unique: uninstall one of "
                        f"{package_of(found[ep.name])} and {package_of(ep)}",
                    )
                found[ep.name] = ep
            _entry_points[kind] = found
        return _entry_points[kind]


def package_of(ep):
    """Name of the distribution that registered entry point ``ep`` ("?" when unknown)."""
    return ep.package or "?"


def _origin(ep):
    if ep.package is None:
        return ep.value
    return f"{ep.package} {ep.version} ({ep.value})"


def location(ep):
    """Where the plugin's package is installed: its source folder for an editable install."""
    import json

    dist = ep.distribution()
    if dist is None:
        return "?"
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        direct = {}
    url = direct.get("url", "")
    if direct.get("dir_info", {}).get("editable") and url.startswith("file://"):
        return url[len("file://") :] + " (editable)"
    return str(dist.locate_file(""))


def names(kind):
    """Sorted names of the installed plugins of ``kind``."""
    return sorted(_group(kind))


def provider(kind, name):
    """The package that provides plugin ``name`` (None when none does)."""
    ep = _group(kind).get(name)
    return package_of(ep) if ep is not None else None


def version(kind, name):
    """The version of the package that provides plugin ``name`` of ``kind`` (None when no
    installed package does)."""
    ep = _group(kind).get(name)
    return ep.version if ep is not None else None


def install_hint(kind, name, package=None):
    """What to tell a user who needs plugin ``name`` of ``kind`` and does not have it."""
    package = package or KNOWN_PACKAGES.get((kind, name))
    if package:
        return f"install the package that provides it: pip install {package}"
    return (
        f"install the package that registers the '{GROUPS[kind]}' entry point '{name}' "
        f"(see 'git theta plugins' where the file was written)"
    )


def get(kind, name, needed_by=None, package=None):
    """The plugin object called ``name``; PluginError saying what to install when it is missing.

    ``package`` is the distribution a manifest says provided the plugin, if it recorded one.
    """
    key = (kind, name)
    if key in _loaded:
        return _loaded[key]
    group = _group(kind)
    ep = group.get(name)
    if ep is None:
        where = f" (needed by {needed_by})" if needed_by else ""
        raise PluginError(
            f"no {kind} plugin named {name!r} is installed{where}; installed: {', '.join(sorted(group)) or 'none'}",
            hint=install_hint(kind, name, package),
        )
    try:
        obj = ep.load()
    except Exception as exc:
        raise PluginError(
            f"{kind} plugin {name!r} from {_origin(ep)} failed to load: {exc}",
            hint=f"reinstall or upgrade {package_of(ep)}",
        ) from exc
    try:
        if isinstance(obj, type):
            obj = obj()
    except Exception as exc:
        raise PluginError(f"{kind} plugin {name!r} from {_origin(ep)} failed to start: {exc}") from exc
    if getattr(obj, "name", None) != name:
        raise PluginError(
            f"{kind} plugin {name!r} from {_origin(ep)} calls itself {getattr(obj, 'name', None)!r}",
            hint="the entry point name and the plugin's name attribute must match",
        )
    missing = [m for m in INTERFACES[kind] if not _implements(obj, kind, m)]
    if missing:
        raise PluginError(
            f"{kind} plugin {name!r} from {_origin(ep)} does not implement {', '.join(missing)}",
            hint=f"a {kind} plugin needs {', '.join(INTERFACES[kind])} (see plugins/README.md)",
        )
    with _lock:
        _loaded.setdefault(key, obj)
    return _loaded[key]


#: The base class of each kind, whose methods only raise NotImplementedError.
_BASES = {
    "format": ("git_theta.formats.base", "CheckpointFormat"),
    "update": ("git_theta.updates.base", "UpdateType"),
    "merge": ("git_theta.merge.operator", "MergeOperator"),
}


def _implements(obj, kind, method):
    """True when ``obj`` has ``method`` and it is not the base class's unimplemented stub."""
    import importlib

    found = getattr(type(obj), method, None) or getattr(obj, method, None)
    if not callable(found):
        return False
    module, name = _BASES[kind]
    base = getattr(importlib.import_module(module), name)
    return found is not getattr(base, method, None)


def all_plugins(kind):
    """Every plugin of ``kind``, loaded, in name order."""
    return [get(kind, name) for name in names(kind)]


def describe():
    """One dict per installed plugin: kind, name, package, version, builtin, object, location."""
    rows = []
    for kind in GROUPS:
        for name, ep in sorted(_group(kind).items()):
            package = package_of(ep)
            rows.append(
                {
                    "kind": kind,
                    "name": name,
                    "package": package,
                    "version": ep.version or "?",
                    "builtin": package == BUILTIN_PACKAGE,
                    "object": ep.value,
                    "location": location(ep),
                }
            )
    return rows


def reset():
    """Forget what was loaded, and read entry points afresh from now on, never from or into
    the cache (tests that install plugins at run time call this)."""
    from git_theta import entry_points

    global _declared
    with _lock:
        entry_points.forget()
        _declared = None
        _entry_points.clear()
        _loaded.clear()
