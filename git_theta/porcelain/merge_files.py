"""``git theta merge-files``: merge checkpoint files outside git history.

Each input is read once with its format plugin (the same ``split`` the clean filter uses) to hash
its tensors; a tensor whose bytes lie contiguous in the file (every safetensors tensor) is not
copied anywhere: the merge reads it back from the input file when it needs it (and checks its
digest then, so a file changed meanwhile is an error, not a wrong merge). Tensors of formats that
do not store raw bytes in place are staged in a temporary object store, as are the merged tensors.
The merge itself is exactly the one the driver does (:func:`.engine.merge_manifests`); the result
is written with the format's ``join`` (as smudge does) to a temporary file renamed onto the output.
Memory stays near a few tensors.

A model may also be a Hugging Face model folder: shards named by a ``*.index.json`` (or one
``model.safetensors``). Its shards are read one after the other into one model whose tensors are
found by name (:func:`load_model`); the output may then be a folder too, written in the reference
model's layout (same shard files, an index json, the folder's config and tokenizer files).
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from git_theta.formats.detect import SNIFF_BYTES, detect_format
from git_theta.updates.chain import encode_tensor, tensor_digest
from git_theta.errors import CheckpointError, UsageError
from git_theta.git.models import (
    ADAPTER_CONFIG,
    INDEX_SUFFIX,
    MAX_SIDECAR,
    ModelError,
    group,
    is_shard,
    parse_index,
    tensors_of,
)
from git_theta.manifest import Manifest
from git_theta.store.objects import ObjectStore
from git_theta.formats.peekable import PeekableReader
from git_theta.merge.config import build_config
from git_theta.merge.engine import check_config, merge_manifests
from git_theta.merge.plan import MERGEABLE_DTYPES


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
        from git_theta.manifest import TensorEntry

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
            raise CheckpointError(
                f"{path}: tensor {entry.name!r} changed while it was being merged",
                hint="leave the input files alone during git theta merge-files, and run it again",
            )
        return data


def _cast(tensor, dtype):
    import numpy as np

    from git_theta.tensors.bits import from_float, to_float
    from git_theta.updates.base import TensorData

    values = to_float(tensor.data, tensor.dtype, tensor.shape, np.float64)
    return TensorData(tensor.name, dtype, tuple(tensor.shape), from_float(values, dtype))


def merge_files(inputs, output, operator, params=None, base=None, every_tensor=False, seed=None, threads=None):
    """Merge checkpoint files ``inputs`` (first = "ours") into ``output``; return the FileMerge.

    One input needs ``base`` (the operator then works on its one task vector, e.g. ``dare_linear``
    sparsifying a fine-tune) and merges every tensor. Nothing is written when a tensor conflicts
    (the FileMerge lists the conflicts). ``result.notes`` holds one-line notes for the user.
    """
    if len(inputs) < 2 and not (every_tensor or base):
        raise UsageError(
            "merge-files needs two checkpoints, or one and --base",
            hint="list the files to merge (or give the base a single fine-tune came from)",
        )
    every_tensor = every_tensor or len(inputs) == 1
    config = build_config([], operator=operator, params=params, seed=seed)
    notes = check_config(config, len(inputs))
    with _staging() as store:
        models = [load_model(store, path) for path in inputs]
        base_model = load_model(store, base) if base else None
        labels = [os.path.basename(str(p).rstrip("/")) for p in inputs]
        result = _merge_and_write(
            output,
            base_model.manifest if base_model else None,
            [m.manifest for m in models],
            labels,
            config,
            store,
            base_model or models[0],
            every_tensor,
            threads,
        )
    result.notes = notes
    return result


def merge_recipe(recipe_path, output, threads=None, resolve=None):
    """Run the mergekit recipe ``recipe_path`` on local checkpoints; write ``output``.

    Model references are files or model folders (:func:`load_model`); ``output`` is a file, or a
    folder written in the layout of the base model (else the first model): :func:`write_output`.
    Every tensor goes through the recipe's method, as in mergekit. Returns the FileMerge, with
    ``notes`` (ignored recipe keys and parameters).
    """
    from git_theta.merge.recipe import RecipeConfig, check, load_recipe, parts, sliced_manifests

    recipe = load_recipe(recipe_path)
    plan = parts(recipe)
    notes = recipe.notes + check(recipe, plan)
    if recipe.out_dtype is not None and recipe.out_dtype != recipe.dtype:
        raise UsageError(
            f"{recipe_path}: out_dtype different from dtype is not supported",
            hint="drop out_dtype, or set dtype to the dtype you want written",
        )
    refs = list(dict.fromkeys(s.model for part in plan for s in part.inputs + ([part.base] if part.base else [])))
    files = {ref: (resolve or checkpoint_path)(ref, recipe_path) for ref in refs}
    with _staging() as store:
        loaded = {ref: load_model(store, files[ref], recipe.dtype) for ref in refs}
        manifests = {ref: m.manifest for ref, m in loaded.items()}
        fmt = loaded[plan[0].inputs[0].model].fmt
        if recipe.slices is None:
            sides = [manifests[s.model] for s in plan[0].inputs]
            base = manifests[plan[0].base.model] if plan[0].base is not None else None
            config = RecipeConfig(recipe, plan)
        else:
            sides, base, layout = sliced_manifests(recipe, plan, manifests, fmt.name)
            config = RecipeConfig(recipe, plan, layout)
        notes += check_config(config, len(sides))
        labels = [s.model for s in plan[0].inputs]
        reference = loaded[plan[0].base.model if plan[0].base is not None else plan[0].inputs[0].model]
        reference = ModelInput(reference.manifest, fmt, reference.shards, reference.folder)
        layers = _output_layers(sides[0]) if recipe.slices is not None else None
        result = _merge_and_write(output, base, sides, labels, config, store, reference, True, threads, layers)
    result.notes = notes
    return result


def checkpoint_path(ref, recipe_path=None):
    """The local path a recipe's model reference names (a file or a folder; nothing is downloaded)."""
    path = Path(ref)
    if path.is_file() or path.is_dir():
        return path
    raise UsageError(
        f"{recipe_path}: model {ref!r} is not a local file or folder",
        hint="git theta merge-files reads local checkpoints only (nothing is downloaded); "
        "use a path, or git theta merge --config with branches",
    )


