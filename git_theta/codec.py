"""Encoding one tensor into stored objects and decoding a chain of objects back into its bytes.

A tensor's manifest entry lists its object chain: its own object, then the base it is a delta of,
down to a keyframe. Decoding starts at the keyframe and applies each delta; the result must hash to
the tensor digest, so a corrupt or tampered object is always detected and never written out.
"""

import hashlib

from . import object_codec, plugins
from .dtypes import nbytes
from .errors import ManifestError, ObjectCorruptError, ObjectMissingError
from .manifest import TensorEntry
from .updates.base import TensorData


def tensor_digest(data):
    """The tensor digest: sha256 of the raw bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def encode_tensor(store, tensor, update_name="dense", base=None, base_entry=None):
    """Store ``tensor`` (TensorData with digest) with the named update; return its TensorEntry.

    For a delta, ``base`` is the base TensorData and ``base_entry`` its manifest entry (whose chain
    the new entry extends). Returns None when the update type does not apply to this tensor.
    """
    update = plugins.get("update", update_name)
    encoded = update.encode(tensor, base)
    if encoded is None:
        return None
    header = dict(encoded.header)
    header.update(update=update.name, dtype=tensor.dtype, shape=list(tensor.shape))
    if not update.keyframe:
        header["base"] = base.digest
    ref = store.put_chunks([object_codec.header_bytes(header), *encoded.parts])
    chain = (ref,) + (tuple(base_entry.objects) if not update.keyframe else ())
    return TensorEntry(tensor.name, tensor.dtype, tuple(tensor.shape), tensor.digest, update.name, chain)


def decode_tensor(store, entry, path="?", known=None):
    """Raw bytes of the tensor ``entry`` describes, verified against its digest.

    ``known`` is an optional ``(TensorEntry, bytes)`` already decoded (e.g. the older side of a
    diff): when ``entry``'s chain extends that entry's chain, decoding starts from those bytes
    instead of the keyframe. Errors name the file, the tensor and the object.
    """
    where = f"{path}: tensor {entry.name!r}"
    if not entry.objects:
        raise ManifestError(f"{where}: no objects listed")
    data = None
    expected_base = None
    start = len(entry.objects)
    if known is not None:
        base_entry, base_data = known
        depth = len(entry.objects) - len(base_entry.objects)
        if depth > 0 and tuple(entry.objects[depth:]) == tuple(base_entry.objects):
            start, data, expected_base = depth, base_data, base_entry.digest
    # Walk the chain from the keyframe (last) to the tensor's own object (first).
    for depth, ref in reversed(list(enumerate(entry.objects[:start]))):
        try:
            raw = store.read(ref.oid)
        except ObjectMissingError:
            raise ObjectMissingError(
                f"{where}: object {ref.oid} is missing",
                hint="fetch it with 'git theta fetch' (or restore it from a clone that has it)",
                oids=[ref.oid],
            ) from None
        try:
            header, payload = object_codec.unpack(raw, ref.oid)
            update = plugins.get("update", header["update"], needed_by=f"{where}, object {ref.oid}")
            if header.get("dtype") != entry.dtype or tuple(header.get("shape", ())) != entry.shape:
                raise ObjectCorruptError(
                    f"object {ref.oid} holds a {header.get('dtype')} {header.get('shape')} tensor, "
                    f"the manifest says {entry.dtype} {list(entry.shape)}"
                )
            if update.keyframe != (depth == len(entry.objects) - 1):
                raise ObjectCorruptError(f"object {ref.oid} is out of place in the chain")
            if not update.keyframe and header.get("base") != expected_base:
                raise ObjectCorruptError(f"object {ref.oid} is a delta of a different base")
            spec = TensorData(entry.name, entry.dtype, entry.shape, None)
            data = update.decode(header, payload, data, spec, ref.oid)
        except ObjectCorruptError as exc:
            raise ObjectCorruptError(
                f"{where}: {exc.message}", hint="run 'git theta fsck' to find every damaged object"
            ) from None
        if len(data) != nbytes(entry.dtype, entry.shape):
            raise ObjectCorruptError(f"{where}: object {ref.oid} decodes to the wrong size")
        expected_base = None if depth == 0 else tensor_digest(data)
    actual = tensor_digest(data)
    if actual != entry.digest:
        raise ObjectCorruptError(
            f"{where}: decoded bytes do not match the tensor digest (object {entry.objects[0].oid} "
            "or its chain is corrupt, or the manifest was altered)",
            hint="run 'git theta fsck'; refetch damaged objects with 'git theta fetch'",
        )
    return data
