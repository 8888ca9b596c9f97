"""Deterministic crash points for the crash-safety tests; inert unless a test asks for them.

``GIT_THETA_TEST_KILL_AT=N`` makes the process SIGKILL itself at the N-th crash point it passes
(an object's temp file written, an object renamed into place, a tensor handed to git by smudge).
This is the one place that reads that variable: it is a test hook, not a setting, so it does not go
through :mod:`git_theta.config`. A kill from inside is exactly as abrupt as one from outside, and
unlike a timed ``kill`` it lands at the same point on every run.
"""

import os
import signal
import threading

_TARGET = int(os.environ.get("GIT_THETA_TEST_KILL_AT", "0") or 0)
_lock = threading.Lock()
_count = 0


def kill_point():
    """Count a crash point; SIGKILL this process when it is the one the test asked for."""
    global _count
    if not _TARGET:
        return
    with _lock:
        _count += 1
        if _count == _TARGET:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_points(count):
    """Pass ``count`` crash points (a run of tensors handed on at once)."""
    if _TARGET:
        for _ in range(count):
            kill_point()
