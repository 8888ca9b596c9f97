"""The Git LFS Batch API over HTTP(S), ``basic`` transfer adapter.

``POST <endpoint>/objects/batch`` with ``{"operation", "transfers": ["basic"], "objects": [{oid,
size}], "hash_algo": "sha256"}`` answers, per object, the actions to run: ``download`` (GET),
``upload`` (PUT of the raw bytes) and ``verify`` (POST of ``{oid, size}`` after an upload). An
object the server already has comes back without actions. Every request is retried on connection
failures, 429 and 5xx with exponential backoff, honouring ``Retry-After`` (both bounded), and
credentials come only from ``git credential`` when the server answers 401.
"""

import email.utils
import json
import re
import threading
import time
from urllib.parse import urlsplit

from git_theta.errors import GitThetaError, ObjectCorruptError, RemoteError
from git_theta.remote import credentials

MEDIA_TYPE = "application/vnd.git-lfs+json"
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
MAX_BACKOFF = 10.0  # seconds between two attempts at most, whatever Retry-After says
TIMEOUT = (15, 120)  # (connect, read) seconds
CHUNK = 1 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What a terminal may act on in server text: C0/C1 controls (ESC starts ANSI sequences), DEL, and
# Unicode format characters (bidirectional overrides can reorder what is shown).
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]+")
# Whole terminal escape sequences (CSI "ESC [ ... m", OSC "ESC ] ... BEL"), removed before the rest.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.")
BATCH_BASE = 1 << 20  # bytes of batch answer allowed whatever the batch size...
BATCH_PER_OBJECT = 64 << 10  # ...plus this much per object asked about (signed URLs, headers)
SERVER_TEXT = 200  # characters of a server's message shown at most
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an HTTP header name (RFC 9110 token)


class MalformedAnswerError(RemoteError):
    """The server answered, but not in the Batch API's shape (or beyond its size bound)."""


def batch_limit(count):
    """Bytes a batch answer about ``count`` objects may take (larger answers are refused)."""
    return BATCH_BASE + BATCH_PER_OBJECT * count


def server_text(value, limit=SERVER_TEXT):
    """Text a server sent, made safe to print: control and format characters become one space,
    it is cut to ``limit`` characters and quoted, so it can neither move the cursor, colour the
    terminal nor start a line of its own (a fake ``hint:``)."""
    text = _UNPRINTABLE.sub(" ", _ESCAPES.sub("", str(value))).strip()
    if len(text) > limit:
        text = text[:limit] + "…"
    return json.dumps(text, ensure_ascii=False)


def retry_delay(attempt, retry_after=None, base=0.25):
    """Seconds to wait before attempt ``attempt + 1``: ``Retry-After`` if given, else exponential."""
    if retry_after:
        retry_after = retry_after.strip()
        if retry_after.isdigit():
            return min(float(retry_after), MAX_BACKOFF)
        parsed = email.utils.parsedate_to_datetime(retry_after) if retry_after else None
        if parsed is not None:
            return max(0.0, min(parsed.timestamp() - time.time(), MAX_BACKOFF))
    return min(base * (2**attempt), MAX_BACKOFF)


class TransferStats:
    """Objects and bytes moved by one command (thread-safe counters)."""

    def __init__(self):
        self.objects = 0
        self.bytes = 0
        self.oids = []
        self._lock = threading.Lock()

    def add(self, ref):
        with self._lock:
            self.objects += 1
            self.bytes += ref.size
            self.oids.append(ref.oid)


