"""PyTorch checkpoints (``torch.save``): nested containers of tensors plus plain Python leaves.

Clean spools git's stream to a temporary file (a zip needs seeking) and loads it with
``torch.load(weights_only=True, mmap=True)``: only tensors and plain data are ever unpickled, a pickle
that names any other global is refused (:class:`UnsafeCheckpointError`) and nothing in it runs.
There is no fallback. Tensors are yielded one by one as raw little-endian bytes, read from the
spooled file (:class:`StorageFile`) rather than through torch's mapping; everything else becomes
the *structure*, canonical JSON kept in the manifest field ``structure`` (or, when long, the blob
``structure``) where each tensor is a placeholder naming its manifest entry. Storage sharing is kept: when several tensors share one storage and one of them is
the whole storage (tied weights, ``x`` and ``x.T``), that one is stored and the others are recorded
as views of it (shape, stride, offset) and rebuilt on the same storage at checkout; when none is
(slices of a fused weight) the storage is stored once under ``<first view>%storage``. A tensor
alone on a larger storage, or non-contiguous, is stored as its values. Checkout rebuilds the object
and writes it with ``torch.save``, which gives the same bytes for the same manifest, so
``git status`` stays clean.

Structure JSON: ``null``, booleans, integers, finite floats, strings and lists are themselves; a dict
whose keys are all strings is a JSON object (a key starting with ``$`` gets one more ``$``); every
other node is an object with a ``"$"`` tag: ``tensor`` / ``view`` (tensors), ``dict`` / ``odict``
(``items`` as ``[key, value]`` pairs, ``odict`` also ``attrs`` such as a state dict's ``_metadata``),
``tuple``, ``set``, ``size``, ``float`` (non-finite, as its IEEE bits), ``complex``,
``bytes``, ``dtype`` and ``device``.

Tensor names are the dotted paths of the leaves (``state_dict.layer.weight``,
``optimizer.state.0.exp_avg``); ``%`` in a key is written ``%25``. When two paths would give the
same name (a key ``"a.b"`` next to ``{"a": {"b": ...}}``, or the key ``"0"`` next to ``0``), those
tensors get fully escaped names instead: ``.`` inside a key is ``%2E``, a non-string key is ``%23``
followed by its text, an empty key is ``%00``. The structure maps every placeholder to its name, so
names only need to be unique.
"""

import math
import struct
import sys
import warnings

from git_theta.errors import CheckpointError, ManifestError, UnsafeCheckpointError
from git_theta.updates.base import TensorData
from git_theta.formats.base import CheckpointFormat, CheckpointReader, dump_json, get_json, put_json
from git_theta.formats.spool import WriteOnly, spooled

ZIP_MAGIC = b"PK\x03\x04"
# Legacy (pre-1.6) torch.save files are a pickle stream starting with this magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02"
ALIGN = 64

