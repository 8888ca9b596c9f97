"""numpy ``.npz`` archives (``np.savez`` / ``np.savez_compressed``): one tensor per array.

Clean spools git's stream to a temporary file (a zip needs seeking), opens it with
``np.load(allow_pickle=False)`` so nothing is ever unpickled, and yields the arrays one by one as
little-endian C-order bytes. Object arrays need pickle and are refused; arrays of a dtype git-theta
has no name for (strings, datetimes, records, complex128) are refused with the dtype named.
Checkout writes the arrays back in their original order, compressed if the archive was, with fixed
zip timestamps, so the same manifest always gives the same bytes and ``git status`` stays clean.

Manifest fields: ``order`` (JSON list of array names in archive order, only when that is not the
sorted order), ``compression`` (``deflated`` for ``savez_compressed``), ``big_endian`` (JSON list
of arrays that were stored big-endian; they come back big-endian) and ``fortran_order`` (likewise).
"""

import struct

from git_theta.errors import CheckpointError, ManifestError
from git_theta.updates.base import TensorData
from git_theta.formats.base import CheckpointFormat, CheckpointReader, get_json, put_json
from git_theta.formats.spool import WriteOnly, spooled

ZIP_MAGIC = b"PK\x03\x04"
SUFFIX = ".npy"
# numpy dtype (kind, itemsize) -> the shared dtype vocabulary (git_theta.dtypes).
_DTYPE_NAMES = {
    ("f", 8): "F64",
    ("f", 4): "F32",
    ("f", 2): "F16",
    ("c", 8): "C64",
    ("i", 8): "I64",
    ("i", 4): "I32",
    ("i", 2): "I16",
    ("i", 1): "I8",
    ("u", 8): "U64",
    ("u", 4): "U32",
    ("u", 2): "U16",
    ("u", 1): "U8",
    ("b", 1): "BOOL",
}
# Fixed member timestamp (the zip epoch): checkout output must not depend on the clock.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# What zipfile and numpy raise on damaged archives (unknown methods, encrypted members, bad CRCs...).
_DAMAGED = (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, UnicodeDecodeError)


def _corrupt(path, exc):
    return CheckpointError(
        f"{path}: truncated or corrupt npz archive ({str(exc).strip() or type(exc).__name__})",
        hint="the file was not completely written or is damaged; save it again, then git add it",
    )


class _Reader(CheckpointReader):
    def tensors(self):
        import zipfile

        import numpy as np

        path = self.path
        with spooled(self.stream, suffix=".npz") as tmp:
            try:
                archive = zipfile.ZipFile(tmp)
            except (zipfile.BadZipFile, struct.error, *_DAMAGED) as exc:
                raise _corrupt(path, exc) from None
            with archive:
                infos = archive.infolist()
                for info in infos:
                    if not info.filename.endswith(SUFFIX) or info.is_dir():
                        raise CheckpointError(
                            f"{path}: member {info.filename!r} is not a .npy array (not an np.savez archive)",
                            hint="set the right format with theta-format=NAME in .gitattributes, or untrack the file",
                        )
                names = [info.filename[: -len(SUFFIX)] for info in infos]
                if len(set(names)) != len(names):
                    raise CheckpointError(f"{path}: an array name appears twice in the archive")
                if names != sorted(names):
                    put_json(self, "order", names)
                methods = {info.compress_type for info in infos}
                if zipfile.ZIP_DEFLATED in methods:
                    self.fields["compression"] = "deflated"
                big_endian, fortran = [], []
                for info, name in zip(infos, names):
                    array = self._read_array(archive, info, name, np)
                    if array.dtype.byteorder == ">":
                        big_endian.append(name)
                        array = array.astype(array.dtype.newbyteorder("<"))
                    if array.flags.f_contiguous and not array.flags.c_contiguous:
                        fortran.append(name)
                    dtype = _DTYPE_NAMES.get((array.dtype.kind, array.dtype.itemsize))
                    if dtype is None:
                        raise CheckpointError(
                            f"{path}: array {name!r} has dtype {array.dtype}, which git-theta cannot store",
                            hint="supported: float16/32/64, complex64, (u)int8-64, bool; "
                            "keep other arrays in a separate, untracked file",
                        )
                    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
                    yield TensorData(name, dtype, tuple(int(d) for d in array.shape), memoryview(data))
                    del array, data
                if big_endian:
                    put_json(self, "big_endian", big_endian)
                if fortran:
                    put_json(self, "fortran_order", fortran)

    def _read_array(self, archive, info, name, np):
        """One member as an array. The header is checked against the member's size before any
        data is read, so a damaged header cannot ask for a huge allocation."""
        import zipfile
        import zlib

        fmt = np.lib.format
        readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
        try:
            with archive.open(info) as member:
                version = fmt.read_magic(member)
                if version not in readers:
                    raise CheckpointError(
                        f"{self.path}: array {name!r} uses .npy format version {version[0]}.{version[1]}, "
                        "which git-theta does not read",
                        hint="save it with np.savez from a numeric array",
                    )
                shape, fortran, dtype = readers[version](member)
                if dtype.hasobject:
                    raise CheckpointError(
                        f"{self.path}: array {name!r} is an object array, which needs pickle to load",
                        hint="git-theta never unpickles; save numeric arrays only",
                    )
                size = dtype.itemsize
                for dim in shape:
                    size *= dim
                if size != info.file_size - member.tell():
                    raise CheckpointError(
                        f"{self.path}: array {name!r}: its header describes {size} bytes of data, "
                        f"the member holds {info.file_size - member.tell()} (corrupt archive)",
                        hint="the file is damaged; save it again, then git add it",
                    )
                data = member.read(size + 1)  # reading to the end makes zipfile check the CRC
                if len(data) != size:
                    raise CheckpointError(f"{self.path}: array {name!r} is truncated (corrupt archive)")
                return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
        except (zipfile.BadZipFile, struct.error, zlib.error, *_DAMAGED) as exc:
            raise _corrupt(self.path, exc) from None