class LfsClient:
    """A Batch API client for one endpoint (one ``requests`` session, shared by worker threads)."""

    def __init__(self, endpoint, repo, settings):

        self.url = endpoint.url
        self._cwd = repo.cwd
        self._retries = max(0, settings.get_int("retries"))
        self._session = _session_class()()
        # http.<url>.* applies to this endpoint as git's --get-urlmatch decides (git_theta.config)
        self._session.verify = self._verify = settings.ssl_verify(self.url)
        proxy = settings.proxy(self.url)
        if proxy:
            self._session.proxies = {"http": proxy, "https": proxy}
        self._auth = None
        self._approved = False
        self._auth_lock = threading.Lock()

    def close(self):
        self._session.close()

    # -- the batch request ------------------------------------------------------------------------
    def batch(self, operation, refs):
        """Ask the server about ``refs``; returns the response objects keyed by oid.

        The answer is read up to :func:`batch_limit` bytes; a whole answer that is not a JSON
        object with a list of objects raises MalformedAnswerError. Each object's own shape is
        checked by :func:`object_actions` when it is used, so one malformed object fails alone.
        """
        body = {
            "operation": operation,
            "transfers": ["basic"],
            "objects": [{"oid": r.oid, "size": r.size} for r in refs],
            "hash_algo": "sha256",
        }
        headers = {"Accept": MEDIA_TYPE, "Content-Type": MEDIA_TYPE}
        response = self._request("POST", self.url + "/objects/batch", headers, json=body, endpoint_auth=True)
        try:
            what = f"{self.url}: the batch answer"
            raw = _read_limited(response, batch_limit(len(refs)), what, MalformedAnswerError)
        finally:
            response.close()
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise MalformedAnswerError(f"{self.url}: the batch answer is not valid JSON", hint=_BROKEN) from None
        if not isinstance(payload, dict):
            raise MalformedAnswerError(f"{self.url}: the batch answer is not a JSON object", hint=_BROKEN)
        objects = payload.get("objects")
        if objects is None:
            objects = []
        if not isinstance(objects, list):
            raise MalformedAnswerError(f"{self.url}: the batch answer's 'objects' is not a list", hint=_BROKEN)
        transfer = payload.get("transfer", "basic")
        if transfer != "basic":
            raise MalformedAnswerError(
                f"{self.url}: the server chose the unsupported transfer {server_text(transfer, 40)}", hint=_BROKEN
            )
        return {obj["oid"]: obj for obj in objects if isinstance(obj, dict) and isinstance(obj.get("oid"), str)}

    # -- actions ----------------------------------------------------------------------------------
    def download(self, action, ref, store):
        """Stream one object into ``store``; size and sha256 are checked before it enters.

        A connection that breaks mid-stream is retried like a failed request (bounded); bytes that
        arrive complete but wrong are not: the server's copy is bad, and asking again won't help.
        """
        import requests

        for attempt in range(self._retries + 1):
            response = self._request("GET", action["href"], action.get("header") or {})
            try:
                store.put_chunks(_bounded_body(response, ref, self.url), expect=ref)
                return
            except requests.RequestException as exc:
                if attempt == self._retries:
                    raise RemoteError(
                        f"downloading object {ref.oid} from {self.url} broke off: {_reason(exc)}",
                        hint="try again; check the connection to the server",
                    ) from None
                time.sleep(retry_delay(attempt))
            finally:
                response.close()

    def upload(self, action, ref, path):
        """PUT one object's bytes (streamed from ``path``)."""
        headers = {"Content-Type": "application/octet-stream", **(action.get("header") or {})}
        headers["Content-Length"] = str(ref.size)

        def body():
            return open(path, "rb")

        self._request("PUT", action["href"], headers, data=body).close()

    def verify(self, action, ref):
        headers = {"Accept": MEDIA_TYPE, "Content-Type": MEDIA_TYPE, **(action.get("header") or {})}
        self._request("POST", action["href"], headers, json={"oid": ref.oid, "size": ref.size}).close()

    # -- one HTTP request with retries and credentials --------------------------------------------
    def _request(self, method, url, headers, json=None, data=None, endpoint_auth=False):
        """The response (streamed: the caller reads it within bounds and closes it)."""
        import requests

        _check_action(url, headers, self.url)

        attempt = 0
        asked = False
        while True:
            # git-lfs's rule: the endpoint's credentials only for the endpoint's scheme, host and port
            own = endpoint_auth or same_origin(url, self.url)
            auth = self._auth if own and "Authorization" not in headers else None
            # requests would otherwise add ~/.netrc's login for the host, whatever the scheme
            sent = auth if auth is not None or own else _no_auth
            body = data() if callable(data) else data
            try:
                response = self._session.request(
                    method,
                    url,
                    headers=headers,
                    json=json,
                    data=body,
                    stream=True,
                    timeout=TIMEOUT,
                    auth=sent,
                    # per request: requests lets REQUESTS_CA_BUNDLE override a session's CA bundle
                    # (and even sslVerify=false); git's http.sslCAInfo / sslVerify must win
                    verify=self._verify,
                )
            except requests.RequestException as exc:
                if attempt < self._retries:
                    time.sleep(retry_delay(attempt))
                    attempt += 1
                    continue
                raise RemoteError(
                    f"cannot reach the LFS server {self.url}: {_reason(exc)}",
                    hint="check that the server is up and the URL is right (git theta status shows the endpoint)",
                ) from None
            finally:
                if hasattr(body, "close"):
                    body.close()
            if response.status_code == 401 and not asked and auth is None and own:
                # The server wants credentials: ask git's helpers once, then try again.
                response.close()
                with self._auth_lock:
                    if self._auth is None:
                        self._auth = credentials.fill(self.url, cwd=self._cwd)
                asked = True
                continue
            if response.status_code in RETRY_STATUS and attempt < self._retries:
                delay = retry_delay(attempt, response.headers.get("Retry-After"))
                response.close()
                time.sleep(delay)
                attempt += 1
                continue
            if response.status_code in (401, 403) and auth is not None:
                credentials.reject(self.url, *auth, cwd=self._cwd)
            if response.status_code >= 400:
                message = _server_message(response)
                response.close()
                raise RemoteError(
                    f"{method} {_short(url)} failed: HTTP {response.status_code}"
                    + (f"; the server said {message}" if message else ""),
                    hint=_hint(response.status_code),
                )
            if auth is not None and not self._approved:
                self._approved = True
                credentials.approve(self.url, *auth, cwd=self._cwd)
            return response


