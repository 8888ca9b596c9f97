"""The LFS client's pure parts and its behaviour against scripted HTTP answers: endpoint derivation
and precedence, .lfsconfig's allow-list, bounded retries, Retry-After, credentials via git."""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from git_theta.errors import RemoteError
from git_theta.remote import endpoint
from git_theta.remote.batch import MAX_BACKOFF, LfsClient, retry_delay
from git_theta.remote.credentials import CredentialError
from git_theta.manifest import ObjectRef
from git_theta.git.repo import Repo
from git_theta.config import Settings, forget

REF = ObjectRef("a" * 64, 3)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("https://git-server.com/foo/bar", "https://git-server.com/foo/bar.git/info/lfs"),
        ("https://git-server.com/foo/bar.git", "https://git-server.com/foo/bar.git/info/lfs"),
        ("https://git-server.com/foo/bar.git/", "https://git-server.com/foo/bar.git/info/lfs"),
        ("http://127.0.0.1:8080/a/b.git", "http://127.0.0.1:8080/a/b.git/info/lfs"),
        ("git@git-server.com:foo/bar.git", "https://git-server.com/foo/bar.git/info/lfs"),
        ("git-server.com:foo/bar", "https://git-server.com/foo/bar.git/info/lfs"),
        ("ssh://git-server.com/foo/bar.git", "https://git-server.com/foo/bar.git/info/lfs"),
        ("ssh://user@git-server.com:2222/foo/bar", "https://git-server.com/foo/bar.git/info/lfs"),
        ("file:///srv/repos/model.git", Path("/srv/repos/model.git")),
        ("/srv/repos/model.git", Path("/srv/repos/model.git")),
        ("../model.git", Path("../model.git")),
    ],
)
def test_endpoint_derived_from_remote_url_like_git_lfs(url, expected):
    assert endpoint.derive(url) == expected


def test_endpoint_precedence_and_lfsconfig_allow_list(repo, monkeypatch):
    monkeypatch.chdir(repo.path)
    monkeypatch.setenv("HOME", repo.env["HOME"])
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    repo.git("remote", "add", "origin", "git@example.com:team/model.git")
    r = Repo(repo.path)
    assert endpoint.resolve(r, "origin").url == "https://example.com/team/model.git/info/lfs"
    (repo.path / ".lfsconfig").write_text(
        "[lfs]\n\turl = https://lfs.example.com/x\n[http]\n\tsslVerify = false\n[credential]\n\thelper = evil\n"
    )
    assert endpoint.resolve(r, "origin").url == "https://lfs.example.com/x"
    with pytest.raises(ValueError):
        endpoint._lfsconfig(r, "credential.helper")  # only lfs.url / remote.*.lfsurl are ever read
    repo.git("config", "remote.origin.lfsurl", "https://per-remote.example.com/y")
    forget()  # git config is read once per process: read it again after changing it
    assert endpoint.resolve(r, "origin").url == "https://per-remote.example.com/y"
    repo.git("config", "lfs.url", "https://global.example.com/z")
    forget()
    assert endpoint.resolve(r, "origin").url == "https://global.example.com/z"
    repo.git("config", "theta.remote.origin.url", str(repo.path.parent / "shared"))
    forget()
    found = endpoint.resolve(r, "origin")
    assert found.kind == "dir" and found.path == repo.path.parent / "shared"


@pytest.mark.parametrize(
    "url, configured, expected",
    [
        ("http://127.0.0.1:8080/a.git/info/lfs", None, 4),  # no special case for this machine
        ("http://127.0.0.1:8080/a.git/info/lfs", "3", 3),  # what the user set wins
        ("https://lfs.example.com/a.git/info/lfs", None, 4),
        ("https://lfs.example.com/a.git/info/lfs", "0", 1),  # at least one
    ],
)
def test_transfers_run_theta_transfers_at_a_time(repo, url, configured, expected):
    from git_theta.remote.transfer import Transfer

    config = [("theta.transfers", configured)] if configured else []
    found = endpoint.Endpoint("origin", "http", url=url)
    with Transfer(Repo(repo.path), found, Settings(config, environ={})) as transfer:
        assert transfer.workers == expected