class NpzFormat(CheckpointFormat):
    """numpy ``.npz`` archives, read with ``allow_pickle=False``."""

    name = "npz"
    releases_tensors = True  # join writes each tensor out before asking for the next
    suffixes = (".npz",)
    spools = True

    def sniff(self, head, path):
        if not head.startswith(ZIP_MAGIC) or len(head) < 30:
            return False
        (name_len,) = struct.unpack("<H", head[26:28])
        return head[30 : 30 + name_len].endswith(SUFFIX.encode())

    def split(self, stream, path):
        return _Reader(stream, path)

    def join(self, fields, source, out, path):
        import zipfile

        import numpy as np

        from git_theta.dtypes import get_dtype

        order = get_json(fields, source, "order", path) or sorted(source.specs)
        if sorted(order) != sorted(source.specs):
            # A merge or hand edit added or removed arrays: keep the known order, then the rest.
            order = [n for n in order if n in source.specs]
            order += sorted(set(source.specs) - set(order))
        big_endian = set(get_json(fields, source, "big_endian", path) or ())
        fortran = set(get_json(fields, source, "fortran_order", path) or ())
        compression = fields.get("compression")
        if compression not in (None, "deflated"):
            raise ManifestError(f"{path}: unknown npz compression {compression!r}")
        method = zipfile.ZIP_DEFLATED if compression == "deflated" else zipfile.ZIP_STORED
        # An unseekable writer: zipfile then streams each member with a data descriptor, the same
        # bytes whether ``out`` is git's pipe or a file.
        with zipfile.ZipFile(WriteOnly(out), mode="w", compression=method, allowZip64=True) as archive:
            for name, data in source.iter_data(order):
                spec = source.specs[name]
                numpy_name = get_dtype(spec.dtype).numpy_name
                if numpy_name is None:  # only a merged or edited manifest can ask for this
                    raise ManifestError(
                        f"{path}: tensor {name!r} has dtype {spec.dtype}, which an npz file cannot hold",
                        hint="track this checkpoint as safetensors, or cast the tensor before merging",
                    )
                dtype = np.dtype(numpy_name)
                array = np.frombuffer(data, dtype=dtype).reshape(spec.shape)
                if name in big_endian:
                    array = array.astype(dtype.newbyteorder(">"))
                if name in fortran:
                    array = np.asfortranarray(array)
                info = zipfile.ZipInfo(name + SUFFIX, date_time=ZIP_EPOCH)
                info.compress_type = method
                info.external_attr = 0o600 << 16  # what np.savez's members get
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)
