"""git's long-running filter protocol (pkt-line, version 2), serving clean and smudge.

One process serves every file of a git command, so start-up is paid once. A failure in one file
answers ``status=error`` for that file and the process keeps serving; a failure that would hit every
file (the repository or the plugins cannot be loaded) answers ``status=abort``. stdout carries
nothing but pkt-lines: the process moves file descriptor 1 to stderr at start so that stray output
from any library cannot corrupt the protocol.
"""

import os
import sys

from git_theta.errors import FilterProtocolError, GitThetaError, NotInRepositoryError, PluginError
from git_theta.filter.pktline import PktContentReader, PktContentWriter, PktReader, PktWriter

CAPABILITIES = ("clean", "smudge")


def protect_stdout():
    """Return a binary stream on the real stdout and point fd 1 (and sys.stdout) at stderr."""
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    enlarge_pipe(protocol_fd)
    return os.fdopen(protocol_fd, "wb", buffering=1 << 16)


PIPE_BYTES = 1 << 20


def enlarge_pipe(fd):
    """Grow the pipe to git to 1 MiB where Linux allows it (best effort).

    A checkout streams the whole checkpoint through this pipe; with the default 64 KiB each
    packet makes both processes wait for each other, and the larger pipe halves the transfer time.
    """
    import fcntl

    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setpipe is None:
        return
    try:
        fcntl.fcntl(fd, setpipe, PIPE_BYTES)
    except OSError:  # not a pipe, or over /proc/sys/fs/pipe-max-size
        pass


def handshake(reader, writer):
    """Answer git's welcome and capability negotiation."""
    welcome = reader.read_text_list()
    if not welcome or welcome[0] != "git-filter-client" or "version=2" not in welcome[1:]:
        raise FilterProtocolError(f"unexpected filter welcome {welcome!r}")
    writer.write_text_list(["git-filter-server", "version=2"])
    offered = {item.partition("=")[2] for item in reader.read_text_list() if item.startswith("capability=")}
    writer.write_text_list([f"capability={c}" for c in CAPABILITIES if c in offered])


class FilterServer:
    """Serves requests until git closes the pipe. ``report(exc, path)`` prints a failure."""

    def __init__(self, stdin, stdout, make_workers, report):
        self._reader = PktReader(stdin)
        self._writer = PktWriter(stdout)
        self._make_workers = make_workers  # () -> (cleaner, smudger); may raise
        self._report = report
        self._workers = None
        self._aborted = False

    def serve(self):
        handshake(self._reader, self._writer)
        try:
            while True:
                try:
                    headers = self._reader.read_key_values()
                except EOFError:
                    return
                self._handle(headers)
        finally:
            if self._workers:
                for worker in self._workers:
                    worker.close()

    def _status(self, status):
        self._writer.write_text_list([f"status={status}"])

    def _handle(self, headers):
        command = headers.get("command")
        path = headers.get("pathname", "?")
        content = PktContentReader(self._reader)
        if self._aborted or command not in CAPABILITIES:
            content.drain()
            self._status("abort" if self._aborted else "error")
            return
        try:
            if self._workers is None:
                self._workers = self._make_workers()
        except (NotInRepositoryError, PluginError) as exc:
            content.drain()
            self._report(exc, path)
            self._aborted = True
            self._status("abort")
            return
        cleaner, smudger = self._workers
        if command == "clean":
            self._clean(cleaner, content, path)
        else:
            self._smudge(smudger, content, path)

    def _clean(self, cleaner, content, path):
        try:
            result = cleaner.clean(content, path, defer=True)
        except BaseException as exc:  # noqa: BLE001 - one file's failure must not stop the process
            content.drain()
            if not isinstance(exc, Exception):
                raise
            self._report(exc, path)
            self._status("error")
            return
        content.drain()
        self._status("success")
        body = PktContentWriter(self._writer)
        body.write(result)
        body.flush()
        self._writer.flush()  # end of content
        self._writer.flush()  # status unchanged
        try:  # while git stores the manifest: caches only, so the file's answer stands
            cleaner.settle()
        except Exception as exc:  # noqa: BLE001
            self._report(exc, path)

    def _smudge(self, smudger, content, path):
        data = content.read()
        try:
            prepared, missing = smudger.plan(data, path)
        except Exception as exc:  # noqa: BLE001
            self._report(exc, path)
            self._status("error")
            return
        if missing is not None:
            self._report(missing, path)  # the manifest stays; see Smudger.plan
        self._status("success")
        body = PktContentWriter(self._writer)
        try:
            if prepared is None:
                body.write(data)
            else:
                # git keeps what it reads until the status after it: an error discards the file
                smudger.write(*prepared, path, body, streaming=True)
            body.flush()
        except Exception as exc:  # noqa: BLE001 - git discards the content when we end with error
            body.flush()
            self._writer.flush()
            self._report(exc, path)
            self._status("error")
            return
        self._writer.flush()
        self._writer.flush()


def few_collections():
    """Run Python's cycle collector rarely: a checkpoint of 200,000 tensors allocates millions of
    small objects (header entries, manifest lines), and the default threshold (700) collects so
    often that parsing a 200,000-entry safetensors header took twice as long. Objects of the
    start-up (modules, plugins) are frozen out of every collection."""
    import gc

    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


class _Lazy:
    """A worker made when it is first used: a checkout never imports clean's modules, nor an add
    smudge's (the filter starts for every git command that touches a tracked file)."""

    def __init__(self, make):
        self._make = make
        self._made = None

    def __getattr__(self, name):
        if self._made is None:
            self._made = self._make()
        return getattr(self._made, name)

    def close(self):
        if self._made is not None:
            self._made.close()


def _cleaner(repo):
    from git_theta.filter.clean import Cleaner

    return Cleaner(repo)


def _smudger(repo):
    from git_theta.filter.smudge import Smudger

    return Smudger(repo)


def run(report):
    """Entry point of ``git-theta filter-process``."""
    from git_theta.git.repo import Repo

    stdout = protect_stdout()
    few_collections()
    repo_holder = []

    def make_workers():
        from git_theta.git.hooks import ensure_hooks

        repo = Repo(".")
        repo_holder.append(repo)
        ensure_hooks(repo)  # a fresh clone gets its pre-push hook, so its pushes carry the objects
        return _Lazy(lambda: _cleaner(repo)), _Lazy(lambda: _smudger(repo))

    try:
        FilterServer(sys.stdin.buffer, stdout, make_workers, report).serve()
    finally:
        for repo in repo_holder:
            repo.close()
        try:
            stdout.flush()
        except (BrokenPipeError, ValueError):
            pass
    # git waits for this process to exit before its own command returns. Everything is closed and
    # flushed: skip the interpreter's teardown (freeing every buffer and module one by one), which
    # costs 0.05-0.1 s after a large checkout.
    sys.stderr.flush()
    os._exit(0)


__all__ = ["FilterServer", "run", "GitThetaError"]
