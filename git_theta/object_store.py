"""The content-addressed object store shared by all worktrees of a repository.

Objects live at ``<git common dir>/theta/objects/ab/cd/<oid>`` where the oid is the sha256 of the
stored bytes, exactly the Git LFS object id, so any LFS server can hold them unchanged. Writes go to
a temporary file on the same file system, are fsynced and renamed into place, so a crash never leaves
a partial object under a real name. A reader that finds an object whose bytes no longer match its id
reports it; nothing corrupt is ever returned as good data.
"""

import hashlib
import os
import tempfile
from pathlib import Path

from .errors import DiskFullError, ObjectCorruptError, ObjectMissingError
from .manifest import ObjectRef, check_oid
from .settings import DEFAULTS
from .store.trust import max_chain_objects
from .testhooks import kill_point

READ_CHUNK = 1 << 20


class ObjectStore:
    """Content-addressed storage of immutable byte objects."""

    def __init__(self, root, fsync=True, max_object_size=0):
        self.root = Path(root)
        self.fsync = fsync
        self.max_object_size = max_object_size  # 0: never split (see chunked.py)
        # Set by the repository (Repo.store): the trust ledger and the longest chain decoding
        # accepts. Without a ledger nothing is trusted, so every decode is sha256-verified.
        self.trust = None
        self.max_chain_objects = max_chain_objects(DEFAULTS["maxChainDepth"][0])
        self._tmp = self.root / "tmp"

    def path(self, oid):
        """Filesystem path of an object (the oid is validated: never a path fragment)."""
        check_oid(oid)
        return self.root / oid[:2] / oid[2:4] / oid

    def has(self, oid):
        return self.path(oid).is_file()

    def freshen(self, oid):
        """Mark an object as just used (its mtime); False when it is not present.

        Writers that find an object already stored, and clean when it reuses one, call this
        instead of :meth:`has`: ``git theta prune`` keeps recently touched objects and re-checks
        the time after moving an object aside, so an object being reused is never lost (the same
        rule as git's loose objects).
        """
        try:
            os.utime(self.path(oid))
            return True
        except FileNotFoundError:
            return False
        except PermissionError:  # a shared, read-only store: present, but prune is not ours to run
            return self.has(oid)

    def size(self, oid):
        """Stored size of an object, or None when it is not present."""
        try:
            return self.path(oid).stat().st_size
        except FileNotFoundError:
            return None

    def put_chunks(self, chunks, expect=None, split=True):
        """Store the concatenation of ``chunks`` (bytes-like); return its ObjectRef.

        Hashes while writing, so the data is never held twice. Writing an object that already
        exists costs the temp file only and leaves the existing object untouched. With ``expect``
        (an ObjectRef, e.g. a download) bytes whose size or sha256 differ never enter the store:
        the temp file is removed and ObjectCorruptError raised.
        """
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="obj-")
        except OSError as exc:
            DiskFullError.check(exc, self.root, "storing an object")
            raise
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                if self.fsync:
                    out.flush()
                    os.fsync(out.fileno())
            kill_point()
            oid = digest.hexdigest()
            if expect is not None and (oid, size) != (expect.oid, expect.size):
                raise ObjectCorruptError(
                    f"object {expect.oid} arrived corrupt: {size} bytes hashing to {oid[:12]}…, "
                    f"expected {expect.size} bytes",
                    hint="the copy on the remote is damaged; re-push it from a clone that has it",
                )
            if split and expect is None and self.max_object_size and size > self.max_object_size:
                return self._split(tmp_name, oid, size)
            final = self.path(oid)
            if self.size(oid) == size and self.freshen(oid):
                os.unlink(tmp_name)
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp_name, final)
            kill_point()
            return ObjectRef(oid, size)
        except BaseException as exc:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            DiskFullError.check(exc, self.root, "storing an object")
            raise

    def put_bytes(self, data):
        return self.put_chunks([data])

    def _split(self, tmp_name, oid, size):
        """Store an over-large object as parts plus a chunk index; return the index's ref."""
        from . import chunked

        step = self.max_object_size
        parts = []
        with open(tmp_name, "rb") as handle:
            for offset in range(0, size, step):
                parts.append(self.put_chunks(_blocks(handle, min(step, size - offset)), split=False))
        os.unlink(tmp_name)
        return self.put_chunks([chunked.index_bytes(size, oid, parts)], split=False)

    def chunk_parts(self, refs):
        """The parts of every chunk index among ``refs`` that is present locally."""
        from . import chunked

        parts = []
        for ref in refs:
            if ref.size > chunked.MAX_INDEX or len(chunked.MAGIC) > ref.size:
                continue
            try:
                with open(self.path(ref.oid), "rb") as handle:
                    data = handle.read(chunked.MAX_INDEX)
            except FileNotFoundError:
                continue
            index = chunked.as_index(data, ref.oid)
            if index is not None:
                parts.extend(index[2])
        return parts

    def missing(self, refs):
        """The refs (and parts of chunked objects) that are not in the store."""
        absent = [r for r in refs if not self.has(r.oid)]
        return absent + [p for p in self.chunk_parts(refs) if not self.has(p.oid)]

    def read(self, oid, verify=False):
        """Return an object's bytes. With ``verify`` the sha256 is checked against the id.

        Readers that check the decoded tensor against its digest may skip ``verify``: that end to
        end check is stronger and catches the same corruption.
        """
        try:
            data = _map(self.path(oid))
        except FileNotFoundError:
            raise ObjectMissingError(f"object {oid} is missing", oids=[oid]) from None
        if verify:
            self.verify_bytes(oid, data)
        from . import chunked

        index = chunked.as_index(data, oid)
        if index is not None:
            return chunked.assemble(oid, index, lambda part: self.read(part, verify=True))
        return data

    def verify(self, oid, size=None):
        """Check a stored object by streaming it through sha256 (memory: one chunk).

        Raises ObjectMissingError, or ObjectCorruptError when its size or hash is wrong.
        """
        digest = hashlib.sha256()
        actual_size = 0
        try:
            with open(self.path(oid), "rb") as handle:
                while chunk := handle.read(READ_CHUNK):
                    digest.update(chunk)
                    actual_size += len(chunk)
        except FileNotFoundError:
            raise ObjectMissingError(f"object {oid} is missing", oids=[oid]) from None
        if size is not None and actual_size != size:
            raise ObjectCorruptError(
                f"object {oid} has {actual_size} bytes, the manifest says {size}",
                hint="delete it and fetch it again: git theta fsck --repair",
            )
        if digest.hexdigest() != oid:
            raise ObjectCorruptError(
                f"object {oid} is corrupt (its bytes hash to {digest.hexdigest()[:12]}…)",
                hint="delete it and fetch it again: git theta fsck --repair",
            )

    @staticmethod
    def verify_bytes(oid, data):
        actual = hashlib.sha256(data).hexdigest()
        if actual != oid:
            raise ObjectCorruptError(
                f"object {oid} is corrupt (its bytes hash to {actual[:12]}…)",
                hint="delete it and fetch it again: git theta fetch",
            )

    def iter_oids(self):
        """Every oid present in the store."""
        if not self.root.is_dir():
            return
        for first in sorted(self.root.iterdir()):
            if len(first.name) != 2 or not first.is_dir():
                continue
            for second in sorted(first.iterdir()):
                for obj in sorted(second.iterdir()):
                    if len(obj.name) == 64:
                        yield obj.name


def _blocks(handle, count, block=1 << 20):
    """Yield ``count`` bytes of ``handle`` in blocks."""
    while count > 0:
        data = handle.read(min(block, count))
        if not data:
            raise OSError("object file shrank while it was being split")
        count -= len(data)
        yield data


MAP_THRESHOLD = 1 << 20


def _map(path):
    """An object's bytes: small ones read, large ones memory-mapped read-only.

    Mapping saves copying a large object out of the page cache before it is decoded. Objects are
    never rewritten in place (writes go to a temp file renamed over the name), so a mapping never
    sees its file change under it.
    """
    import mmap

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < MAP_THRESHOLD:
            return f.read()
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
