"""Manifest v1: the small text file git stores in place of a checkpoint.

Layout (UTF-8, ``\\n`` line ends, every line self-contained so plain ``git diff`` and git's text merge
stay readable)::

    git-theta manifest v1
    format safetensors
    field <key> <value>                          # format-specific text, sorted by key
    blob <key> <oid>:<size>                      # format-specific side objects, sorted by key
    tensor <name> <dtype> <shape> <digest> <update> <oid>:<size> [<oid>:<size> ...]

Version 2 (written only when some object lives in a pack, see :mod:`git_theta.store.packs`) adds
``pack <oid>:<size>`` lines, sorted by oid, after the fields; object references may then end in
``@<prefix>``, the first hex digits (at least 12, as many as make it unique among the manifest's
pack lines) of the id of the pack holding the object. A prefix rather than a line number keeps an
unchanged tensor's line unchanged when a later version adds a pack, so ``git diff`` and git's text
merge of manifests stay line-by-line. Version 1 manifests read as before and a manifest without
packed objects is still written as version 1, byte for byte.

Version 3 (written when some tensor is stored ``raw``) adds one shorthand: a small tensor stored as
its own bytes in a pack has an object id equal to its digest and a size fixed by its dtype and
shape, so its reference is written as ``@<prefix>`` alone::

    tensor <name> <dtype> <shape> <digest> raw @<prefix>

which saves the 64 hex digits and the size a full reference repeats (~70 of ~210 bytes a line).
Versions 1 and 2 read as before.

Tensor lines are sorted by name. ``<shape>`` is ``[d0,d1,...]`` (``[]`` for a scalar), ``<digest>``
the sha256 of the tensor's raw little-endian C-order bytes, ``<update>`` the encoding of the first
object, and the object list is the whole chain needed to rebuild the tensor: the tensor's own object
first, then its base, down to a keyframe. Names escape ``%``, whitespace and control characters as
``%XX`` so a line always splits on single spaces.
"""

import bisect
import heapq
import itertools
import operator
import re
from dataclasses import dataclass, field

from git_theta.errors import ManifestError

MAGIC = "git-theta manifest"
#: the largest manifest read: a bigger blob at a tracked path is a raw checkpoint, not a manifest
MAX_MANIFEST = 256 << 20
VERSION = 1
FIRST_LINE = f"{MAGIC} v{VERSION}"
PACKED_LINE = f"{MAGIC} v2"  # a manifest with pack lines
RAW_LINE = f"{MAGIC} v3"  # a manifest with pack lines and raw shorthand references
#: the update of a keyframe object that is the tensor's bytes themselves (its id is the digest)
RAW = "raw"
MAX_DIMS = 64
MAX_ELEMENTS = 1 << 56  # larger than any real tensor; stops absurd shapes from a tampered manifest

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_DIGITS = re.compile(r"[0-9]{1,20}\Z")
_PACK_PREFIX = re.compile(r"[0-9a-f]{12,64}\Z")
PACK_PREFIX = 12  # ASCII only: str.isdigit() accepts '²', which int() refuses
_KEY = re.compile(r"[a-z][a-z0-9_.-]*\Z")
_UPDATE = re.compile(r"[a-z][a-z0-9_-]*\Z")
_DTYPE = re.compile(r"[A-Z][A-Z0-9_]*\Z")
#: the common line of a v3 manifest, a small tensor stored raw in a pack (200,000 of them): matched
#: whole in one go by the parser (anything else takes the general path, which says what is wrong),
#: and dropped in one pass by :func:`skim`
_RAW_FORM = r"tensor ([^ \n%]+) ([A-Z][A-Z0-9_]*) (\[[0-9,]*\]) ([0-9a-f]{64}) raw @([0-9a-f]{12,64})"
_RAW_SHORT = re.compile(_RAW_FORM)
#: the raw shorthand line, from (escaped name, dtype, shape text, digest, pack prefix)
_RAW_TENSOR_LINE = f"tensor %s %s %s %s {RAW} @%s"
_ESCAPE = re.compile(r"[%\x00-\x20\x7f]")
_NEEDS_ESCAPE = _ESCAPE.search


