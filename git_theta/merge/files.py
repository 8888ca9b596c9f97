"""``git theta merge-files``: merge checkpoint files outside git history.

Each input is read once with its format plugin (the same ``split`` the clean filter uses) to hash
its tensors; a tensor whose bytes lie contiguous in the file (every safetensors tensor) is not
copied anywhere: the merge reads it back from the input file when it needs it (and checks its
digest then, so a file changed meanwhile is an error, not a wrong merge). Tensors of formats that
do not store raw bytes in place are staged in a temporary object store, as are the merged tensors.
The merge itself is exactly the one the driver does (:func:`.engine.merge_manifests`); the result
is written with the format's ``join`` (as smudge does) to a temporary file renamed onto the output.
Memory stays near a few tensors.
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
from .plan import MERGEABLE_DTYPES


def ingest(store, path, dtype=None):
    """Read checkpoint ``path``; return its manifest and format plugin.

    Tensors found in place in the file are registered with ``store`` (a :class:`StreamedStore`)
    to be read from the file later; the others are stored in it. ``dtype`` (a recipe's ``dtype:``)
    casts every floating tensor to that dtype first, as mergekit casts its inputs before merging
    (cast tensors are stored: they are not in the file).
    """
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        reader = _Counting(PeekableReader(handle))
        fmt = detect_format(None, str(path), reader.peek(SNIFF_BYTES))
        checkpoint = fmt.split(reader, str(path))
        manifest = Manifest(format=fmt.name)
        for tensor in checkpoint.tensors():
            cast = dtype is not None and tensor.dtype != dtype and tensor.dtype in MERGEABLE_DTYPES
            if cast:
                tensor = _cast(tensor, dtype)
            tensor.digest = tensor_digest(tensor.data)
            entry = None if cast else store.in_place(path, handle, reader.offset, tensor)
            manifest.tensors[tensor.name] = entry or encode_tensor(store, tensor)
        manifest.fields = dict(checkpoint.fields)
        manifest.blobs = {k: store.put_bytes(v) for k, v in checkpoint.blobs.items()}
    return manifest, fmt


class _Counting:
    """A reader that counts the bytes its user consumed (the offset in the file after a tensor)."""

    def __init__(self, inner):
        self.inner = inner
        self.offset = 0

    def peek(self, n):
        return self.inner.peek(n)

    def read(self, n=-1):
        data = self.inner.read(n)
        self.offset += len(data)
        return data

    def readinto(self, buf):
        n = self.inner.readinto(buf)
        self.offset += n or 0
        return n

    def readable(self):
        return True

    def __getattr__(self, name):  # anything else a format uses (offsets are then only claims,
        return getattr(self.inner, name)  # checked against the file by StreamedStore.in_place)


class StreamedStore:
    """An object store for merge-files whose input tensors stay in their files.

    Everything an ObjectStore does goes to the temporary store ``inner``; :meth:`in_place` registers
    a tensor whose bytes are the file's bytes at a known offset, and :meth:`read_tensor` reads it
    back (the engine's loader and the writer ask it before decoding from the store).
    """

    def __init__(self, inner):
        self.inner = inner
        self._places = {}  # digest -> (path, offset, size)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def in_place(self, path, handle, end, tensor):
        """A TensorEntry with no objects for ``tensor`` when its bytes are ``path``'s bytes just
        before offset ``end``; None when they are not (then the caller stores the tensor)."""
        from ..manifest import TensorEntry

        data = memoryview(tensor.data).cast("B")
        begin = end - data.nbytes
        if begin < 0:
            return None
        if os.pread(handle.fileno(), data.nbytes, begin) != data:
            return None  # compressed, converted or not contiguous in the file: stage it
        self._places.setdefault(tensor.digest, (str(path), begin, data.nbytes))
        return TensorEntry(tensor.name, tensor.dtype, tuple(tensor.shape), tensor.digest, "dense", ())

    def read_tensor(self, entry):
        """The bytes of ``entry`` read from its input file, or None when it is not in a file."""
        place = self._places.get(entry.digest) if not entry.objects else None
        if place is None:
            return None
        path, begin, size = place
        with open(path, "rb") as handle:
            data = os.pread(handle.fileno(), size, begin)
        if len(data) != size or tensor_digest(data) != entry.digest:
            raise CheckpointError(f"{path}: tensor {entry.name!r} changed while it was being merged",
                                  hint="leave the input files alone during git theta merge-files, and run it again")
        return data


def _cast(tensor, dtype):
    import numpy as np

    from ..bits import from_float, to_float
    from ..updates.base import TensorData

    values = to_float(tensor.data, tensor.dtype, tensor.shape, np.float64)
    return TensorData(tensor.name, dtype, tuple(tensor.shape), from_float(values, dtype))


def merge_files(inputs, output, operator, params=None, base=None, every_tensor=False, seed=None, threads=None):
    """Merge checkpoint files ``inputs`` (first = "ours") into ``output``; return the FileMerge.

    One input needs ``base`` (the operator then works on its one task vector, e.g. ``dare_linear``
    sparsifying a fine-tune) and merges every tensor. Nothing is written when a tensor conflicts
    (the FileMerge lists the conflicts). ``result.notes`` holds one-line notes for the user.
    """
    if len(inputs) < 2 and not (every_tensor or base):
        raise UsageError("merge-files needs two checkpoints, or one and --base",
                         hint="list the files to merge (or give the base a single fine-tune came from)")
    every_tensor = every_tensor or len(inputs) == 1
    config = build_config([], operator=operator, params=params, seed=seed)
    notes = check_config(config, len(inputs))
    with _staging() as store:
        sides, formats = [], []
        for path in inputs:
            manifest, fmt = ingest(store, path)
            sides.append(manifest)
            formats.append(fmt)
        base_manifest = ingest(store, base)[0] if base else None
        labels = [os.path.basename(str(p)) for p in inputs]
        result = _merge_and_write(output, base_manifest, sides, labels, config, store, formats[0], every_tensor, threads)
    result.notes = notes
    return result


def merge_recipe(recipe_path, output, threads=None, resolve=None):
    """Run the mergekit recipe ``recipe_path`` on local checkpoints; write ``output``.

    Model references are files, or folders holding one checkpoint file (:func:`checkpoint_file`).
    Every tensor goes through the recipe's method, as in mergekit. Returns the FileMerge, with
    ``notes`` (ignored recipe keys and parameters).
    """
    from .recipe import RecipeConfig, check, load_recipe, parts, sliced_manifests

    recipe = load_recipe(recipe_path)
    plan = parts(recipe)
    notes = recipe.notes + check(recipe, plan)
    if recipe.out_dtype is not None and recipe.out_dtype != recipe.dtype:
        raise UsageError(f"{recipe_path}: out_dtype different from dtype is not supported",
                         hint="drop out_dtype, or set dtype to the dtype you want written")
    refs = list(dict.fromkeys(s.model for part in plan for s in part.inputs + ([part.base] if part.base else [])))
    files = {ref: (resolve or checkpoint_file)(ref, recipe_path) for ref in refs}
    with _staging() as store:
        manifests, formats = {}, {}
        for ref in refs:
            manifests[ref], formats[ref] = ingest(store, files[ref], recipe.dtype)
        fmt = formats[plan[0].inputs[0].model]
        if recipe.slices is None:
            sides = [manifests[s.model] for s in plan[0].inputs]
            base = manifests[plan[0].base.model] if plan[0].base is not None else None
            config = RecipeConfig(recipe, plan)
        else:
            sides, base, layout = sliced_manifests(recipe, plan, manifests, fmt.name)
            config = RecipeConfig(recipe, plan, layout)
        notes += check_config(config, len(sides))
        labels = [s.model for s in plan[0].inputs]
        result = _merge_and_write(output, base, sides, labels, config, store, fmt, True, threads)
    result.notes = notes
    return result


def checkpoint_file(ref, recipe_path=None):
    """The checkpoint a recipe's model reference names: a file, or a folder holding one checkpoint
    (``model.safetensors``, else its only ``*.safetensors``, else ``pytorch_model.bin``)."""
    path = Path(ref)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UsageError(f"{recipe_path}: {ref} holds {len(found)} safetensors files (a sharded checkpoint?)",
                             hint="merge a single-file checkpoint: name the file as the model")
        if (path / "pytorch_model.bin").is_file():
            return path / "pytorch_model.bin"
        raise UsageError(f"{recipe_path}: {ref} holds no checkpoint file", hint="name the checkpoint file itself")
    raise UsageError(f"{recipe_path}: model {ref!r} is not a local file or folder",
                     hint="git theta merge-files reads local checkpoints only (nothing is downloaded); "
                     "use a path, or git theta merge --config with branches")


class _staging:
    """A :class:`StreamedStore` over a temporary object store, removed afterwards."""

    def __enter__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="theta-merge-files-")
        return StreamedStore(ObjectStore(Path(self._tmp.name) / "objects", fsync=False))

    def __exit__(self, *exc):
        self._tmp.cleanup()


def _merge_and_write(output, base, sides, labels, config, store, fmt, every_tensor, threads):
    from ..settings import Settings

    settings = Settings()
    threads = threads or settings.threads()
    result = merge_manifests(
        str(output), base, sides, labels, config, store, every_tensor=every_tensor, workers=threads,
        budget=settings.get_int("memoryBudget"),
    )
    if not result.conflicts:
        write_checkpoint(result.manifest, fmt, store, output, threads)
    return result


def write_checkpoint(manifest, fmt, store, output, threads):
    """Write ``manifest``'s checkpoint to ``output`` atomically (temp file + rename)."""
    from ..settings import DEFAULTS
    from ..smudge import StoreTensorSource

    class _Source(StoreTensorSource):
        """Tensors taken from an input file are read from it, the others decoded from the store."""

        def _decode(self, entry):
            data = getattr(self._store, "read_tensor", lambda e: None)(entry)
            return data if data is not None else super()._decode(entry)

    output = Path(output)
    fd, tmp = tempfile.mkstemp(prefix=output.name + ".", suffix=".tmp", dir=output.parent or ".")
    try:
        with os.fdopen(fd, "wb") as out, ThreadPoolExecutor(threads) as pool:
            source = _Source(manifest, store, pool, str(output), DEFAULTS["memoryBudget"][0])
            fmt.join(manifest.fields, source, out, str(output))
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
