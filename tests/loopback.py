"""Scripted HTTP(S) servers on 127.0.0.1 for the hostile-server tests, and the git isolation they
need (HOME, no system config, no prompts). Only loopback addresses; each test stops its server."""

import threading
from contextlib import contextmanager
from http.server import ThreadingHTTPServer


def isolate_git(monkeypatch, home):
    """Run this process's git calls with ``home`` as HOME, no system config and no prompts."""
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_TERMINAL_PROMPT", "0")


@contextmanager
def serving(handler, wrap=None):
    """A ThreadingHTTPServer for ``handler`` on a free loopback port (``wrap``: e.g. TLS on its
    socket); yields the server, shut down on exit."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if wrap is not None:
        httpd.socket = wrap(httpd.socket)
    # a short poll so shutdown() returns at once (the default 0.5 s was most of these tests' time)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