def escape_name(name):
    """Percent-escape the characters that would break a space-separated line."""
    return _ESCAPE.sub(lambda m: "%%%02X" % ord(m.group()), name)


def unescape_name(text):
    """Inverse of :func:`escape_name`."""
    try:
        return re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)
    except ValueError as exc:  # pragma: no cover - regex guarantees hex
        raise ManifestError(f"bad escape in name {text!r}") from exc


def is_manifest(data):
    """True when ``data`` (bytes) starts like a git-theta manifest of any version."""
    return data[: len(MAGIC)] == MAGIC.encode()


def check_oid(oid, context=""):
    """Raise ManifestError unless ``oid`` is 64 lowercase hex digits (never a path)."""
    if not isinstance(oid, str) or not _HEX64.match(oid):
        raise ManifestError(f"invalid object id {oid!r}{context}")
    return oid


@dataclass(frozen=True)
class ObjectRef:
    """One stored object: its sha256 id and size in bytes (what a Git LFS server needs).

    ``pack`` is the pack object holding it (an ObjectRef, or a pack still being written whose
    ``oid`` is filled in when it is), None for an object stored on its own. It says where the
    object travels and is kept, not what it is: two refs to the same oid are equal either way.
    """

    oid: str
    size: int
    pack: object = field(default=None, compare=False, repr=False)

    def __str__(self):
        if self.pack is not None:
            return f"{self.oid}:{self.size}@{self.pack.oid}:{self.pack.size}"
        return f"{self.oid}:{self.size}"

    @property
    def home(self):
        """The object that is stored and transferred for this one: its pack, or itself."""
        pack = self.pack
        return self if pack is None else ObjectRef(pack.oid, pack.size)

    @classmethod
    def parse(cls, text, context="", packs=None):
        """Parse ``oid:size``, ``oid:size@poid:psize`` or, with ``packs`` (a manifest's pack
        lines), ``oid:size@<pack id prefix>``."""
        text, at, where = text.partition("@")
        pack = None
        if at:
            if packs is not None and _PACK_PREFIX.match(where):
                pack = _pack_for(packs, where, text, context)
            elif "@" in where:
                raise ManifestError(f"invalid object reference {text}@{where}{context}")
            else:
                pack = cls.parse(where, context)
        oid, sep, size = text.partition(":")
        if not sep or not _DIGITS.match(size):
            raise ManifestError(f"invalid object reference {text!r}{context}")
        return cls(check_oid(oid, context), int(size), pack)


def _pack_for(packs, prefix, text="", context=""):
    """The one pack line of ``packs`` whose id starts with ``prefix`` (found once per prefix)."""
    memo = packs.memo  # prefix -> pack: 200,000 references name a handful of packs
    pack = memo.get(prefix)
    if pack is None:
        matches = [p for p in packs if p.oid.startswith(prefix)]
        if len(matches) != 1:
            raise ManifestError(f"object reference {text}@{prefix} names no single pack line{context}")
        pack = memo[prefix] = matches[0]
    return pack


class _PackLines(list):
    """A manifest's pack lines, with the prefixes resolved so far."""

    def __init__(self):
        super().__init__()
        self.memo = {}


def is_raw(entry):
    """True when ``entry``'s only object is the tensor's own bytes (stored ``raw``)."""
    objects = entry.objects
    return len(objects) == 1 and objects[0].oid == entry.digest


def _ref_text(ref, names):
    """A reference as a manifest writes it: packed objects name their pack by an id prefix."""
    if ref.pack is None:
        return f"{ref.oid}:{ref.size}"
    return f"{ref.oid}:{ref.size}@{names[ref.pack.oid]}"


