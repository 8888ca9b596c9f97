"""A real Git LFS server for the remote tests: giftless with local-disk storage and no authentication,
served by waitress on 127.0.0.1.

Run as a script (``python lfs_server.py STORAGE_DIR``) it binds a free port, prints it, then serves.
The ``lfs_server`` fixture starts one per test session (per xdist worker) and stops it at the end;
tests isolate themselves by using their own repository path on it.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = """
AUTH_PROVIDERS: ["giftless.auth.allow_anon:read_write"]
LEGACY_ENDPOINTS: false
TRANSFER_ADAPTERS:
  basic:
    factory: giftless.transfer.basic_streaming:factory
    options:
      storage_class: giftless.storage.local_storage:LocalStorage
      storage_options: {path: "%s"}
"""


class LfsServer:
    """A running server: ``url(name)`` is the LFS endpoint of repository ``name``."""

    def __init__(self, port, storage):
        self.port = port
        self.storage = Path(storage)

    def url(self, name):
        return f"http://127.0.0.1:{self.port}/team/{name}.git/info/lfs"

    def objects(self, name):
        """oid -> path of every object the server stores for repository ``name``."""
        folder = self.storage / "team" / name
        if not folder.is_dir():
            return {}
        return {p.name: p for p in folder.rglob("*") if p.is_file() and len(p.name) == 64}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(port, proc, attempts=200):
    """Connect until the server answers (bounded); the socket listens before its port is printed."""
    for _ in range(attempts):
        if proc.poll() is not None:
            raise RuntimeError("the LFS server exited during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            continue
    raise RuntimeError("the LFS server did not accept connections")


@pytest.fixture(scope="session")
def lfs_server(tmp_path_factory):
    pytest.importorskip("giftless", reason="the giftless LFS server is not installed (pip install -e '.[lfs-server]')")
    storage = tmp_path_factory.mktemp("lfs-storage")
    log = open(storage.parent / "lfs-server.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT")}
    proc = subprocess.Popen(
        [sys.executable, __file__, str(storage)], stdout=subprocess.PIPE, stderr=log, env=env, cwd=storage
    )
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the LFS server did not start (see {log.name})")
        port = int(line)
        _wait_ready(port, proc)
        yield LfsServer(port, storage)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


BLOCK = 1 << 20


def in_blocks(app, size=BLOCK):
    """WSGI middleware: the response body in blocks of up to ``size`` bytes.

    giftless answers a download with the open file as the body, which the WSGI server iterates by
    *lines*: a compressed or float object has a newline byte every ~256 bytes, so an 880 KB object
    went out as 3,776 HTTP chunks, each a Python round trip on both ends (~13 MB/s on this
    machine), and how fast an object came depended on how many newline bytes it holds. Real LFS
    servers (object stores, CDNs) send large blocks; this makes the test server do the same, for
    every client alike. The status, headers and bytes are unchanged.
    """

    def wrapped(environ, start_response):
        body = app(environ, start_response)
        try:
            pending, held = [], 0
            for piece in body:
                pending.append(piece)
                held += len(piece)
                if held >= size:
                    yield b"".join(pending)
                    pending, held = [], 0
            if pending:
                yield b"".join(pending)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    return wrapped


def _create_path(spath):
    """giftless's LocalStorage._create_path, without its race: two uploads to a new repository
    path at once both saw no folder, and the second mkdir answered the client a 500 (which our
    client retried)."""
    Path(spath).mkdir(parents=True, exist_ok=True)


def main(storage):
    os.environ["GIFTLESS_CONFIG_STR"] = CONFIG % storage
    import waitress
    from giftless.app import init_app
    from giftless.storage.local_storage import LocalStorage

    LocalStorage._create_path = staticmethod(_create_path)

    app = in_blocks(init_app())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    print(sock.getsockname()[1], flush=True)
    waitress.serve(app, sockets=[sock], threads=8, _quiet=True)


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    main(sys.argv[1])
