"""Settings, resolved once per process: command-line flag > ``GIT_THETA_*`` environment variable >
git config ``theta.*`` > default. No other module reads the environment for settings.
"""

import os
import subprocess

from .errors import ConfigError

# name -> (default, kind, help). Names are git config keys under ``theta.`` (camelCase like git's).
DEFAULTS = {
    "fsync": (True, "bool", "fsync objects before renaming them into place"),
    "statCache": (True, "bool", "reuse the last manifest of an unchanged file (checked by content hash)"),
    "threads": (0, "int", "worker threads for encoding and decoding (0: one per core)"),
    "memoryBudget": (192 << 20, "int", "bytes of tensors in flight beyond the one being read"),
    "maxChainDepth": (32, "int", "deltas on top of a dense keyframe before clean stores a new keyframe in any case"),
    "keyframePercent": (50, "int", "a new keyframe once the deltas on a keyframe add up to this percent of its size"),
    "maxFullDeltas": (1, "int", "whole-tensor deltas (int-delta, low-rank, ia3) one chain stacks; another is taken against the keyframe"),
    "baseCache": (256 << 20, "int", "bytes of decoded delta bases kept for reuse during one checkout"),
    "addRequest": ("", "str", "set by 'git theta add' for the git add it runs: update type/adapter/base by path"),
    "transfers": (4, "int", "objects uploaded or downloaded at once"),
    "batchSize": (100, "int", "objects per LFS batch request"),
    "retries": (4, "int", "retries of a failed request (connection error, 429, 5xx) with backoff"),
    "skipSmudge": (False, "bool", "leave manifests in the work tree at checkout (then: git theta checkout)"),
    "maxObjectSize": (2 << 30, "int", "largest object sent to a remote; bigger objects are split"),
    "packThreshold": (256 << 10, "int", "objects up to this many bytes written by one clean go into a pack (0: never pack)"),
    "packSize": (64 << 20, "int", "bytes of small objects collected before a pack is written"),
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


class Settings:
    """Resolved settings for one repository (or none)."""

    def __init__(self, config=None, overrides=None, environ=None):
        self._config = config or {}
        self._overrides = overrides or {}
        self._environ = os.environ if environ is None else environ

    def raw(self, name):
        """The winning raw value (string or flag value) for ``name``, or None."""
        if name in self._overrides and self._overrides[name] is not None:
            return self._overrides[name]
        env = self._environ.get(_env_name(name))
        if env is not None:
            return env
        return self._config.get("theta." + name.lower())

    def get(self, name, default=None):
        value = self.raw(name)
        if value is None:
            return DEFAULTS[name][0] if name in DEFAULTS else default
        return value

    def get_bool(self, name):
        value = self.get(name)
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"theta.{name} must be true or false, not {value!r}")

    def get_int(self, name):
        value = self.get(name)
        try:
            return int(str(value).strip().replace("_", ""), 0) if not isinstance(value, int) else value
        except ValueError:
            raise ConfigError(f"theta.{name} must be an integer, not {value!r}") from None

    def section(self, prefix):
        """Every config key under ``theta.<prefix>.`` (lowercase names) with its raw value."""
        start = "theta." + prefix.lower() + "."
        return {k[len(start) :]: v for k, v in self._config.items() if k.startswith(start)}

    def threads(self):
        n = self.get_int("threads")
        return n if n > 0 else max(1, os.cpu_count() or 1)


def read_git_config(cwd):
    """All ``theta.*`` git config entries (keys lowercased as git reports them)."""
    proc = subprocess.run(
        ["git", "config", "-z", "--get-regexp", r"^theta\."], cwd=cwd, capture_output=True
    )
    config = {}
    for item in proc.stdout.split(b"\0"):
        if not item:
            continue
        key, _, value = item.decode("utf-8", "replace").partition("\n")
        config[key] = value
    return config


_cache = {}


def settings_for(repo, overrides=None):
    """Settings for ``repo`` (config read once per process and repository)."""
    key = str(repo.cwd) if repo is not None else None
    if key not in _cache:
        _cache[key] = read_git_config(repo.cwd) if repo is not None else {}
    return Settings(_cache[key], overrides)