def _pack_names(oids):
    """{pack oid: shortest prefix of at least PACK_PREFIX digits unique among ``oids``}."""
    names = {}
    for oid in oids:
        length = PACK_PREFIX
        while any(o != oid and o.startswith(oid[:length]) for o in oids):
            length += 1
        names[oid] = oid[:length]
    return names


@dataclass(frozen=True)
class TensorEntry:
    """How to rebuild one tensor: its identity (digest) and the chain of objects that encode it."""

    name: str
    dtype: str
    shape: tuple
    digest: str
    update: str
    objects: tuple  # of ObjectRef: own object first, keyframe last

    @property
    def chain_depth(self):
        """Number of deltas above the keyframe (0 for a dense tensor)."""
        return len(self.objects) - 1

    def line(self, numbers=None):
        """The manifest line, every reference in full; ``numbers`` maps pack oids to the prefixes
        that name them. (The raw shorthand of version 3 is written by :meth:`Manifest.serialize`.)"""
        shape = _shape_text(self.shape)
        objects = " ".join(str(ref) if numbers is None else _ref_text(ref, numbers) for ref in self.objects)
        return f"tensor {escape_name(self.name)} {self.dtype} {shape} {self.digest} {self.update} {objects}"

    def same_content(self, other):
        """True when both entries describe bit-identical tensors (no tensor loaded)."""
        return (
            other is not None
            and self.digest == other.digest
            and self.dtype == other.dtype
            and self.shape == other.shape
        )


