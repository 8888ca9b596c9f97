"""Credentials for LFS servers, only through ``git credential fill/approve/reject``.

git-theta never stores a credential: the user's credential helper does (or a prompt asks, unless
``GIT_TERMINAL_PROMPT=0``). A credential that worked is approved, one the server refused is rejected,
exactly like git does for its own HTTP transport.
"""

import subprocess
from urllib.parse import urlsplit

from git_theta.errors import RemoteError


class CredentialError(RemoteError):
    """No credential could be obtained for a server that asks for one."""


def _describe(url):
    parts = urlsplit(url)
    lines = [f"protocol={parts.scheme}", f"host={parts.netloc.rpartition('@')[2]}"]
    if parts.path:
        lines.append(f"path={parts.path.lstrip('/')}")
    return lines


def _call(action, lines, cwd):
    return subprocess.run(
        ["git", "credential", action],
        input=("\n".join(lines) + "\n\n").encode(),
        capture_output=True,
        cwd=cwd,
    )


def fill(url, cwd=None):
    """(username, password) for ``url`` from git's credential helpers (or its prompt)."""
    proc = _call("fill", _describe(url), cwd)
    values = {}
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    if proc.returncode != 0 or "password" not in values:
        raise CredentialError(
            f"{url} needs credentials and git credential gave none",
            hint="configure a credential helper (git config credential.helper ...) or run the "
            "command in a terminal so git can ask",
        )
    return values.get("username", ""), values["password"]


def approve(url, username, password, cwd=None):
    """Tell the helpers the credential worked (they may store it)."""
    _call("approve", _describe(url) + [f"username={username}", f"password={password}"], cwd)


def reject(url, username, password, cwd=None):
    """Tell the helpers the credential was refused (they erase it)."""
    _call("reject", _describe(url) + [f"username={username}", f"password={password}"], cwd)