def test_retry_delay_honours_retry_after_within_bounds():
    assert retry_delay(0, "3") == 3
    assert retry_delay(0, "86400") == MAX_BACKOFF
    assert retry_delay(0, "Wed, 21 Oct 2015 07:28:00 GMT") == 0  # a date in the past
    assert retry_delay(0) < retry_delay(1) < retry_delay(2)
    assert retry_delay(50) == MAX_BACKOFF


class _Script(BaseHTTPRequestHandler):
    """Answers the batch endpoint from a script of (status, headers) tuples; counts requests."""

    script = []
    seen = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append((self.headers.get("Authorization"), body))
        status, headers = self.script.pop(0) if self.script else (200, {})
        payload = b""
        if status == 200:
            objects = json.loads(body)["objects"]
            payload = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        """Serves ``BODY``; the first ``broken`` answers break off before its last byte."""
        type(self).seen.append(("GET", self.path))
        body = type(self).body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:-1] if type(self).broken > 0 else body)
        if type(self).broken > 0:
            type(self).broken -= 1
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted(repo, monkeypatch):
    """(client factory, handler class) for a scripted server on a free port."""
    monkeypatch.setenv("HOME", repo.env["HOME"])
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_TERMINAL_PROMPT", "0")
    handler = type("Handler", (_Script,), {"script": [], "seen": [], "body": b"", "broken": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/team/m.git/info/lfs"

    def client(**settings):
        ep = endpoint.Endpoint("origin", "http", url=url)
        return LfsClient(ep, Repo(repo.path), Settings(overrides=settings, environ={}))

    client.url = url
    yield client, handler
    server.shutdown()
    server.server_close()


def test_retries_are_bounded(scripted):
    client, handler = scripted
    handler.script = [(503, {"Retry-After": "0"})] * 10
    with pytest.raises(RemoteError, match="HTTP 503"):
        client(retries=2).batch("download", [REF])
    assert len(handler.seen) == 3  # the first try and two retries, never more


def test_rate_limit_then_success(scripted):
    client, handler = scripted
    handler.script = [(429, {"Retry-After": "0"})]
    answer = client(retries=3).batch("upload", [REF])
    assert answer[REF.oid]["size"] == 3 and len(handler.seen) == 2


def test_credentials_come_from_git_credential(scripted, repo):
    client, handler = scripted
    handler.script = [(401, {"LFS-Authenticate": 'Basic realm="x"'})]
    with pytest.raises(CredentialError, match="needs credentials"):
        client(retries=0).batch("download", [REF])

    handler.seen.clear()
    handler.script = [(401, {})]
    repo.git("config", "credential.helper", "!f() { echo username=alice; echo password=s3cret; }; f")
    client(retries=0).batch("download", [REF])
    sent = [auth for auth, _ in handler.seen]
    assert sent == [None, "Basic " + base64.b64encode(b"alice:s3cret").decode()]


def test_broken_download_is_retried_and_every_download_verified(scripted, repo, tmp_path):
    from git_theta.errors import ObjectCorruptError
    from git_theta.store.objects import ObjectStore

    client, handler = scripted
    store = ObjectStore(tmp_path / "store", fsync=False)
    handler.body = b"abc"
    ref = ObjectRef(hashlib.sha256(b"abc").hexdigest(), 3)
    action = {"href": client.url + "/obj"}
    handler.broken = 1  # the first answer breaks off mid-stream
    client(retries=2).download(action, ref, store)
    assert store.read(ref.oid, verify=True) == b"abc"
    assert sum(1 for kind, _ in handler.seen if kind == "GET") == 2

    handler.body = b"abd"  # complete but wrong bytes: rejected at once, nothing stored
    wrong = ObjectRef("0" * 64, 3)
    with pytest.raises(ObjectCorruptError, match="arrived corrupt"):
        client(retries=2).download(action, wrong, store)
    assert not store.has(wrong.oid)
    assert sum(1 for kind, _ in handler.seen if kind == "GET") == 3