#: files of a model folder copied beside a merged folder's shards (mergekit copies the base
#: model's config and tokenizer); json files other than index jsons are copied too
TOKENIZER_FILES = ("tokenizer.model", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
#: file names that are checkpoints in a model folder
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".onnx", ".gguf")


@dataclass
class ModelInput:
    """One model read for merge-files: all its tensors by name, its format, its layout.

    ``shards`` lists (file name, tensor names in file order, fields) per checkpoint file; ``folder``
    is the model folder (None for a model named by its file)."""

    manifest: Manifest
    fmt: object
    shards: list = field(default_factory=list)
    folder: Path = None


def load_model(store, path, dtype=None):
    """Read the model ``path`` names: a checkpoint file, a model folder, or a folder's index json.

    A folder's model is found by the rules of :mod:`git_theta.git.models` (an index json's shards,
    else numbered shards, else its one checkpoint file): each shard is read once (:func:`ingest`)
    and its tensors joined by name; the index json is a claim checked against the files' headers.
    """
    path = Path(path)
    if path.is_file() and not path.name.endswith(INDEX_SUFFIX):
        manifest, fmt = ingest(store, path, dtype)
        return ModelInput(manifest, fmt, [(path.name, list(manifest.tensors), dict(manifest.fields))])
    folder = path.parent if path.is_file() else path
    model = _folder_model(folder, path)
    manifests, fmt, shards = {}, None, []
    for name in model.files:
        manifests[name], shard_fmt = ingest(store, folder / name, dtype)
        if len(model.files) > 1 and shard_fmt.name != "safetensors":
            raise CheckpointError(
                f"{folder / name}: sharded {shard_fmt.name} models are not supported by merge-files",
                hint="save the model with safetensors (save_pretrained(safe_serialization=True))",
            )
        fmt = fmt or shard_fmt
        shards.append((name, list(manifests[name].tensors), dict(manifests[name].fields)))
    try:
        found = tensors_of(model, manifests)
    except ModelError as exc:
        raise ModelError(f"{folder}: {exc.message}", hint=exc.hint) from None
    for tensor, (shard, _) in found.items():
        claimed = model.weight_map.get(tensor, shard) if model.index else shard
        if claimed != shard:
            raise ModelError(
                f"{folder / model.index}: tensor {tensor!r} is in {shard}, not in {claimed}",
                hint="save the model again so its index json matches its files",
            )
    missing = sorted(set(model.weight_map) - set(found))
    if missing:
        raise ModelError(
            f"{folder / model.index}: tensor {missing[0]!r} is in no shard ({len(missing)} missing)",
            hint="save the model again so its index json matches its files",
        )
    manifest = Manifest(format=fmt.name)
    manifest.tensors = {name: entry for name, (_, entry) in found.items()}
    first = manifests[model.files[0]]
    manifest.fields = dict(first.fields)
    manifest.blobs = dict(first.blobs) if len(model.files) == 1 else {}
    return ModelInput(manifest, fmt, shards, folder)


