"""The entry points of git-theta's plugin groups, as the installed distributions declare them,
kept in a small per-user cache from one process to the next.

Reading them cost every git-theta process ~20 ms on the development machine (191 distributions
installed: importing ``importlib.metadata`` ~12 ms, reading each distribution's entry points
~7 ms), a third of a filter process that checks out a small file, and git starts one for every
command that touches a tracked file (``git status`` included). So what was read is kept in
``$XDG_CACHE_HOME/git-theta/entry-points.json`` (default ``~/.cache``), keyed by the interpreter
and the modification time of every folder on ``sys.path``: installing, upgrading or removing a
distribution creates or deletes its ``*.dist-info`` folder in one of them, which changes that
folder's time, and the next process reads them afresh. A process whose ``sys.path`` holds the
current directory (``python -m git_theta``) always reads them afresh: that folder is a different
one in every repository. The file is a cache: unreadable, stale-keyed or malformed, it is ignored
and written again.
"""

import hashlib
import json
import os
import re
import sys

CACHE_VERSION = 1
#: ``module:attr.attr [extras]``, as an entry point's value is written
_VALUE = re.compile(r"^(?P<module>[\w.]+)\s*(?::\s*(?P<attr>[\w.]+))?\s*(?:\[[^\]]*\])?\s*$")

_fresh_only = False  # set by forget(): read afresh from now on, and write no cache


class Entry:
    """One entry point: its ``name``, ``value`` (``module:attr``) and ``group``, and the
    ``package`` (distribution name) and ``version`` that declare it (None when unknown)."""

    __slots__ = ("name", "value", "group", "package", "version", "_real")

    def __init__(self, name, value, group, package=None, version=None, real=None):
        self.name, self.value, self.group = name, value, group
        self.package, self.version = package, version
        self._real = real  # the importlib.metadata EntryPoint, when read afresh

    def load(self):
        """The object the entry point names (its module imported)."""
        if self._real is not None:
            return self._real.load()
        import importlib

        match = _VALUE.match(self.value)
        if match is None:
            raise ValueError(f"malformed entry point value {self.value!r}")
        found = importlib.import_module(match.group("module"))
        attrs = match.group("attr")
        for attr in attrs.split(".") if attrs else ():
            found = getattr(found, attr)
        return found

    def distribution(self):
        """The ``importlib.metadata`` Distribution that declares it, or None."""
        if self._real is not None:
            return getattr(self._real, "dist", None)
        if self.package is None:
            return None
        import importlib.metadata

        try:
            return importlib.metadata.distribution(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None


def read(groups):
    """``{group: [Entry]}`` for each of ``groups``, from the cache when it is current."""
    key = _key()
    cached = _load(key, groups) if key is not None else None
    if cached is not None:
        return cached
    found = {group: _scan(group) for group in groups}
    if key is not None:
        _store(key, found)
    return found


def forget():
    """Read entry points afresh for the rest of this process, and write no cache (tests that
    replace ``importlib.metadata.entry_points`` call this, through the registry's reset)."""
    global _fresh_only
    _fresh_only = True


def _scan(group):
    import importlib.metadata

    entries = []
    for ep in importlib.metadata.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else None
        version = dist.version if dist is not None else None
        entries.append(Entry(ep.name, ep.value, group, package, version, real=ep))
    return entries


def cache_path():
    """Where the cache lives."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "git-theta", "entry-points.json")


def _key():
    """The key the cache is current for, or None when this process must read afresh."""
    if _fresh_only:
        return None
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    parts = [str(CACHE_VERSION), sys.version, sys.prefix]
    for entry in sys.path:
        if entry in ("", ".") or os.path.abspath(entry) == cwd:
            return None
        try:
            stamp = os.stat(entry).st_mtime_ns
        except OSError:
            stamp = None
        parts.append(f"{entry}\0{stamp}")
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()


def _load(key, groups):
    try:
        with open(cache_path(), encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("key") != key:
            return None
        found = {}
        for group in groups:
            found[group] = [
                Entry(str(name), str(value), group, package, version)
                for name, value, package, version in data["groups"][group]
            ]
        return found
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _store(key, found):
    path = cache_path()
    data = {
        "key": key,
        "groups": {g: [[e.name, e.value, e.package, e.version] for e in entries] for g, entries in found.items()},
    }
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        os.replace(temp, path)
    except OSError:
        try:
            os.unlink(temp)
        except OSError:
            pass
