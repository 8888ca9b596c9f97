"""A hostile or broken LFS server: wrong bytes, bad URLs, redirects to other hosts.

Every case ends in a GitThetaError and an object store with nothing new in it (no object under a
real id, no temp file), and credentials for the LFS host never reach another host.
"""

import base64
import hashlib
import subprocess
from http.server import BaseHTTPRequestHandler

import pytest
from loopback import isolate_git, serving

from git_theta.errors import GitThetaError
from git_theta.remote import endpoint
from git_theta.remote.batch import LfsClient
from git_theta.manifest import ObjectRef
from git_theta.store.objects import ObjectStore
from git_theta.git.repo import Repo
from git_theta.config import Settings

DATA = b"the real object bytes"
REF = ObjectRef(hashlib.sha256(DATA).hexdigest(), len(DATA))


class _Objects(BaseHTTPRequestHandler):
    """GET /obj -> ``body``; GET /hop -> a redirect to ``target``; records request headers."""

    body = DATA
    target = ""
    seen = []

    def do_GET(self):
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", self.target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(client, handler, port, store) against a local object server."""
    isolate_git(monkeypatch, tmp_path)
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    handler = type("Handler", (_Objects,), {"seen": []})
    with serving(handler) as httpd:
        port = httpd.server_address[1]
        url = f"http://127.0.0.1:{port}/team/m.git/info/lfs"
        client = LfsClient(
            endpoint.Endpoint("origin", "http", url=url),
            Repo(tmp_path / "repo"),
            Settings(overrides={"retries": 0}, environ={}),
        )
        store = ObjectStore(tmp_path / "objects", fsync=False)
        yield client, handler, port, store


def _nothing_stored(store):
    return not any(p.is_file() for p in store.root.rglob("*"))


@pytest.mark.parametrize("body", [b"the real object bytez", b"short", DATA + b"and more", b""])
def test_wrong_bytes_never_enter_the_store(server, body):
    client, handler, port, store = server
    handler.body = body
    with pytest.raises(GitThetaError) as info:
        client.download({"href": f"http://127.0.0.1:{port}/obj"}, REF, store)
    assert REF.oid in info.value.message
    assert _nothing_stored(store)


@pytest.mark.parametrize(
    "href",
    [
        "http://127.0.0.1:{port}/obj\r\nX-Injected: 1",
        "http://127.0.0.1:{port}/o\x00bj",
        "file:///etc/passwd",
        "ftp://127.0.0.1:{port}/obj",
        "/relative/obj",
    ],
)
def test_bad_action_urls_are_refused(server, href):
    client, handler, port, store = server
    with pytest.raises(GitThetaError):
        client.download({"href": href.format(port=port)}, REF, store)
    assert _nothing_stored(store)
    assert all("X-Injected" not in path for path, _ in handler.seen)


@pytest.mark.parametrize("header", [{"X-Evil": "a\r\nInjected: 1"}, {"Bad Name": "x"}])
def test_bad_action_headers_are_refused(server, header):
    client, handler, port, store = server
    with pytest.raises(GitThetaError):
        client.download({"href": f"http://127.0.0.1:{port}/obj", "header": header}, REF, store)
    assert _nothing_stored(store)


def test_redirect_to_another_host_gets_no_credentials(server):
    client, handler, port, store = server
    client._auth = ("alice", "s3cret")  # as if git credential had answered for the LFS host
    handler.target = f"http://localhost:{port}/obj"  # same server, another host name
    client.download({"href": f"http://127.0.0.1:{port}/hop"}, REF, store)
    assert store.read(REF.oid, verify=True) == DATA  # verified like any download
    sent = dict(handler.seen)
    assert sent["/hop"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert sent["/obj"] is None  # the other host never sees the LFS host's credentials
