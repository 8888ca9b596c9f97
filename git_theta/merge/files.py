"""``git theta merge-files``: merge checkpoint files outside git history.

Each input is read with its format plugin (the same ``split`` the clean filter uses) and stored
tensor by tensor in a temporary object store, so the merge itself is exactly the one the driver
does (:func:`.engine.merge_manifests`), then the result is written with the format's ``join`` (as
smudge does) to a temporary file renamed onto the output. Memory stays near a few tensors.
"""

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..clean import SNIFF_BYTES, detect_format
from ..codec import encode_tensor, tensor_digest
from ..errors import CheckpointError, UsageError
from ..manifest import Manifest
from ..object_store import ObjectStore
from ..peekable import PeekableReader
from .config import build_config
from .engine import check_config, merge_manifests


def ingest(store, path):
    """Read checkpoint ``path`` into ``store``; return its manifest and format plugin."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        reader = PeekableReader(handle)
        fmt = detect_format(None, str(path), reader.peek(SNIFF_BYTES))
        checkpoint = fmt.split(reader, str(path))
        manifest = Manifest(format=fmt.name)
        for tensor in checkpoint.tensors():
            tensor.digest = tensor_digest(tensor.data)
            manifest.tensors[tensor.name] = encode_tensor(store, tensor)
        manifest.fields = dict(checkpoint.fields)
        manifest.blobs = {k: store.put_bytes(v) for k, v in checkpoint.blobs.items()}
    return manifest, fmt


def merge_files(inputs, output, operator, params=None, base=None, every_tensor=False, seed=None, threads=None):
    """Merge checkpoint files ``inputs`` (first = "ours") into ``output``; return the FileMerge.

    Nothing is written when a tensor conflicts (the FileMerge lists the conflicts).
    """
    if len(inputs) < 2 and not every_tensor:
        raise UsageError("merge-files needs at least two checkpoints", hint="list the files to merge")
    from ..settings import Settings

    settings = Settings()
    threads = threads or settings.threads()
    config = build_config([], operator=operator, params=params, seed=seed)
    check_config(config, len(inputs))
    with tempfile.TemporaryDirectory(prefix="theta-merge-files-") as tmp:
        store = ObjectStore(Path(tmp) / "objects", fsync=False)
        sides, formats = [], []
        for path in inputs:
            manifest, fmt = ingest(store, path)
            sides.append(manifest)
            formats.append(fmt)
        base_manifest = ingest(store, base)[0] if base else None
        labels = [os.path.basename(str(p)) for p in inputs]
        result = merge_manifests(
            str(output), base_manifest, sides, labels, config, store, every_tensor=every_tensor, workers=threads,
            budget=settings.get_int("memoryBudget"),
        )
        if result.conflicts:
            return result
        write_checkpoint(result.manifest, formats[0], store, output, threads)
    return result


def write_checkpoint(manifest, fmt, store, output, threads):
    """Write ``manifest``'s checkpoint to ``output`` atomically (temp file + rename)."""
    from ..settings import DEFAULTS
    from ..smudge import StoreTensorSource

    output = Path(output)
    fd, tmp = tempfile.mkstemp(prefix=output.name + ".", suffix=".tmp", dir=output.parent or ".")
    try:
        with os.fdopen(fd, "wb") as out, ThreadPoolExecutor(threads) as pool:
            source = StoreTensorSource(manifest, store, pool, str(output), DEFAULTS["memoryBudget"][0])
            fmt.join(manifest.fields, source, out, str(output))
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
