"""How errors reach the user: ``error:`` and ``hint:`` lines on stderr, tracebacks in a log file."""

import sys

from .errors import GitThetaError


def report(exc, path=None, stream=None):
    """Print ``exc`` the git way. Unexpected exceptions get a crash log whose path is printed."""
    stream = stream or sys.stderr
    if isinstance(exc, GitThetaError):
        message = exc.message
        if path and path not in message:
            message = f"{path}: {message}"
        print(f"error: {message}", file=stream)
        if exc.hint:
            print(f"hint: {exc.hint}", file=stream)
        return
    from .logs import write_crash_log

    log = write_crash_log(exc)
    where = f" ({path})" if path else ""
    print(f"error: internal error{where}: {type(exc).__name__}: {exc}", file=stream)
    if log:
        print(f"hint: the traceback is in {log}; please include it in a bug report", file=stream)
    stream.flush()
