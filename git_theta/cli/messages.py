"""How errors reach the user: ``error:`` and ``hint:`` lines on stderr, tracebacks in a log file."""

import sys

from git_theta.errors import GitThetaError


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
    from git_theta.cli.logs import write_crash_log

    log = write_crash_log(exc)
    where = f" ({path})" if path else ""
    print(f"error: internal error{where}: {type(exc).__name__}: {exc}", file=stream)
    if log:
        print(f"hint: the traceback is in {log}; please include it in a bug report", file=stream)
    stream.flush()


def exit_reporting(call, aborts=(EOFError, KeyboardInterrupt)):
    """Return ``call()``; what escapes it becomes git-style lines and the process's exit code.

    For the executable's entry points only (the CLI and git's filter process): ``aborts`` (the
    user or git going away) exit 130, GitThetaError its own code, a closed pipe 141, anything else
    70 with a crash log.
    """
    try:
        return call()
    except aborts:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except GitThetaError as exc:
        report(exc)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(141)
    except Exception as exc:  # noqa: BLE001 - last resort: log the traceback, say where it is
        report(exc)
        sys.exit(70)
