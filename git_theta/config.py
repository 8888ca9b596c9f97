"""Settings and git config, read once per process: command-line flag > environment variable > git
config > default, resolved here and nowhere else.

git config is read with one ``git config -z --list`` per repository and process (every scope,
includes followed, multi-valued keys kept in git's order): the ``theta.*`` settings below, the
``theta.merge.*`` keys, the remote keys (``lfs.url``, ``remote.<name>.*``, ``branch.<name>.remote``)
and ``http.*``, where ``http.<url>.<key>`` applies to the URLs it matches as ``git config
--get-urlmatch`` decides (:meth:`Settings.url_value`). Not read here, on purpose: the scoped reads
and writes of ``git theta install`` (one scope, not the merged view), files a repository supplies
(``.lfsconfig``, read key by key through the allow-list) and ``git config --get-colorbool`` (git
decides colour from the terminal too).
"""

import os
import subprocess
from urllib.parse import urlsplit

from git_theta.errors import ConfigError

#: the unit suffixes git config accepts on integers
_INT_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

# name -> (default, kind, help). Names are git config keys under ``theta.`` (camelCase like git's).
DEFAULTS = {
    "fsync": (True, "bool", "fsync objects before renaming them into place"),
    "statCache": (True, "bool", "reuse the last manifest of an unchanged file (checked by content hash)"),
    "threads": (0, "int", "worker threads for encoding and decoding (0: one per core)"),
    "memoryBudget": (192 << 20, "int", "bytes of tensors in flight beyond the one being read"),
    "maxChainDepth": (
        32,
        "int",
        "versions a keyframe's deltas may cover before clean stores a new keyframe in any case",
    ),
    "skipDeltas": (
        True,
        "bool",
        "a new sparse delta replaces the newest of its chain like a binary counter (short chains, larger store)",
    ),
    "keyframePercent": (50, "int", "a new keyframe once the deltas on a keyframe add up to this percent of its size"),
    "maxChainPercent": (
        130,
        "int",
        "a delta is stored only if its whole chain stays within this percent of the tensor's raw size",
    ),
    "deltaMinBytes": (
        512,
        "int",
        "a changed tensor smaller than this is stored whole (no delta tried) unless an update type is named",
    ),
    "maxFullDeltas": (
        1,
        "int",
        "whole-tensor deltas (int-delta, low-rank, ia3) one chain stacks; another is taken against the keyframe",
    ),
    "baseCache": (256 << 20, "int", "bytes of decoded delta bases kept for reuse during one checkout"),
    "addRequest": ("", "str", "set by 'git theta add' for the git add it runs: update type/adapter/base by path"),
    "transfers": (4, "int", "objects uploaded or downloaded at once"),
    "batchSize": (100, "int", "objects per LFS batch request"),
    "retries": (4, "int", "retries of a failed request (connection error, 429, 5xx) with backoff"),
    "skipSmudge": (False, "bool", "leave manifests in the work tree at checkout (then: git theta checkout)"),
    "layoutCache": (True, "bool", "write a many-tensor file smudged before again from its recorded layout"),
    "maxObjectSize": (2 << 30, "int", "largest object sent to a remote; bigger objects are split"),
    "packThreshold": (
        2 << 20,
        "int",
        "objects up to this many bytes written by one clean go into a pack (0: never pack)",
    ),
    "rawThreshold": (
        256 << 10,
        "int",
        "tensors up to this many bytes (and theta.packThreshold) are stored as their own bytes in a pack",
    ),
    "packSize": (64 << 20, "int", "bytes of small objects collected before a pack is written"),
    "streamThreshold": (
        64 << 20,
        "int",
        "tensors of at least this many bytes are read, encoded and decoded in pieces (add: one copy; checkout: none)",
    ),
    "pruneExpire": ("1.hour", "str", "git theta prune keeps unreferenced objects younger than this"),
}

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0", ""}


def _env_name(name):
    out = []
    for ch in name:
        if ch.isupper():
            out.append("_")
        out.append(ch.upper())
    return "GIT_THETA_" + "".join(out)


def config_key(key):
    """``key`` as ``git config --list`` spells it: section and name lower case, subsection as is."""
    section, _, rest = key.partition(".")
    middle, dot, name = rest.rpartition(".")
    return f"{section.lower()}.{middle}{dot}{name.lower()}" if rest else section.lower()


def parse_bool(value, what):
    """git's booleans (a key without ``=`` is true); ConfigError naming ``what`` otherwise."""
    if value is None or isinstance(value, bool):
        return True if value is None else value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{what} must be true or false, not {value!r}")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _url_match(pattern, url):
    """How well the ``http.<pattern>.*`` section matches ``url`` as git's urlmatch ranks it
    (host length, path length, user given), or None when it does not apply."""
    try:
        want, have = urlsplit(pattern), urlsplit(url)
        want_port, have_port = want.port, have.port
    except ValueError:
        return None
    if not want.scheme or want.scheme.lower() != have.scheme.lower():
        return None
    want_host, have_host = (want.hostname or ""), (have.hostname or "")
    want_labels, have_labels = want_host.split("."), have_host.split(".")
    if len(want_labels) != len(have_labels) or any(w != "*" and w != h for w, h in zip(want_labels, have_labels)):
        return None
    default = _DEFAULT_PORTS.get(have.scheme.lower())
    if (want_port or default) != (have_port or default):
        return None
    if want.username is not None and want.username != have.username:
        return None
    path = want.path.rstrip("/")
    if path and not (have.path == path or have.path.startswith(path + "/")):
        return None
    return (len(want_host), len(path), want.username is not None)


