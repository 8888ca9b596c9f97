"""Writes the traceback of an unexpected failure to ``<git dir>/theta/logs`` and returns its path."""

import datetime
import os
import subprocess
import tempfile
import traceback
from pathlib import Path


def write_crash_log(exc):
    """Save ``exc``'s traceback; return the log's path (in the repository if there is one)."""
    proc = subprocess.run(["git", "rev-parse", "--git-common-dir"], capture_output=True)
    if proc.returncode == 0:
        folder = Path(proc.stdout.decode().strip()).resolve() / "theta" / "logs"
    else:
        folder = Path(tempfile.gettempdir()) / "git-theta-logs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
        path = folder / f"{stamp}-{os.getpid()}.log"
        path.write_text("".join(traceback.format_exception(exc)))
        return path
    except OSError:
        return None
