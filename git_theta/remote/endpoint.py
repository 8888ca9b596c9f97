"""Where a remote's objects live: an LFS endpoint URL or a directory, resolved like Git LFS does.

Order, first match wins:

1. ``theta.remote.<name>.url`` (git-theta's own: a directory path or an LFS URL);
2. ``lfs.url``, then ``remote.<name>.lfsurl`` from git config;
3. the same two keys from the repository's ``.lfsconfig`` (work tree, else index, else HEAD). Only
   these keys are read from that file: it comes with the repository, so it must not be able to set
   anything else (a credential helper, a proxy);
4. derived from the git remote's URL (``git ls-remote --get-url``, so ``insteadOf`` applies):
   ``https://host/path(.git)`` -> ``https://host/path.git/info/lfs``; ``ssh://[user@]host[:port]/path``
   and ``[user@]host:path`` -> ``https://host/path.git/info/lfs``; a local path or ``file://`` URL
   -> a directory remote: the object store of that repository (``<its git dir>/theta/objects``).
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from git_theta.git.allowlist import check_lfs_url
from git_theta.errors import ConfigError, UsageError
from git_theta.git.repo import run_git

_REPO_ENV = {
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_COMMON_DIR",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_PREFIX",
    "GIT_NAMESPACE",
    "GIT_CEILING_DIRECTORIES",
}
_SCP_LIKE = re.compile(r"^(?:(?P<user>[^@/]+)@)?(?P<host>[^:/]+):(?P<path>.*)$")


@dataclass(frozen=True)
class Endpoint:
    """A resolved object remote: ``kind`` is ``"http"`` (``url``) or ``"dir"`` (``path``)."""

    remote: str  # the git remote name (or the URL given instead of a name)
    kind: str
    url: str = ""
    path: Path | None = None
    source: str = ""  # which setting gave it, for messages

    def describe(self):
        return str(self.path) if self.kind == "dir" else self.url

    @property
    def key(self):
        """A stable file-name-safe key for local records about this remote."""
        return re.sub(r"[^A-Za-z0-9._-]", "_", self.remote)[:100] or "_"


def _config(repo, key):
    from git_theta.config import settings_for

    value = (settings_for(repo).value(key) or "").strip()
    return value or None


def _lfsconfig(repo, key):
    """``key`` from ``.lfsconfig`` (work tree, else index, else HEAD); only allow-listed keys."""
    if key != "lfs.url" and not (key.startswith("remote.") and key.endswith(".lfsurl")):
        raise ValueError(f"{key} may not be read from .lfsconfig")
    sources = []
    if repo.work_tree is not None and (repo.work_tree / ".lfsconfig").is_file():
        sources.append(["-f", str(repo.work_tree / ".lfsconfig")])
    sources += [["--blob", ":.lfsconfig"], ["--blob", "HEAD:.lfsconfig"]]
    for source in sources:
        out = run_git(["config", *source, "--get", key], cwd=repo.cwd, check=False)
        if out and out.strip():
            return out.decode("utf-8", "replace").strip()
    return None


def derive(url):
    """The LFS endpoint URL for a git remote URL, or a Path for a local (directory) remote."""
    if "://" in url:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme == "file":
            return Path(parts.path)
        if scheme in ("http", "https"):
            path = parts.path.rstrip("/")
            if not path.endswith(".git"):
                path += ".git"
            return urlunsplit((scheme, parts.netloc, path + "/info/lfs", "", ""))
        if scheme in ("ssh", "git+ssh", "ssh+git", "git"):
            host = parts.hostname or ""
            path = parts.path.rstrip("/")
            if not path.endswith(".git"):
                path += ".git"
            return f"https://{host}{path}/info/lfs"
        raise ConfigError(
            f"cannot derive an LFS endpoint from the remote URL {url!r}",
            hint="set it with: git config remote.<name>.lfsurl https://.../info/lfs",
        )
    match = _SCP_LIKE.match(url)
    # scp-like syntax needs the colon before any slash (git's rule); otherwise it is a path
    if match and not os.path.isabs(url) and "/" not in url.split(":", 1)[0]:
        path = match.group("path").strip("/")
        if not path.endswith(".git"):
            path += ".git"
        return f"https://{match.group('host')}/{path}/info/lfs"
    return Path(url)


def _directory(path, repo):
    """The object directory of a local remote: its repository's store, or the directory itself."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_absolute():
        path = (repo.cwd / path).resolve()
    # git exports GIT_DIR & co. to filters and hooks: they must not redirect this look at another repo
    env = {k: v for k, v in os.environ.items() if k not in _REPO_ENV}
    out = run_git(["rev-parse", "--git-common-dir"], cwd=path, check=False, env=env) if path.is_dir() else b""
    if out and out.strip():
        common = (path / out.decode().strip()).resolve()
        if common == path or common.parent == path:
            return common / "theta" / "objects"
    return path


def default_remote(repo):
    """The remote to use when none is named: the branch's upstream remote, origin, or the only one."""
    branch = run_git(["symbolic-ref", "-q", "--short", "HEAD"], cwd=repo.cwd, check=False).strip()
    if branch:
        name = _config(repo, f"branch.{branch.decode()}.remote")
        if name and name != ".":
            return name
    remotes = run_git(["remote"], cwd=repo.cwd, check=False).decode().split()
    if "origin" in remotes:
        return "origin"
    if len(remotes) == 1:
        return remotes[0]
    return None


def resolve(repo, remote=None, operation="download"):
    """The Endpoint of ``remote`` (a name or a URL/path; default: see default_remote)."""
    if remote is None:
        remote = default_remote(repo)
        if remote is None:
            raise UsageError(
                "no remote to transfer objects with",
                hint="add one with 'git remote add origin URL', or name one: git theta fetch REMOTE",
            )
    explicit = _config(repo, f"theta.remote.{remote}.url")
    if explicit:
        return _endpoint(repo, remote, explicit, f"theta.remote.{remote}.url")
    for key in ("lfs.url", f"remote.{remote}.lfsurl"):
        value = _config(repo, key)
        if value:
            return _endpoint(repo, remote, value, key)
    for key in ("lfs.url", f"remote.{remote}.lfsurl"):
        value = _lfsconfig(repo, key)
        if value:
            # the repository wrote this, not the user: only http(s) servers (git_theta.git.allowlist)
            check_lfs_url(value, f"{key} in .lfsconfig")
            return _endpoint(repo, remote, value, f"{key} in .lfsconfig")
    url = None
    if operation == "upload":
        url = _config(repo, f"remote.{remote}.pushurl")
    if url is None:
        out = run_git(["ls-remote", "--get-url", remote], cwd=repo.cwd, check=False)
        url = out.decode("utf-8", "replace").strip() if out else remote
    return _endpoint(repo, remote, url, f"the URL of remote {remote!r}", derived=True)


def _endpoint(repo, remote, value, source, derived=False):
    target = derive(value) if derived else (value if re.match(r"^https?://", value) else derive(value))
    if isinstance(target, Path):
        return Endpoint(remote, "dir", path=_directory(target, repo), source=source)
    return Endpoint(remote, "http", url=target.rstrip("/"), source=source)
