"""Moving objects to and from remotes: Git LFS servers (Batch API, ``basic`` transfers) and
directory remotes (a shared disk). See ``endpoint`` (where), ``batch`` (the HTTP protocol),
``directory`` (the file-system remote) and ``transfer`` (batches, parallelism, progress).
"""
