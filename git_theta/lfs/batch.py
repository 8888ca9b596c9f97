"""The Git LFS Batch API over HTTP(S), ``basic`` transfer adapter.

``POST <endpoint>/objects/batch`` with ``{"operation", "transfers": ["basic"], "objects": [{oid,
size}], "hash_algo": "sha256"}`` answers, per object, the actions to run: ``download`` (GET),
``upload`` (PUT of the raw bytes) and ``verify`` (POST of ``{oid, size}`` after an upload). An
object the server already has comes back without actions. Every request is retried on connection
failures, 429 and 5xx with exponential backoff, honouring ``Retry-After`` (both bounded), and
credentials come only from ``git credential`` when the server answers 401.
"""

import email.utils
import re
import threading
import time
from urllib.parse import urlsplit

from ..errors import RemoteError
from . import credentials

MEDIA_TYPE = "application/vnd.git-lfs+json"
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
MAX_BACKOFF = 10.0  # seconds between two attempts at most, whatever Retry-After says
TIMEOUT = (15, 120)  # (connect, read) seconds
CHUNK = 1 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an HTTP header name (RFC 9110 token)


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
        import requests

        self.url = endpoint.url
        self._cwd = repo.cwd
        self._retries = max(0, settings.get_int("retries"))
        self._session = requests.Session()
        # http.<url>.* applies to this endpoint as git's --get-urlmatch decides (git_theta.settings)
        self._session.verify = settings.ssl_verify(self.url)
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
        """Ask the server about ``refs``; returns the response objects keyed by oid."""
        body = {
            "operation": operation,
            "transfers": ["basic"],
            "objects": [{"oid": r.oid, "size": r.size} for r in refs],
            "hash_algo": "sha256",
        }
        headers = {"Accept": MEDIA_TYPE, "Content-Type": MEDIA_TYPE}
        response = self._request("POST", self.url + "/objects/batch", headers, json=body, endpoint_auth=True)
        try:
            payload = response.json()
            objects = payload.get("objects") or []
        except (ValueError, AttributeError):
            raise RemoteError(f"{self.url}: the batch response is not valid JSON") from None
        transfer = payload.get("transfer", "basic")
        if transfer != "basic":
            raise RemoteError(f"{self.url}: the server chose the unsupported transfer {transfer!r}")
        return {obj.get("oid"): obj for obj in objects if isinstance(obj, dict)}

    # -- actions ----------------------------------------------------------------------------------
    def download(self, action, ref, store):
        """Stream one object into ``store``; size and sha256 are checked before it enters.

        A connection that breaks mid-stream is retried like a failed request (bounded); bytes that
        arrive complete but wrong are not: the server's copy is bad, and asking again won't help.
        """
        import requests

        for attempt in range(self._retries + 1):
            response = self._request("GET", action["href"], action.get("header") or {}, stream=True)
            try:
                store.put_chunks(response.iter_content(CHUNK), expect=ref)
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

        self._request("PUT", action["href"], headers, data=body)

    def verify(self, action, ref):
        headers = {"Accept": MEDIA_TYPE, "Content-Type": MEDIA_TYPE, **(action.get("header") or {})}
        self._request("POST", action["href"], headers, json={"oid": ref.oid, "size": ref.size})

    # -- one HTTP request with retries and credentials --------------------------------------------
    def _request(self, method, url, headers, json=None, data=None, stream=False, endpoint_auth=False):
        import requests

        _check_action(url, headers, self.url)

        attempt = 0
        asked = False
        while True:
            auth = self._auth if (endpoint_auth or _same_host(url, self.url)) and "Authorization" not in headers else None
            body = data() if callable(data) else data
            try:
                response = self._session.request(
                    method, url, headers=headers, json=json, data=body, stream=stream, timeout=TIMEOUT, auth=auth
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
            if response.status_code == 401 and not asked and auth is None and (endpoint_auth or _same_host(url, self.url)):
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
                    f"{method} {_short(url)} failed: HTTP {response.status_code}{': ' + message if message else ''}",
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


def _same_host(a, b):
    return urlsplit(a).netloc == urlsplit(b).netloc


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
    try:
        return str(response.json().get("message", ""))[:200]
    except (ValueError, AttributeError):
        return ""


def _hint(status):
    if status in (401, 403):
        return "check your credentials (git credential) and your access to the repository"
    if status == 404:
        return "check the LFS URL (lfs.url / remote.<name>.lfsurl)"
    if status == 413:
        return "the object is larger than the server accepts; lower theta.maxObjectSize"
    return None
