"""What git-theta accepts from files a cloned repository brings with it.

``.gitattributes`` and ``.lfsconfig`` are written by whoever made the repository, not by the user
running git-theta, so they may only *choose among* things the user installed, never supply code,
commands, paths or hosts of their own:

- **attributes**: git-theta reads exactly the ``theta-*`` attributes in :data:`ATTRIBUTES`
  (``theta-format``: a format plugin's name; ``theta-merge``: a merge operator's name). Each value
  must be a plain plugin name; anything else is a ConfigError naming the file and attribute. Every
  other ``theta-*`` attribute is ignored: git-theta never asks git for it.
- **.lfsconfig**: only the keys in :func:`lfsconfig_key_allowed` (``lfs.url``, ``lfs.pushurl``,
  ``remote.<name>.lfsurl``, ``remote.<name>.lfspushurl``), only ``https://`` or ``http://`` URLs
  without control characters, whitespace or embedded credentials. Local-path and other transports
  must come from the user's own git config. ``include.*`` directives are not followed.
"""

import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from git_theta.errors import ConfigError

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}\Z")  # the plugin-name rule (plugins.py)
ATTRIBUTES = {
    "theta-format": "a checkpoint format plugin name",
    "theta-merge": "a merge operator plugin name",
}
_LFS_KEYS = re.compile(r"(lfs\.url|lfs\.pushurl|remote\.[^\s.][^\s]*\.lfsurl|remote\.[^\s.][^\s]*\.lfspushurl)\Z")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def theta_attribute(repo, path, name):
    """The value of allow-listed attribute ``name`` for ``path``, or None when it is not set.

    ConfigError when the repository sets it to something that is not a plugin name.
    """
    if name not in ATTRIBUTES:
        raise ValueError(f"{name} is not an attribute git-theta reads")  # a programming error
    value = repo.attribute(path, name)
    if value in ("unspecified", "unset"):
        return None
    if value == "set":
        raise ConfigError(
            f"{path}: attribute {name} in .gitattributes needs a value ({name}=NAME)",
            hint=f"{name} must name {ATTRIBUTES[name]}; see 'git theta plugins'",
        )
    return check_attribute(name, value, path)


def check_attribute(name, value, path="?"):
    """Validate one attribute value (``set``, i.e. a bare ``theta-format``, is not a name)."""
    if not _NAME.match(value or ""):
        raise ConfigError(
            f"{path}: attribute {name}={value!r} in .gitattributes is not a valid name",
            hint=f"{name} must name {ATTRIBUTES[name]} (lowercase letters, digits, '-', '_'); see 'git theta plugins'",
        )
    return value


def lfsconfig_key_allowed(key):
    """True for the ``.lfsconfig`` keys git-theta honours (git reports keys lowercased)."""
    return bool(_LFS_KEYS.match(key.lower()))


def check_lfs_url(url, where=".lfsconfig"):
    """Return ``url`` if a repository may point git-theta at it; ConfigError otherwise."""
    if not isinstance(url, str) or _CONTROL.search(url):
        raise ConfigError(f"{where}: LFS URL {url!r} contains whitespace or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(
            f"{where}: LFS URL {url!r} is not an http(s) URL",
            hint="a repository's .lfsconfig may only name http(s) servers; set other remotes "
            "in your own git config (git config lfs.url ...)",
        )
    if parts.username or parts.password:
        raise ConfigError(
            f"{where}: LFS URL {url!r} embeds credentials",
            hint="credentials come only from 'git credential', never from the repository",
        )
    return url


def read_lfsconfig(work_tree):
    """The allowed settings of ``<work_tree>/.lfsconfig``: (dict key -> value, ignored keys).

    Parsed by git itself (``git config --file``, no includes). A disallowed key is ignored and
    returned in the second list so callers can mention it; a disallowed URL is a ConfigError.
    """
    path = Path(work_tree) / ".lfsconfig"
    if not path.is_file():
        return {}, []
    proc = subprocess.run(["git", "config", "--no-includes", "--file", str(path), "-z", "--list"], capture_output=True)
    if proc.returncode != 0:
        raise ConfigError(f"{path}: not a valid git config file: {proc.stderr.decode().strip()}")
    allowed, ignored = {}, []
    for item in proc.stdout.split(b"\0"):
        if not item:
            continue
        key, _, value = item.decode("utf-8", "replace").partition("\n")
        if lfsconfig_key_allowed(key):
            allowed[key] = check_lfs_url(value, f".lfsconfig {key}")
        else:
            ignored.append(key)
    return allowed, ignored