class Settings:
    """Resolved settings for one repository (or none)."""

    def __init__(self, config=None, overrides=None, environ=None):
        #: git config: [(key, value)] in git's order (value None: a key without '=')
        self._items = list(config.items()) if isinstance(config, dict) else list(config or ())
        self._config = {}
        for key, value in self._items:
            self._config.setdefault(key, []).append(value)
        self._overrides = overrides or {}
        self._environ = os.environ if environ is None else environ

    # -- git config, any key -------------------------------------------------------------------
    def values(self, key):
        """Every value of git config ``key`` (multi-valued keys), in git's order."""
        return list(self._config.get(config_key(key), ()))

    def value(self, key):
        """The value of git config ``key`` as ``git config --get`` gives it (the last), or None."""
        found = self._config.get(config_key(key))
        if not found:
            return None
        return "true" if found[-1] is None else found[-1]

    def entries(self, prefix):
        """``[(key, value)]`` of every git config key starting with ``prefix``, in git's order."""
        prefix = prefix.lower()
        return [(k, "true" if v is None else v) for k, v in self._items if k.startswith(prefix)]

    def url_value(self, section, name, url):
        """``<section>.<url>.<name>`` for the config URL that best matches ``url``, else
        ``<section>.<name>``: what ``git config --get-urlmatch <section>.<name> <url>`` answers."""
        section, name = section.lower(), name.lower()
        best, best_rank = None, None
        for key, value in self._items:
            if not (key.startswith(section + ".") and key.endswith("." + name)):
                continue
            pattern = key[len(section) + 1 : -len(name) - 1]
            rank = (-1,) if not pattern else _url_match(pattern, url)
            if rank is not None and (best_rank is None or rank >= best_rank):
                best, best_rank = ("true" if value is None else value), rank
        return best

    def ssl_verify(self, url):
        """What an HTTP session to ``url`` verifies TLS with, as git does: False when
        ``GIT_SSL_NO_VERIFY`` is set or ``http[.<url>].sslVerify`` is false, else the CA bundle of
        ``GIT_SSL_CAINFO`` / ``http[.<url>].sslCAInfo``, else True (the system's)."""
        if self._environ.get("GIT_SSL_NO_VERIFY"):
            return False
        verify = self.url_value("http", "sslVerify", url)
        if verify is not None and not parse_bool(verify, "http.sslVerify"):
            return False
        return self._environ.get("GIT_SSL_CAINFO") or self.url_value("http", "sslCAInfo", url) or True

    def proxy(self, url):
        """The proxy for ``url``: ``http[.<url>].proxy`` (requests reads the *_proxy variables)."""
        return self.url_value("http", "proxy", url) or None

    # -- theta.* settings ----------------------------------------------------------------------

    def raw(self, name):
        """The winning raw value (string or flag value) for ``name``, or None."""
        if name in self._overrides and self._overrides[name] is not None:
            return self._overrides[name]
        env = self._environ.get(_env_name(name))
        if env is not None:
            return env
        return self.value("theta." + name)

    def get(self, name, default=None):
        value = self.raw(name)
        if value is None:
            return DEFAULTS[name][0] if name in DEFAULTS else default
        return value

    def get_bool(self, name):
        return parse_bool(self.get(name), f"theta.{name}")

    def get_int(self, name):
        """An integer setting; like git's own, it may end in ``k``, ``m`` or ``g`` (times 1024,
        1024², 1024³): ``git config theta.memoryBudget 512m``."""
        value = self.get(name)
        if isinstance(value, int):
            return value
        text = str(value).strip().replace("_", "")
        scale = _INT_UNITS.get(text[-1:].lower(), 1) if not text.lower().startswith("0x") else 1
        try:
            return int(text[:-1] if scale > 1 else text, 0) * scale
        except ValueError:
            raise ConfigError(
                f"theta.{name} must be an integer, not {value!r}", hint="write a number, optionally ending in k, m or g"
            ) from None

    def section(self, prefix):
        """Every config key under ``theta.<prefix>.`` (lowercase names) with its raw value."""
        start = "theta." + prefix.lower() + "."
        return {k[len(start) :]: v for k, v in self.entries(start)}

    def threads(self):
        n = self.get_int("threads")
        return n if n > 0 else max(1, os.cpu_count() or 1)


def read_git_config(cwd):
    """Every git config entry seen from ``cwd``: ``[(key, value)]`` in git's order, keys spelt as
    :func:`config_key` spells them; value None for a key written without ``=``."""
    proc = subprocess.run(["git", "config", "-z", "--list"], cwd=cwd, capture_output=True)
    items = []
    for item in proc.stdout.split(b"\0"):
        if not item:
            continue
        key, newline, value = item.decode("utf-8", "replace").partition("\n")
        items.append((key, value if newline else None))
    return items


_cache = {}


def settings_for(repo, overrides=None):
    """Settings for ``repo`` (config read once per process and repository)."""
    key = str(repo.cwd) if repo is not None else None
    if key not in _cache:
        _cache[key] = read_git_config(repo.cwd) if repo is not None else []
    return Settings(_cache[key], overrides)


def forget(repo=None):
    """Drop the config snapshot of ``repo`` (None: of every repository), so the next
    :func:`settings_for` reads git config again: for a long-running Python process that changed
    git config since (git-theta's commands never do)."""
    if repo is None:
        _cache.clear()
    else:
        _cache.pop(str(repo.cwd), None)
