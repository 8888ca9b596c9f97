"""The git repository git-theta works in: paths, plumbing calls and long-lived helper processes.

Everything runs real ``git`` plumbing as subprocesses (a persistent ``git cat-file --batch`` for
reading manifests), which costs a few milliseconds rather than the import time of a git library in
the filter's start-up. The object store lives in the *common* git directory so all worktrees share it.
"""

import os
import subprocess
import threading
from functools import cached_property
from pathlib import Path

from git_theta.errors import GitCommandError, NotInRepositoryError


def run_git(args, cwd=None, input=None, check=True, env=None):
    """Run ``git args`` and return stdout bytes; GitCommandError (with git's message) on failure."""
    proc = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True, env=env)
    if check and proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitCommandError(
            f"git {' '.join(args[:3])} failed: {message[-1] if message else 'exit %d' % proc.returncode}"
        )
    return proc.stdout


def records(out):
    """(metadata fields, path) of each NUL-terminated ``<meta>\\t<path>`` record of ``out``, as
    ``git ls-files -s -z`` and ``git ls-tree -z`` print them."""
    for item in out.split(b"\0"):
        if item:
            meta, _, path = item.decode("utf-8", "surrogateescape").partition("\t")
            yield meta.split(), path


class CatFile:
    """A persistent ``git cat-file --batch``: read many blobs with one process."""

    def __init__(self, cwd):
        self._cwd = cwd
        self._proc = None
        self._lock = threading.Lock()

    def _start(self):
        self._proc = subprocess.Popen(
            ["git", "cat-file", "--batch"],
            cwd=self._cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def read(self, spec):
        """Contents of object ``spec`` (``REV:PATH``, ``:PATH``, an oid), or None if it is missing."""
        if "\n" in spec:
            return None
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            self._proc.stdin.write(spec.encode("utf-8") + b"\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
            if not line:
                self._proc = None
                raise GitCommandError("git cat-file stopped unexpectedly")
            parts = line.split()
            if len(parts) != 3 or parts[1] == b"missing":
                return None
            size = int(parts[2])
            data = self._proc.stdout.read(size)
            self._proc.stdout.read(1)  # the newline after the contents
            return data

    def close(self):
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
            self._proc = None


class Repo:
    """A git repository (work tree optional) as seen from ``path``."""

    def __init__(self, path="."):
        path = Path(path).resolve()
        # The hooks folder too (core.hooksPath honoured): the filter process places its hooks at
        # every start, and one git process less is ~10-25 ms of each start.
        asked = ["--git-dir", "--git-common-dir", "--git-path", "hooks"]
        proc = subprocess.run(["git", "rev-parse", "--show-toplevel", *asked], cwd=path, capture_output=True)
        if proc.returncode != 0:
            # a bare repository has no top level
            proc = subprocess.run(["git", "rev-parse", *asked], cwd=path, capture_output=True)
            if proc.returncode != 0:
                raise NotInRepositoryError(
                    f"not a git repository: {path}", hint="run this inside a git repository (git init)"
                )
            lines = proc.stdout.decode().splitlines()
            self.work_tree = None
        else:
            lines = proc.stdout.decode().splitlines()
            self.work_tree = Path(lines.pop(0))
        self.git_dir = (path / lines[0]).resolve()
        self.common_dir = (path / lines[1]).resolve()
        self.hooks_dir = (path / lines[2]).resolve()
        self.cwd = self.work_tree or self.git_dir
        self._cat_file = None

    @cached_property
    def theta_dir(self):
        return self.common_dir / "theta"

    @cached_property
    def store(self):
        from git_theta.store.objects import ObjectStore
        from git_theta.config import settings_for

        from git_theta.store.trust import TrustLedger, max_chain_objects

        settings = settings_for(self)
        store = ObjectStore(
            self.theta_dir / "objects",
            fsync=settings.get_bool("fsync"),
            max_object_size=settings.get_int("maxObjectSize"),
            pack_threshold=settings.get_int("packThreshold"),
            raw_threshold=settings.get_int("rawThreshold"),
            pack_size=settings.get_int("packSize"),
        )
        store.trust = TrustLedger(self.cache)
        store.max_chain_objects = max_chain_objects(settings.get_int("maxChainDepth"))
        store.stream_threshold = max(1, settings.get_int("streamThreshold"))  # see tensors/streaming.py
        store.threads = settings.threads()
        return store

    @cached_property
    def cache(self):
        from git_theta.store.cache import Cache

        return Cache(self.theta_dir / "cache.sqlite3")

    def git(self, *args, input=None, check=True):
        return run_git(list(args), cwd=self.cwd, input=input, check=check)

    def read_blob(self, spec):
        """Contents of ``spec`` through a persistent cat-file, or None when it does not exist."""
        if self._cat_file is None:
            self._cat_file = CatFile(self.cwd)
        return self._cat_file.read(spec)

    def attribute(self, path, name):
        """Value of git attribute ``name`` for ``path`` ("unspecified", "set", "unset" or a value)."""
        out = self.git("check-attr", "-z", name, "--", path).split(b"\0")
        return out[2].decode("utf-8") if len(out) >= 3 else "unspecified"

    def close(self):
        if self._cat_file is not None:
            self._cat_file.close()
            self._cat_file = None
        if "store" in self.__dict__:
            self.store.close()
        if "cache" in self.__dict__:
            self.cache.close()

    def relative(self, path):
        """``path`` relative to the work tree root, with forward slashes (git's pathname)."""
        absolute = Path(os.path.abspath(path))
        return absolute.relative_to(self.work_tree).as_posix()