# torch dtype attribute -> the shared dtype vocabulary (git_theta.dtypes).
_DTYPE_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0",
    "complex64": "C64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def import_torch(path):
    """The torch module, or a CheckpointError saying how to install it."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: PyTorch checkpoints need PyTorch, which is not installed",
            hint="pip install torch (on a CPU-only machine: pip install torch==2.13.0 first)",
        ) from None
    return torch


# -- names ------------------------------------------------------------------------------------------
def _component(key, strict):
    """One path component of a tensor name (see the module docstring)."""
    if isinstance(key, str):
        text = key.replace("%", "%25")
        if strict:
            text = text.replace(".", "%2E") or "%00"
        return text
    text = str(key).replace("%", "%25")
    return "%23" + text.replace(".", "%2E") if strict else text


def tensor_names(paths):
    """Unique manifest names for leaf ``paths`` (tuples of keys), in the same order."""
    names = [".".join(_component(k, False) for k in p) if p else "tensor" for p in paths]
    seen = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return [".".join(_component(k, True) for k in p) if (seen[n] > 1 or n == "") else n for n, p in zip(names, paths)]


# -- clean: object -> structure + tensors -------------------------------------------------------------
def _float_node(value):
    if math.isfinite(value):
        return value
    return {"$": "float", "bits": struct.pack(">d", value).hex()}


class _Encoder:
    """Turns a loaded checkpoint into structure JSON, collecting the tensor leaves."""

    def __init__(self, torch, path):
        self.torch = torch
        self.path = path
        self.leaves = []  # (path tuple, tensor, placeholder node)

    def encode(self, obj, where=()):
        torch = self.torch
        if isinstance(obj, torch.Tensor):
            node = {"$": "tensor"}
            self.leaves.append((where, obj, node))
            return node
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return _float_node(float(obj))
        kind = type(obj)
        if kind is list:
            return [self.encode(v, where + (i,)) for i, v in enumerate(obj)]
        if kind is torch.Size:
            return {"$": "size", "items": [int(d) for d in obj]}
        if kind is tuple:
            return {"$": "tuple", "items": [self.encode(v, where + (i,)) for i, v in enumerate(obj)]}
        if kind is dict or self._is_odict(obj):
            return self._mapping(obj, where)
        if kind is set:
            items = [self._key(v, where) for v in obj]
            items.sort(key=dump_json)  # a set has no order: make one
            return {"$": "set", "items": items}
        if kind is complex:
            return {"$": "complex", "re": _float_node(obj.real), "im": _float_node(obj.imag)}
        if kind in (bytes, bytearray):
            return {"$": "bytes", "hex": bytes(obj).hex()}
        if kind is torch.dtype:
            return {"$": "dtype", "name": str(obj).replace("torch.", "")}
        if kind is torch.device:
            return {"$": "device", "name": str(obj)}
        raise CheckpointError(
            f"{self.path}: cannot keep a {kind.__module__}.{kind.__qualname__} at {_show(where)}",
            hint="git-theta keeps what torch.load(weights_only=True) allows: tensors, dicts, "
            "lists, tuples, sets, numbers, strings, bytes, torch.Size/dtype/device; "
            "save other objects separately",
        )

    @staticmethod
    def _is_odict(obj):
        from collections import OrderedDict

        return type(obj) is OrderedDict

    def _key(self, key, where):
        if isinstance(key, self.torch.Tensor):
            raise CheckpointError(f"{self.path}: a tensor used as a dict key or set item at {_show(where)}")
        return self.encode(key, where)

    def _mapping(self, obj, where):
        ordered = self._is_odict(obj)
        attrs = dict(vars(obj)) if ordered else {}
        if not ordered and all(isinstance(k, str) for k in obj):
            return {("$" + k if k.startswith("$") else k): self.encode(v, where + (k,)) for k, v in obj.items()}
        node = {
            "$": "odict" if ordered else "dict",
            "items": [[self._key(k, where), self.encode(v, where + (k,))] for k, v in obj.items()],
        }
        if attrs:
            node["attrs"] = self.encode(attrs, where + ("@attrs",))
        return node


def _show(where):
    return "/".join(str(k) for k in where) or "the top level"


def _covers_storage(t):
    """True when ``t`` is exactly its whole storage, in order (it can own views of it)."""
    return (
        t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == t.untyped_storage().nbytes()
    )


#: Suffix of the name under which a storage no single tensor covers is stored (never a real name:
#: "%" in real names is always followed by two hex digits).
STORAGE_SUFFIX = "%storage"


def plan_tensors(encoder):
    """Fill the placeholders; return [(name, tensor)] to store, in structure order.

    Tensors sharing one storage become views of the tensor that covers it (tied weights, ``x.T``).
    When none covers it (``q``, ``k`` sliced from a fused weight) the storage itself is stored
    once, as a 1-D tensor named after the first view plus ``%storage``, and every view is rebuilt
    on it. Tensors viewing a storage as another dtype are stored as their values.
    """
    leaves = encoder.leaves
    names = tensor_names([where for where, _, _ in leaves])
    groups = {}
    for index, (_, t, _) in enumerate(leaves):
        storage = t.untyped_storage()
        if storage.nbytes() > 0:
            groups.setdefault((storage.data_ptr(), storage.nbytes()), []).append(index)
    base_of = {}  # leaf index -> name of the stored tensor it is a view of
    storages = []  # (name, tensor) whole storages stored for views without an owner
    for (_, nbytes), members in groups.items():
        if len(members) < 2:
            continue
        owners = [i for i in members if _covers_storage(leaves[i][1])]
        first = leaves[members[0]][1]
        if owners:
            base, dtype, skip = names[owners[0]], leaves[owners[0]][1].dtype, owners[0]
        elif nbytes % first.element_size() == 0:
            base, dtype, skip = names[members[0]] + STORAGE_SUFFIX, first.dtype, None
            storages.append((base, first.detach().as_strided((nbytes // first.element_size(),), (1,), 0)))
        else:
            continue
        for i in members:
            if i != skip and leaves[i][1].dtype == dtype:
                base_of[i] = base
    out = []
    for index, (_, t, node) in enumerate(leaves):
        if index in base_of:
            node.update(
                {
                    "$": "view",
                    "of": base_of[index],
                    "shape": list(t.shape),
                    "stride": list(t.stride()),
                    "offset": t.storage_offset(),
                }
            )
        else:
            node["name"] = names[index]
            out.append((names[index], t))
        if isinstance(t, encoder.torch.nn.Parameter):
            node["param"] = True
            if not t.requires_grad:
                node["requires_grad"] = False
        elif t.requires_grad:
            node["requires_grad"] = True
    # A storage whose views all have another dtype is not needed after all.
    used = set(base_of.values())
    return out + [(name, t) for name, t in storages if name in used]


class StorageFile:
    """Reads memory-mapped tensors' bytes from the spooled file with ``pread``.

    ``torch.load(mmap=True)`` maps the whole file, and every page read through the mapping counts
    as the process's memory until all of it is unmapped: reading tensors through it would grow the
    resident size to the file size. Reading the same bytes from the file keeps memory near the
    tensors in flight. Each storage's file offset is its address minus the mapping's base, found
    from the zip's member offsets and checked for every storage; when anything does not match,
    :meth:`read` returns None and the caller reads through the mapping.
    """

    def __init__(self, tmp, tensors):
        self._fd = tmp.fileno()
        self._base = self._locate(tmp.name, [t.untyped_storage() for t in tensors])

    def _locate(self, name, storages):
        import os
        import zipfile

        spans = {}
        try:
            with zipfile.ZipFile(name) as archive:
                for info in archive.infolist():
                    # torch.save keeps each storage, uncompressed, as <archive>/data/<key>.
                    if "/data/" not in info.filename or info.compress_type != zipfile.ZIP_STORED:
                        continue
                    if not info.file_size:  # empty storages have no address to match
                        continue
                    header = os.pread(self._fd, 30, info.header_offset)
                    if len(header) < 30 or not header.startswith(ZIP_MAGIC):
                        return None
                    name_len, extra_len = struct.unpack("<HH", header[26:30])
                    spans[info.header_offset + 30 + name_len + extra_len] = info.file_size
        except (zipfile.BadZipFile, OSError, ValueError, struct.error):
            return None
        pointers = {s.data_ptr(): s.nbytes() for s in storages if s.nbytes() > 0}
        if not pointers or not spans:
            return None
        base = min(pointers) - min(spans)
        if any(spans.get(ptr - base) != size for ptr, size in pointers.items()):
            return None
        return base

    def read(self, t):
        """The bytes of contiguous tensor ``t`` (a bytearray), or None when they cannot be read here."""
        import os

        if self._base is None or not t.is_contiguous() or t.is_conj() or t.is_neg() or t.numel() == 0:
            return None
        size = t.numel() * t.element_size()
        offset = t.untyped_storage().data_ptr() - self._base + t.storage_offset() * t.element_size()
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if n <= 0:
                return None
            got += n
        return buf


def tensor_bytes(torch, t, name, path, files=None):
    """(dtype name, shape, little-endian C-order bytes as a memoryview) of tensor ``t``.

    With ``files`` (a :class:`StorageFile`) the bytes are read from the file when possible.
    """
    dtype = _DTYPE_NAMES.get(str(t.dtype).replace("torch.", ""))
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {t.dtype}, which git-theta cannot store",
            hint=f"supported: {', '.join('torch.' + k for k in _DTYPE_NAMES)}",
        )
    if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
        raise CheckpointError(
            f"{path}: tensor {name!r} is {t.layout}/{t.device} (quantized or sparse tensors are not supported)",
            hint="convert it to a dense tensor (t.to_dense() / t.dequantize()) before saving",
        )
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise CheckpointError("git-theta needs a little-endian machine")
    shape = tuple(t.shape)
    data = files.read(t) if files is not None else None
    if data is not None:
        return dtype, shape, memoryview(data)
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        return dtype, shape, memoryview(b"")
    return dtype, shape, memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _load_error(exc, path):
    import pickle

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and ("GLOBAL" in text or "Unsupported" in text):
        reason = next(
            (line.strip() for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line),
            "it names code to run",
        ).replace("WeightsUnpickler error: ", "")
        reason = reason.split(". Please use")[0]
        return UnsafeCheckpointError(
            f"{path}: refused to load: the pickle would run code or build objects outside the "
            f"allow-list of torch.load(weights_only=True) ({reason})",
            hint="nothing from it was run; save only tensors and plain data, e.g. "
            "torch.save(model.state_dict(), ...), or convert it to safetensors",
        )
    # torch's messages run on for lines; the first sentence says what broke.
    summary = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(exc).__name__
    return CheckpointError(
        f"{path}: truncated or corrupt PyTorch checkpoint ({summary[:160]})",
        hint="the file was not completely written or is damaged; save it again, then git add it",
    )


class _Reader(CheckpointReader):
    def tensors(self):
        path = self.path
        torch = import_torch(path)
        with spooled(self.stream, suffix=".pt") as tmp:
            head = tmp.read(len(LEGACY_MAGIC))
            tmp.seek(0)
            is_zip = head.startswith(ZIP_MAGIC)
            try:
                # torch warns about odd files before failing; the error below says it all.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # weights_only=True is the whole point: never retried without it.
                    obj = torch.load(tmp.name, map_location="cpu", weights_only=True, mmap=is_zip)
            except Exception as exc:  # noqa: BLE001 - every failure becomes one clear error
                raise _load_error(exc, path) from None
            encoder = _Encoder(torch, path)
            try:
                structure = encoder.encode(obj)
                stored = plan_tensors(encoder)  # fills the tensor placeholders in structure
                put_json(self, "structure", structure)
            except RecursionError:
                raise CheckpointError(
                    f"{path}: the checkpoint's containers are nested too deeply",
                    hint="flatten the saved structure (dicts of tensors)",
                ) from None
            files = StorageFile(tmp, [t for _, t in stored]) if is_zip else None
            del obj, encoder
            for name, t in stored:
                dtype, shape, data = tensor_bytes(torch, t, name, path, files)
                yield TensorData(name, dtype, shape, data)


# -- smudge: structure + tensors -> object ------------------------------------------------------------
class _Decoder:
    """Rebuilds the checkpoint object from structure JSON and the stored tensors."""

    def __init__(self, torch, tensors, path):
        self.torch = torch
        self.tensors = tensors  # name -> tensor
        self.used = set()
        self.path = path

    def bad(self, what):
        return ManifestError(
            f"{self.path}: torch structure is invalid ({what})",
            hint="the manifest was edited or merged inconsistently; check out another version",
        )

    def decode(self, node):
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict):
            raise self.bad(f"unexpected {type(node).__name__}")
        tag = node.get("$")
        if tag is None:
            return {(k[1:] if k.startswith("$") else k): self.decode(v) for k, v in node.items()}
        method = getattr(self, "_" + tag, None) if isinstance(tag, str) and tag.isalpha() else None
        if method is None:
            raise self.bad(f"unknown node {tag!r}")
        try:
            return method(node)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise self.bad(f"{tag} node: {exc}") from None

    def _tensor_named(self, name):
        if name not in self.tensors:
            raise self.bad(f"tensor {name!r} is not in the manifest")
        self.used.add(name)
        return self.tensors[name]

    def _finish(self, t, node):
        if node.get("param"):
            return self.torch.nn.Parameter(t, requires_grad=node.get("requires_grad", True))
        if node.get("requires_grad"):
            t.requires_grad_(True)
        return t

    def _tensor(self, node):
        return self._finish(self._tensor_named(node["name"]), node)

    def _view(self, node):
        base = self._tensor_named(node["of"])
        view = base.detach().as_strided(node["shape"], node["stride"], node["offset"])
        return self._finish(view, node)

    def _items(self, node):
        return [(self._hashable(self.decode(k)), self.decode(v)) for k, v in node["items"]]

    def _hashable(self, key):
        if isinstance(key, (list, dict)):
            raise self.bad("unhashable key")
        return key

    def _dict(self, node):
        return dict(self._items(node))

    def _odict(self, node):
        from collections import OrderedDict

        result = OrderedDict(self._items(node))
        for key, value in self.decode(node.get("attrs", {})).items():
            setattr(result, key, value)
        return result

    def _tuple(self, node):
        return tuple(self.decode(v) for v in node["items"])

    def _set(self, node):
        return {self._hashable(self.decode(v)) for v in node["items"]}

    def _size(self, node):
        return self.torch.Size([int(d) for d in node["items"]])

    def _float(self, node):
        return struct.unpack(">d", bytes.fromhex(node["bits"]))[0]

    def _complex(self, node):
        return complex(self.decode(node["re"]), self.decode(node["im"]))

    def _bytes(self, node):
        return bytes.fromhex(node["hex"])

    def _dtype(self, node):
        value = getattr(self.torch, node["name"], None)
        if not isinstance(value, self.torch.dtype):
            raise self.bad(f"unknown dtype {node['name']!r}")
        return value

    def _device(self, node):
        return self.torch.device(node["name"])


def _spool_tensors(torch, source, path):
    """Decode every tensor into one temporary file and map it: {name: tensor on its own storage}.

    The checkpoint is written from page-cache-backed tensors, so memory stays near the largest
    tensor rather than the file size.
    """
    import mmap
    import tempfile

    names = sorted(source.specs)
    offsets = {}
    with tempfile.TemporaryFile(prefix="git-theta-smudge-") as tmp:
        position = 0
        for name, data in source.iter_data(names):
            view = memoryview(data).cast("B")
            if not len(view):
                continue
            position += -position % ALIGN
            offsets[name] = position
            tmp.seek(position)
            tmp.write(view)
            position += len(view)
        tmp.flush()
        mapped = mmap.mmap(tmp.fileno(), position, access=mmap.ACCESS_COPY) if position else None
    tensors = {}
    for name in names:
        spec = source.specs[name]
        if spec.dtype not in _TORCH_DTYPES:
            raise ManifestError(f"{path}: tensor {name!r} has dtype {spec.dtype}, which torch cannot hold")
        dtype = getattr(torch, _TORCH_DTYPES[spec.dtype])
        count = 1
        for d in spec.shape:
            count *= d
        if count == 0:
            tensors[name] = torch.empty(spec.shape, dtype=dtype)
        else:
            # Each frombuffer call makes its own storage, so torch.save writes one storage each.
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=offsets[name])
            tensors[name] = flat.reshape(spec.shape)
    return tensors


class TorchFormat(CheckpointFormat):
    """PyTorch ``torch.save`` checkpoints, loaded only with ``weights_only=True``."""

    name = "torch"
    releases_tensors = True  # join writes each tensor out before asking for the next
    suffixes = (".pt", ".pth", ".bin", ".ckpt")
    spools = True

    def sniff(self, head, path):
        if head.startswith(LEGACY_MAGIC):
            return True
        if not head.startswith(ZIP_MAGIC) or len(head) < 30:
            return False
        (name_len,) = struct.unpack("<H", head[26:28])
        first = head[30 : 30 + name_len]
        # torch.save writes <archive>/data.pkl first; a zip of .npy arrays is npz. Other zips are
        # torch's only when the name says so (torch.load then decides).
        if first.endswith(b"/data.pkl") or first == b"data.pkl":
            return True
        return not first.endswith(b".npy") and path.endswith(self.suffixes)

    def split(self, stream, path):
        return _Reader(stream, path)

    def join(self, fields, source, out, path):
        torch = import_torch(path)
        structure = get_json(fields, source, "structure", path)
        if structure is None:
            raise ManifestError(
                f"{path}: torch manifest has no structure",
                hint="the manifest was edited by hand or truncated; check out another version",
            )
        decoder = _Decoder(torch, _spool_tensors(torch, source, path), path)
        try:
            obj = decoder.decode(structure)
        except RecursionError:
            raise decoder.bad("nested too deeply") from None
        unused = sorted(set(source.specs) - decoder.used)
        if unused:
            raise decoder.bad(f"tensor {unused[0]!r} is in the manifest but not in the structure")
        torch.save(obj, WriteOnly(out))