def _check_action(url, headers, endpoint_url):
    """Refuse what a server's answer may not make us send: non-http(s) or control-character URLs,
    malformed header names or values (no request smuggling, no local files)."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or _CONTROL.search(url) or parts.scheme not in ("http", "https") or not parts.hostname:
        raise RemoteError(
            f"the LFS server {endpoint_url} answered an unusable URL {url!r}"[:300],
            hint="the server (or something between) is broken or hostile; report it to its admins",
        )
    for key, value in headers.items():
        if not (isinstance(key, str) and isinstance(value, str) and _TOKEN.match(key)) or _CONTROL.search(value):
            raise RemoteError(
                f"the LFS server {endpoint_url} answered an invalid header {key!r}"[:300],
                hint="the server (or something between) is broken or hostile; report it to its admins",
            )


def same_origin(a, b):
    """Same scheme, host and port (an omitted port is the scheme's default): where credentials
    for ``b`` may go. ``http://host`` is not ``https://host``: that would send them in clear text."""
    a, b = urlsplit(a), urlsplit(b)
    try:
        ports = (a.port or _DEFAULT_PORT.get(a.scheme), b.port or _DEFAULT_PORT.get(b.scheme))
    except ValueError:
        return False
    return a.scheme == b.scheme and (a.hostname or "").lower() == (b.hostname or "").lower() and ports[0] == ports[1]


_DEFAULT_PORT = {"http": 80, "https": 443}
_BROKEN = "the server (or something between) is broken or hostile; report it to its admins"


def _no_auth(request):
    """An explicit "no credentials" for requests (None would let it read ~/.netrc)."""
    return request


def _session_class():
    """A requests Session that never follows a redirect from https to http (git-lfs refuses those
    too): the request would go out in clear text, whatever it carries."""
    import requests

    class Session(requests.Session):
        def get_redirect_target(self, response):
            target = super().get_redirect_target(response)
            if target and urlsplit(response.url).scheme == "https":
                scheme = urlsplit(target).scheme
                if scheme and scheme != "https":
                    raise RemoteError(
                        f"{_short(response.url)} redirected to {scheme}://, refusing the insecure redirect",
                        hint=_BROKEN,
                    )
            return target

    return Session


def _read_limited(response, limit, what, error=RemoteError):
    """The body of ``response``, refused (``error``) as soon as it passes ``limit`` bytes."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise error(f"{what} declares {declared} bytes, more than the {limit} allowed", hint=_BROKEN)
    parts, size = [], 0
    for chunk in response.iter_content(64 << 10):
        size += len(chunk)
        if size > limit:
            raise error(f"{what} is larger than the {limit} bytes allowed", hint=_BROKEN)
        parts.append(chunk)
    return b"".join(parts)


def _bounded_body(response, ref, url):
    """The chunks of an object's body, never more than ``ref.size`` bytes in all: a longer body
    (or a larger Content-Length) is refused before its excess is read or written anywhere."""

    def too_long(what):
        return ObjectCorruptError(
            f"object {ref.oid} from {url}: the server sent {what}, expected {ref.size} bytes",
            hint="the copy on the server is damaged, or the server is hostile; report it to its admins",
        )

    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > ref.size:
        raise too_long(f"Content-Length {declared}")
    left = ref.size
    for chunk in response.iter_content(min(CHUNK, max(ref.size, 1 << 16))):
        if len(chunk) > left:
            raise too_long("more bytes")
        left -= len(chunk)
        yield chunk


def object_actions(obj):
    """The checked actions of one object's batch answer: ``{name: {"href", "header"}}``.

    Raises RemoteError for an error the server reported or an answer of the wrong shape (missing
    or non-string ``href``, ``header`` not a string map, ``size`` not an integer, ``actions`` not a
    map, a malformed ``error``), so that object fails alone. ``None`` (no answer) is an error too.
    """
    if obj is None:
        raise RemoteError("the server did not answer for it", hint=_BROKEN)
    error = obj.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise RemoteError("the server answered a malformed error for it", hint=_BROKEN)
        code = error.get("code")
        code = code if isinstance(code, int) and not isinstance(code, bool) else "?"
        message = error.get("message")
        said = f"; the server said {server_text(message)}" if message else ""
        if code == 404 or (code == "?" and not message):
            raise RemoteError(f"not on the remote (server error {code}{said})")
        raise RemoteError(f"server error {code}{said}")
    size = obj.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
        raise RemoteError("the server's answer has a 'size' that is not an integer", hint=_BROKEN)
    actions = obj.get("actions")
    if actions is None:
        return {}
    if not isinstance(actions, dict):
        raise RemoteError("the server's answer has 'actions' that is not a map", hint=_BROKEN)
    checked = {}
    for name in ("download", "upload", "verify"):
        action = actions.get(name)
        if action is None:
            continue
        if not isinstance(action, dict):
            raise RemoteError(f"the server's {name!r} action is not a map", hint=_BROKEN)
        href, header = action.get("href"), action.get("header")
        if not isinstance(href, str):
            what = "has no 'href'" if href is None else "has an 'href' that is not a string"
            raise RemoteError(f"the server's {name!r} action {what}", hint=_BROKEN)
        if header is None:
            header = {}
        if not isinstance(header, dict):
            raise RemoteError(f"the server's {name!r} action has a 'header' that is not a map", hint=_BROKEN)
        checked[name] = {"href": href, "header": header}
    return checked


def _short(url):
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"  # never echo query strings (tokens)


def _reason(exc):
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "certificate verify failed"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


def _server_message(response):
    """The ``message`` of an error answer (read within SERVER_TEXT * 64 bytes), quoted; or ""."""
    try:
        raw = _read_limited(response, SERVER_TEXT * 64, "the error answer")
        message = json.loads(raw).get("message")
    except (GitThetaError, ValueError, AttributeError, UnicodeDecodeError):
        return ""
    return server_text(message) if message else ""


def _hint(status):
    if status in (401, 403):
        return "check your credentials (git credential) and your access to the repository"
    if status == 404:
        return "check the LFS URL (lfs.url / remote.<name>.lfsurl)"
    if status == 413:
        return "the object is larger than the server accepts; lower theta.maxObjectSize"
    return None
