"""The ``git-theta`` executable: git's filter process goes straight to its server.

git starts ``git-theta filter-process`` for every command that reads or writes a tracked file
(``git status`` included), so its start-up is paid often: it skips loading the command-line layer
(click and every command module, ~50 ms). Everything else goes to :func:`git_theta.cli.main`.
"""

import sys


def single_threaded_blas():
    """One BLAS thread per worker: git-theta parallelises over tensors itself, and a multithreaded
    OpenBLAS inside each worker thread oversubscribes the cores (measured 100x slower QR under
    load). Must run before numpy is imported; a value the user set wins."""
    import os

    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


def main():
    """Entry point of the ``git-theta`` console script."""
    if sys.argv[1:] == ["filter-process"]:
        single_threaded_blas()
        from .filter_process import run
        from .messages import exit_reporting, report

        # run ends the process itself once git closes the pipe; git going away mid-handshake
        # (EOFError) is reported as click reports it on the CLI path.
        exit_reporting(lambda: run(report))
        return
    from .cli import main as cli_main

    cli_main()