def _folder_model(folder, named):
    """The one model of ``folder`` (:func:`git_theta.git.models.group` over its files), or the one
    whose index json ``named`` is; UsageError when there is none or several."""
    try:
        entries = sorted(p.name for p in folder.iterdir() if p.is_file())
    except OSError as exc:
        raise CheckpointError(f"{folder}: cannot list ({exc.strerror})") from None
    checkpoints = [n for n in entries if n.endswith(CHECKPOINT_SUFFIXES) and not n.startswith("adapter_model.")]
    sidecars = {}
    for name in entries:
        if name.endswith(INDEX_SUFFIX):
            if (folder / name).stat().st_size > MAX_SIDECAR:
                raise ModelError(f"{folder / name}: too large for an index json")
            sidecars[name] = (folder / name).read_bytes()
            for shard in sorted(set(parse_index(sidecars[name], folder / name).values())):
                if shard not in entries:  # (group's own message speaks of tracked files)
                    raise ModelError(
                        f"{folder / name}: names shard {shard}, which is not in the folder",
                        hint="copy the missing shard, or save the model again so the index matches its files",
                    )
    try:
        models = group(checkpoints, sidecars, exists=set(entries).__contains__)
    except ModelError as exc:
        raise ModelError(f"{folder}/{exc.message}", hint=exc.hint) from None
    if named.is_file():
        models = [m for m in models if m.index == named.name]
    safetensors = [m for m in models if all(f.endswith(".safetensors") for f in m.files)]
    if len(models) > 1 and len(safetensors) == 1:
        models = safetensors  # as transformers prefers model.safetensors (and training_args.bin is no model)
    indexed = [m for m in models if m.index]
    if len(indexed) == 1 and len(models) > 1 and all(is_shard(f) for m in models if not m.index for f in m.files):
        stray = next(f for m in models if not m.index for f in m.files)
        raise ModelError(
            f"{folder / indexed[0].index}: names no tensor of shard {stray}",
            hint="save the model again so its index json matches its files (or remove the stale shard)",
        )
    if len(models) == 1:
        return models[0]
    if not models and (folder / ADAPTER_CONFIG).is_file():
        raise UsageError(
            f"{named}: holds a PEFT adapter, not a model",
            hint="merge the adapter into its base first (peft's merge_and_unload), then merge that folder",
        )
    if not models:
        raise UsageError(f"{named}: holds no checkpoint file", hint="name a model folder or a checkpoint file")
    raise UsageError(
        f"{named}: holds {len(models)} models ({', '.join(m.name for m in models)})",
        hint="name one of them: its index json or its file",
    )


class _staging:
    """A :class:`StreamedStore` over a temporary object store, removed afterwards."""

    def __enter__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="theta-merge-files-")
        return StreamedStore(ObjectStore(Path(self._tmp.name) / "objects", fsync=False))

    def __exit__(self, *exc):
        self._tmp.cleanup()


def _merge_and_write(output, base, sides, labels, config, store, reference, every_tensor, threads, layers=None):
    from git_theta.config import Settings

    settings = Settings()
    threads = threads or settings.threads()
    result = merge_manifests(
        str(output),
        base,
        sides,
        labels,
        config,
        store,
        every_tensor=every_tensor,
        workers=threads,
        budget=settings.get_int("memoryBudget"),
    )
    if not result.conflicts:
        write_output(result.manifest, reference, store, output, threads, layers)
    return result


def is_folder_output(output, reference):
    """True when ``-o OUTPUT`` names a folder: an existing folder, a path ending in ``/``, or a
    path without a suffix when the reference model is a folder."""
    text = str(output)
    path = Path(output)
    if path.is_dir() or text.endswith(("/", os.sep)):
        return True
    return reference.folder is not None and not path.exists() and not path.suffix


