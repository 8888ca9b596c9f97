"""The ``git-theta`` executable: git's filter process goes straight to its server.

git starts ``git-theta filter-process`` for every command that reads or writes a tracked file
(``git status`` included), so its start-up is paid often: it skips loading the command-line layer
(click and every command module, ~50 ms). Everything else goes to :func:`git_theta.cli.main.main`.
"""

import sys


def single_threaded_blas():
    """One BLAS thread per worker: git-theta parallelises over tensors itself, and a multithreaded
    OpenBLAS inside each worker thread oversubscribes the cores (measured 100x slower QR under
    load); and no huge-page requests from numpy. Must run before numpy is imported; a value the
    user set wins."""
    import os

    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    # numpy asks for transparent huge pages on arrays from 4 MiB (the 8 MiB byte-plane chunks of
    # clean); where the kernel honours that with direct compaction, a chunk's allocation can stall
    # for milliseconds in the kernel (measured adding a 475 MB model: 1.55-1.57 s without, 1.55-1.86 s with).
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")


#: glibc's mallopt parameters: the size from which blocks are mapped, and the free memory at the
#: top of the heap that is returned to the system
_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD = -3, -1


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for the next allocation instead of returning it.

    Decoding allocates and frees temporaries of a few MiB per block of every tensor (positions,
    products, numpy intermediates); by default glibc maps each one afresh and unmaps it when
    freed, and every fresh page costs a page fault, expensive on a virtual machine. Keeping them
    (up to 32 MiB blocks, glibc's limit) measured 137k -> 82k page faults and ~0.1 s less system
    time when checking out a merged-LoRA version of a 475 MB model. A no-op elsewhere than glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter is linked with
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def main():
    """Entry point of the ``git-theta`` console script."""
    keep_freed_memory()
    if sys.argv[1:] == ["filter-process"]:
        single_threaded_blas()
        from git_theta.filter.process import run
        from git_theta.cli.messages import exit_reporting, report

        # run ends the process itself once git closes the pipe; git going away mid-handshake
        # (EOFError) is reported as click reports it on the CLI path.
        exit_reporting(lambda: run(report))
        return
    from git_theta.cli.main import main as cli_main

    cli_main()