class Manifest:
    """A parsed manifest: the format, its file-level fields and side objects, and the tensors.

    ``fields`` maps keys to single-line text, ``blobs`` keys to ObjectRefs and ``tensors`` names
    to TensorEntry objects. A parsed version 3 manifest keeps its raw shorthand lines as columns
    (a :class:`RawTable`) until ``tensors`` is first used: checkout of 200,000 small tensors
    reads them as columns (:meth:`columns`) and never makes an entry per tensor.
    """

    def __init__(self, format, fields=None, blobs=None, tensors=None):
        self.format = format
        self.fields = {} if fields is None else fields
        self.blobs = {} if blobs is None else blobs
        self._tensors = {} if tensors is None else tensors
        self._table = None  # RawTable of raw lines not made entries yet
        self.pack_lines = ()

    @property
    def tensors(self):
        """``{name: TensorEntry}`` of every tensor, by name."""
        table = self._table
        if table is not None:
            self._table = None
            rows = zip(table.names, table.entries())
            general = self._tensors
            # Both sorted by name (the parser checked): merged, they stay in the manifest's order.
            self._tensors = dict(heapq.merge(general.items(), rows) if general else rows)
        return self._tensors

    @tensors.setter
    def tensors(self, value):
        self._tensors = value
        self._table = None

    def add_table(self, table):
        """Add the raw tensors of ``table`` (a :class:`RawTable`, rows sorted by name, no name
        among the entries) without an entry each: clean of 200,000 small tensors."""
        if self._table is not None:
            self.tensors  # noqa: B018 - the table in hand becomes entries first
        self._table = table

    def columns(self):
        """``(entries, table)``: ``{name: TensorEntry}`` of the tensors that are entries, and the
        :class:`RawTable` of the rest (None when every tensor is an entry); no entry is made."""
        return self._tensors, self._table

    def tensor_count(self):
        """How many tensors the manifest lists."""
        return len(self._tensors) + (len(self._table.names) if self._table is not None else 0)

    def __eq__(self, other):
        if not isinstance(other, Manifest):
            return NotImplemented
        return (self.format, self.fields, self.blobs, self.tensors) == (
            other.format,
            other.fields,
            other.blobs,
            other.tensors,
        )

    def __repr__(self):
        return f"Manifest(format={self.format!r}, fields={self.fields!r}, {self.tensor_count()} tensors)"

    def packs(self):
        """The pack objects holding any of the manifest's objects, sorted by oid."""
        found = {}
        table = self._table
        if table is not None:
            for pack in table.distinct:
                found[pack.oid] = ObjectRef(pack.oid, pack.size)
        for ref in self._refs():
            pack = ref.pack
            if pack is not None and pack.oid not in found:
                found[pack.oid] = ref.home
        return [found[oid] for oid in sorted(found)]

    def _refs(self):
        """The blobs' and the entries' object refs (not the raw table's)."""
        yield from self.blobs.values()
        for entry in self._tensors.values():
            yield from entry.objects

    def serialize(self):
        """Canonical bytes: the same manifest always gives the same bytes."""
        packs = self.packs()
        numbers = _pack_names([ref.oid for ref in packs])
        tensors, table = self._tensors, self._table
        body, shapes, sizes = [], {}, {}
        raw = table is not None
        names = sorted(tensors)
        for name in names:
            entry = tensors[name]
            objects = entry.objects
            ref = objects[0] if len(objects) == 1 else None
            if ref is None or entry.update != RAW or ref.pack is None or ref.oid != entry.digest:
                body.append(entry.line(numbers))
                continue
            # The common line of a many-tensor checkpoint, written with what its neighbours share.
            key = (entry.dtype, entry.shape)
            size = sizes.get(key)
            if size is None:
                from git_theta.dtypes import nbytes

                size = sizes[key] = nbytes(*key)
            if ref.size != size:
                body.append(entry.line(numbers))
                continue
            shape = shapes.get(entry.shape)
            if shape is None:
                shape = shapes[entry.shape] = _shape_text(entry.shape)
            text = entry.name
            if _NEEDS_ESCAPE(text):
                text = escape_name(text)
            body.append(_RAW_TENSOR_LINE % (text, entry.dtype, shape, entry.digest, numbers[ref.pack.oid]))
            raw = True
        if table is not None:  # its rows' lines, merged in by name (both are sorted by name)
            rows = table.lines(numbers)
            body = list(heapq.merge(zip(names, body), zip(table.names, rows))) if body else rows
            if tensors:
                body = [line for _, line in body]
        first = FIRST_LINE
        if packs:
            first = RAW_LINE if raw else PACKED_LINE
        lines = [first, f"format {self.format}"]
        for key in sorted(self.fields):
            value = self.fields[key]
            if "\n" in value or "\r" in value:
                raise ManifestError(f"field {key!r} must be a single line")
            lines.append(f"field {key} {value}")
        lines.extend(f"pack {ref}" for ref in packs)
        for key in sorted(self.blobs):
            lines.append(f"blob {key} {_ref_text(self.blobs[key], numbers)}")
        lines.extend(body)
        return ("\n".join(lines) + "\n").encode("utf-8")

    def all_objects(self):
        """Every stored object the manifest needs, each once, in a stable order: a packed object
        counts as its pack (what is stored, kept and transferred)."""
        self.tensors  # noqa: B018 - every raw line an entry: the order is the entries'
        seen = {}
        for ref in self._refs():
            home = ref.home
            seen.setdefault(home.oid, home)
        return list(seen.values())

    def member_objects(self):
        """Every object the manifest's tensors and blobs decode from, packed ones included."""
        self.tensors  # noqa: B018 - every raw line an entry
        seen = {}
        for ref in self._refs():
            seen.setdefault(ref.oid, ref)
        return list(seen.values())

    def logical_size(self):
        """Sum of the raw sizes of all tensors, in bytes."""
        from git_theta.dtypes import nbytes

        return sum(nbytes(e.dtype, e.shape) for e in self.tensors.values())

    @classmethod
    def parse(cls, data, source="manifest"):
        """Parse and validate manifest bytes; ManifestError names ``source`` and the bad line."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ManifestError(f"{source}: manifest is not valid UTF-8") from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        else:
            raise ManifestError(f"{source}: manifest is truncated (no final newline)")
        if not lines or not lines[0].startswith(MAGIC):
            raise ManifestError(f"{source}: not a git-theta manifest")
        if lines[0] not in (FIRST_LINE, PACKED_LINE, RAW_LINE):
            raise ManifestError(
                f"{source}: unknown manifest schema {lines[0][len(MAGIC) :].strip()!r}",
                hint="this manifest was written by a newer git-theta: upgrade with pip install -U git-theta",
            )
        if len(lines) < 2 or not lines[1].startswith("format "):
            raise ManifestError(f"{source}: line 2 must name the format")
        manifest = cls(format=lines[1][len("format ") :])
        packs = _PackLines() if lines[0] != FIRST_LINE else None
        manifest.pack_lines = packs if packs is not None else ()  # as written (see skim)
        shorthand = lines[0] == RAW_LINE
        if not _KEY.match(manifest.format):
            raise ManifestError(f"{source}: invalid format name {manifest.format!r}")
        if shorthand:
            quick = cls(format=manifest.format)  # a fresh one: the line parser starts over if need be
            quick.pack_lines = _PackLines()
            if _read_columns(quick, lines, quick.pack_lines, source):
                return quick
        _read_lines(manifest, enumerate(lines[2:], start=3), packs, shorthand, source)
        return manifest


def _read_lines(manifest, numbered, packs, shorthand, source, memo=None):
    """Parse ``numbered`` ((line number, text) after the format line) into ``manifest``."""
    memo = memo or _LineMemo()
    tensors = manifest._tensors
    quick = _RAW_SHORT.fullmatch if shorthand else None
    for number, line in numbered:
        match = quick and quick(line)
        if match:
            entry = _raw_entry(*match.groups(), packs, memo)
            if entry is not None and entry.name not in tensors:
                tensors[entry.name] = entry
                continue
        kind, _, rest = line.partition(" ")
        if kind == "tensor":
            try:
                entry = _parse_tensor(rest, "", packs, shorthand, memo)
            except ManifestError as exc:  # where it is, formatted for the bad line only
                raise ManifestError(f"{exc.message} ({source}, line {number})", hint=exc.hint) from None
            if entry.name in tensors:
                raise ManifestError(f"duplicate tensor {entry.name!r} ({source}, line {number})")
            tensors[entry.name] = entry
            continue
        where = f" ({source}, line {number})"
        if kind == "pack" and packs is not None:
            pack = ObjectRef.parse(rest, where)
            if packs and pack.oid <= packs[-1].oid:
                raise ManifestError(f"pack lines out of order{where}")
            packs.append(pack)
        elif kind in ("field", "blob"):
            key, sep, value = rest.partition(" ")
            if not sep or not _KEY.match(key):
                raise ManifestError(f"malformed {kind} line{where}")
            table = manifest.fields if kind == "field" else manifest.blobs
            if key in table:
                raise ManifestError(f"duplicate {kind} {key!r}{where}")
            table[key] = value if kind == "field" else ObjectRef.parse(value, where, packs)
        else:
            raise ManifestError(f"unknown line kind {kind!r}{where}")


#: a line holding this is a raw shorthand line (or damaged: then the line parser says how)
_RAW_MARK = " " + RAW + " @"
#: manifests with fewer raw lines than this are parsed line by line (the columns' fixed costs)
COLUMNS_FROM = 256


def _read_columns(manifest, lines, packs, source):
    """Parse a version 3 manifest whose raw shorthand lines become a :class:`RawTable`, checked
    a column at a time (each distinct dtype, shape and pack once; the digests as one string).

    Returns False, having changed nothing that counts, when anything is unusual: then the line
    parser reads the manifest and names any bad line. Accepted here only what the line parser
    accepts, in the order :meth:`Manifest.serialize` writes: raw names strictly sorted (so also
    unique), as the other tensor lines; pack lines before the first tensor line.
    """
    body = lines[2:]
    flags = [_RAW_MARK in line for line in body]
    raw = list(itertools.compress(body, flags))
    count = len(raw)
    if count < COLUMNS_FROM or set(map(str.count, raw, itertools.repeat(" "))) != {6}:
        return False
    first = flags.index(True)
    others = list(itertools.compress(body, map(operator.not_, flags)))
    if any(line.startswith("pack ") for line in others[first:]):
        return False
    memo = _LineMemo()
    try:
        _read_lines(manifest, enumerate(others), packs, True, source, memo)
    except ManifestError:
        return False
    tokens = " ".join(raw).split(" ")
    names, dtypes, shape_texts, digests, prefixes = (tokens[k::7] for k in (1, 2, 3, 4, 6))
    if set(tokens[0::7]) != {"tensor"} or set(tokens[5::7]) != {RAW}:
        return False
    distinct_prefixes, kinds = set(prefixes), set(zip(dtypes, shape_texts))
    try:
        homes = {
            text: _pack_for(packs, text[1:])
            for text in distinct_prefixes
            if text[:1] == "@" and _PACK_PREFIX.match(text[1:])
        }
        shapes = {text: _parse_shape(text, "") for text in set(shape_texts)}
        sizes = {(d, t): _raw_size(d, shapes[t], "") for d, t in kinds if _DTYPE.match(d)}
    except ManifestError:
        return False
    joined = "".join(digests)
    if len(homes) != len(distinct_prefixes) or len(sizes) != len(kinds):
        return False
    # 64 characters each, each one of 0-9a-f: what fromhex reads back to the same text (it also
    # takes A-F and whitespace, which its hex() does not give back).
    if set(map(len, digests)) != {64}:
        return False
    try:
        binary = bytes.fromhex(joined)
    except ValueError:
        return False
    if binary.hex() != joined:
        return False
    if "%" in "".join(names):
        names = [unescape_name(name) if "%" in name else name for name in names]
    general = list(manifest._tensors)
    if not all(names) or not strictly_ascending(names) or not strictly_ascending(general):
        return False
    if any(_among(names, name) for name in general):
        return False
    if len(sizes) == 1:
        row_sizes = [next(iter(sizes.values()))] * count
    else:
        row_sizes = list(map(sizes.__getitem__, zip(dtypes, shape_texts)))
    distinct = list({id(p): p for p in homes.values()}.values())
    number = {text: distinct.index(pack) for text, pack in homes.items()}
    manifest._table = RawTable(
        names,
        dtypes,
        list(map(shapes.__getitem__, shape_texts)),
        digests,
        row_sizes,
        list(map(homes.__getitem__, prefixes)),
        distinct,
        binary,
        list(map(number.__getitem__, prefixes)),
    )
    return True


def strictly_ascending(names):
    """True when ``names`` are strictly increasing (sorted, no name twice)."""
    return all(map(operator.lt, names, itertools.islice(names, 1, None)))


def _among(names, name):
    """True when ``name`` is in the sorted list ``names``."""
    at = bisect.bisect_left(names, name)
    return at < len(names) and names[at] == name


class RawTable:
    """A manifest's raw shorthand lines as columns: row ``i`` is tensor ``names[i]``, stored as
    its own bytes (object id ``digests[i]``, ``sizes[i]`` bytes) in pack ``packs[i]``, which is
    ``distinct[numbers[i]]``; ``binary`` is every digest's 32 bytes, back to back.

    Rows are sorted by name. ``location`` is free for a reader to keep where it found the rows.
    """

    __slots__ = ("names", "dtypes", "shapes", "digests", "sizes", "packs", "distinct", "binary", "numbers", "location")

    def __init__(self, names, dtypes, shapes, digests, sizes, packs, distinct, binary, numbers):
        self.names = names
        self.dtypes = dtypes
        self.shapes = shapes
        self.digests = digests
        self.sizes = sizes
        self.packs = packs
        self.distinct = distinct
        self.binary = binary
        self.numbers = numbers
        self.location = None

    def __len__(self):
        return len(self.names)

    def entry(self, row):
        """The TensorEntry of row ``row``."""
        return _raw_tensor_entry(
            self.names[row], self.dtypes[row], self.shapes[row], self.digests[row], self.sizes[row], self.packs[row]
        )

    def entries(self):
        """The TensorEntry of every row, in order."""
        return map(_raw_tensor_entry, self.names, self.dtypes, self.shapes, self.digests, self.sizes, self.packs)

    def lines(self, numbers):
        """The rows' manifest lines (the raw shorthand), in order; ``numbers`` maps pack oids to
        the prefixes that name them."""
        shape_text = {shape: _shape_text(shape) for shape in set(self.shapes)}
        prefix = {id(pack): numbers[pack.oid] for pack in self.distinct}
        names = self.names
        if _NEEDS_ESCAPE("".join(names)):
            names = [escape_name(name) if _NEEDS_ESCAPE(name) else name for name in names]
        columns = (names, self.dtypes, map(shape_text.__getitem__, self.shapes), self.digests)
        return list(map(_RAW_TENSOR_LINE.__mod__, zip(*columns, map(prefix.__getitem__, map(id, self.packs)))))

    @classmethod
    def of_rows(cls, parts):
        """A table of the rows ``parts`` give, sorted by name: each part is (names, dtypes,
        shapes, digests, sizes, packs), the packs objects with ``oid`` and ``size`` (set by the
        time the table is serialized); names unique over all parts."""
        names, dtypes, shapes, digests, sizes, packs = (
            list(itertools.chain.from_iterable(part[k] for part in parts)) for k in range(6)
        )
        if not strictly_ascending(names):
            order = sorted(range(len(names)), key=names.__getitem__)
            names, dtypes, shapes, digests, sizes, packs = (
                [column[i] for i in order] for column in (names, dtypes, shapes, digests, sizes, packs)
            )
        # A pack is one pack however many objects stand for it (a written pack by its oid); the
        # objects are a handful, the rows 200,000: each row is mapped in C, by its object's id.
        by_key, canonical = {}, {}
        for ident, pack in dict(zip(map(id, packs), packs)).items():
            canonical[ident] = by_key.setdefault(pack.oid or ident, pack)
        distinct = list(by_key.values())
        place = {id(pack): n for n, pack in enumerate(distinct)}
        number = {ident: place[id(pack)] for ident, pack in canonical.items()}
        idents = list(map(id, packs))
        packs = list(map(canonical.__getitem__, idents))
        return cls(names, dtypes, shapes, digests, sizes, packs, distinct, None, list(map(number.__getitem__, idents)))


_RAW_LINES = re.compile(("^" + _RAW_FORM + "\n").encode(), re.MULTILINE)


def skim(data, source="manifest"):
    """``(manifest, packs)``: manifest bytes parsed without an entry per raw shorthand line.

    ``manifest`` holds every other line; ``packs`` the pack lines' ObjectRefs, whose packs hold
    the skimmed tensors. Raw lines are only matched for their form, not checked the way
    :meth:`Manifest.parse` checks them: this is for manifests this clone wrote (the stat cache
    asks which objects a file needs on every ``git status``), where one regex pass over 200,000
    lines replaces 200,000 entries.
    """
    if not data.startswith(RAW_LINE.encode() + b"\n"):
        manifest = Manifest.parse(data, source)
        return manifest, manifest.packs()
    manifest = Manifest.parse(_RAW_LINES.sub(b"", data), source)
    return manifest, list(manifest.pack_lines)


class _LineMemo:
    """What a manifest's lines repeat, checked once: dtypes, shapes and update names (200,000
    tensor lines use a handful), and the sizes their raw shorthand stands for."""

    def __init__(self):
        self.dtypes = set()
        self.updates = set()
        self.shapes = {}  # text -> tuple
        self.sizes = {}  # (dtype, shape text) -> bytes


def _parse_tensor(rest, where, packs=None, shorthand=False, memo=None):
    memo = memo or _LineMemo()
    parts = rest.split(" ")
    if len(parts) < 6:
        raise ManifestError(f"malformed tensor line{where}")
    name, dtype, shape_text, digest, update = parts[:5]
    if "%" in name:
        name = unescape_name(name)
    if not name:
        raise ManifestError(f"empty tensor name{where}")
    if dtype not in memo.dtypes:
        if not _DTYPE.match(dtype):
            raise ManifestError(f"invalid dtype {dtype!r}{where}")
        memo.dtypes.add(dtype)
    shape = memo.shapes.get(shape_text)
    if shape is None:
        shape = memo.shapes[shape_text] = _parse_shape(shape_text, where)
    if len(digest) != 64 or not _HEX64.match(digest):
        raise ManifestError(f"invalid tensor digest {digest!r}{where}")
    if update not in memo.updates:
        if not _UPDATE.match(update):
            raise ManifestError(f"invalid update type {update!r}{where}")
        memo.updates.add(update)
    if shorthand and update == RAW and len(parts) == 6 and parts[5][:1] == "@":
        size = memo.sizes.get((dtype, shape_text))
        if size is None:
            size = memo.sizes[(dtype, shape_text)] = _raw_size(dtype, shape, where)
        prefix = parts[5][1:]
        pack = packs.memo.get(prefix) if packs is not None else None
        if pack is None:
            if not _PACK_PREFIX.match(prefix):
                raise ManifestError(f"invalid object reference @{prefix}{where}")
            pack = _pack_for(packs, prefix, "", where)
        return _raw_tensor_entry(name, dtype, shape, digest, size, pack)
    objects = tuple(ObjectRef.parse(p, where, packs) for p in parts[5:])
    return TensorEntry(name, dtype, shape, digest, update, objects)


_new = object.__new__


def _raw_entry(name, dtype, shape_text, digest, prefix, packs, memo):
    """The entry of a raw shorthand line already matched by ``_RAW_SHORT``, from what ``memo``
    has checked before; None when anything is new or doubtful (the general parser decides)."""
    shape = memo.shapes.get(shape_text)
    size = memo.sizes.get((dtype, shape_text))
    pack = packs.memo.get(prefix)
    if shape is None or size is None or pack is None or dtype not in memo.dtypes or not name:
        return None
    return _raw_tensor_entry(name, dtype, shape, digest, size, pack)


def _raw_tensor_entry(name, dtype, shape, digest, size, pack):
    """The entry of a raw tensor in ``pack``, its fields already checked: the frozen dataclasses'
    ``__init__`` costs as much as the rest of parsing the line."""
    ref = _new(ObjectRef)
    ref.__dict__.update(oid=digest, size=size, pack=pack)
    entry = _new(TensorEntry)
    entry.__dict__.update(name=name, dtype=dtype, shape=shape, digest=digest, update=RAW, objects=(ref,))
    return entry


def _raw_size(dtype, shape, where):
    """The size the raw shorthand stands for: the tensor's bytes."""
    from git_theta.dtypes import DTYPES

    if dtype not in DTYPES:
        raise ManifestError(f"unknown dtype {dtype!r}{where}")
    size = DTYPES[dtype].itemsize
    for d in shape:
        size *= d
    return size


def _shape_text(shape):
    """A shape as a manifest line writes it: ``[d0,d1,...]``."""
    return "[" + ",".join(map(str, shape)) + "]"


def _parse_shape(text, where):
    if not (text.startswith("[") and text.endswith("]")):
        raise ManifestError(f"invalid shape {text!r}{where}")
    inner = text[1:-1]
    dims = [] if inner == "" else inner.split(",")
    if len(dims) > MAX_DIMS or not all(_DIGITS.match(d) and len(d) <= 18 for d in dims):
        raise ManifestError(f"invalid shape {text!r}{where}")
    shape = tuple(int(d) for d in dims)
    total = 1
    for d in shape:
        total *= d
    if total > MAX_ELEMENTS:
        raise ManifestError(f"shape {text} is too large{where}")
    return shape