def write_output(manifest, reference, store, output, threads, layers=None):
    """Write the merged ``manifest`` to ``output``: one file, or a model folder laid out like
    ``reference`` (a :class:`ModelInput`); ``layers`` is the layer count of a sliced recipe."""
    if not is_folder_output(output, reference):
        write_checkpoint(manifest, reference.fmt, store, output, threads)
        return
    if reference.fmt.name != "safetensors":
        raise UsageError(
            f"{output}: a merged model folder is written with safetensors, not {reference.fmt.name}",
            hint="name an output file instead (-o merged.safetensors)",
        )
    output = Path(output)
    shards = _shard_plan(manifest, reference)
    index_name = "model.safetensors.index.json"
    if output.is_dir():  # never leave another model's shards beside ours
        ours = {name for name, _, _ in shards} | {index_name}
        stale = sorted(
            p.name
            for p in output.iterdir()
            if p.name not in ours and (p.name.endswith(CHECKPOINT_SUFFIXES) or p.name.endswith(INDEX_SUFFIX))
        )
        if stale:
            raise UsageError(
                f"{output}: already holds other checkpoint files ({stale[0]})",
                hint="write to a new or empty folder, or remove those files",
            )
    output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".theta-merge-", dir=output))
    try:
        weight_map, total = {}, 0
        for name, names, fields in shards:
            part = Manifest(format=manifest.format)
            part.tensors = {n: manifest.tensors[n] for n in names}
            part.fields = dict(fields)
            write_checkpoint(part, reference.fmt, store, tmp / name, threads)
            total += part.logical_size()
            weight_map.update((n, name) for n in names)
        files = [name for name, _, _ in shards]
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / index_name).write_text(json.dumps(index, indent=2) + "\n")
            files.append(index_name)
        files += _copy_sidecars(reference.folder, tmp, layers)
        for name in files:
            os.replace(tmp / name, output / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _shard_plan(manifest, reference):
    """[(file name, tensor names, fields)]: the reference's shards when they hold every merged
    tensor (mergekit keeps no layout; we keep the base's, so tools that compare shards see the
    change file by file), else new shards of at most the reference's largest shard's size."""
    names = list(manifest.tensors)
    placed = {n for _, shard, _ in reference.shards for n in shard}
    kept = [(file, [n for n in shard if n in manifest.tensors], fields) for file, shard, fields in reference.shards]
    if set(names) <= placed and all(shard for _, shard, _ in kept):
        if len(kept) == 1:
            kept = [("model.safetensors", kept[0][1], kept[0][2])]
        return kept
    from git_theta.dtypes import nbytes

    fields = reference.shards[0][2] if reference.shards else {}
    sizes = {n: nbytes(e.dtype, e.shape) for n, e in reference.manifest.tensors.items()}
    limit = max(sum(sizes[n] for n in shard) for _, shard, _ in reference.shards)
    groups, size = [[]], 0
    for name in names:
        entry = manifest.tensors[name]
        n = nbytes(entry.dtype, entry.shape)
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    if len(groups) == 1:
        return [("model.safetensors", groups[0], fields)]
    return [(f"model-{k:05d}-of-{len(groups):05d}.safetensors", g, fields) for k, g in enumerate(groups, 1)]


def _copy_sidecars(folder, into, layers):
    """Copy the reference folder's config, generation config and tokenizer files into ``into``;
    return their names. With ``layers`` (a sliced recipe) config.json's ``num_hidden_layers`` is
    set to the stacked layer count, as mergekit does."""
    if folder is None:
        return []
    copied = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if not path.is_file() or name.endswith(INDEX_SUFFIX) or name == ADAPTER_CONFIG:
            continue
        if not (name.endswith(".json") or name in TOKENIZER_FILES):
            continue
        if name == "config.json" and layers is not None:
            try:
                config = json.loads(path.read_bytes())
            except (ValueError, RecursionError):
                config = None
            if isinstance(config, dict) and "num_hidden_layers" in config:
                config["num_hidden_layers"] = layers
                (into / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                copied.append(name)
                continue
        shutil.copyfile(path, into / name)
        copied.append(name)
    return copied


def _output_layers(manifest):
    """The number of layers of a (sliced) merged manifest: one more than its highest layer index."""
    from git_theta.merge.params import layer_index

    found = [layer_index(n) for n in manifest.tensors]
    found = [i for i in found if i is not None]
    return max(found) + 1 if found else None


def write_checkpoint(manifest, fmt, store, output, threads):
    """Write ``manifest``'s checkpoint to ``output`` atomically (temp file + rename)."""
    from git_theta.config import DEFAULTS
    from git_theta.filter.smudge import StoreTensorSource

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
