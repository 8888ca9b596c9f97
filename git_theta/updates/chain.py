"""Encoding one tensor into stored objects and decoding a chain of objects back into its bytes.

A tensor's manifest entry lists its object chain: its own object, then the base it is a delta of,
down to a keyframe. Decoding starts at the keyframe and applies each delta; the result must hash to
the tensor digest, so a corrupt or tampered object is always detected and never written out. When
decoding fails, every object of the chain is checked so the error names the damaged one and the
deltas it breaks.
"""

import hashlib
import itertools
import threading
from collections import OrderedDict

from git_theta.store import container as object_codec
from git_theta import registry as plugins
from git_theta.tensors.buffers import new_buffer
from git_theta.tensors.hashing import RunningDigest, offering
from git_theta.dtypes import nbytes
from git_theta.errors import ManifestError, ObjectCorruptError, ObjectMissingError
from git_theta.manifest import TensorEntry, is_raw
from git_theta.updates.base import TensorData
from git_theta.updates.raw import raw_header


def tensor_digest(data):
    """The tensor digest: sha256 of the raw bytes, hex."""
    return hashlib.sha256(data).hexdigest()


CHECKSUM = "xxh3-128:"  # of the tensor's bytes (objects that also record its digest)
BOUND_CHECKSUM = "xxh3-128d:"  # of the tensor's digest (32 bytes) followed by its bytes


def tensor_checksum(data, digest=None):
    """The read-time checksum an object records of the tensor it decodes to (xxh3-128, tagged).

    With ``digest`` (the tensor's sha256, hex) the checksum covers the digest too, so it also
    fails when a manifest names another tensor for the object: the object need not record the
    digest (64 bytes of header per object, 0.07% of a 15 MB model's new version).
    """
    hasher = checksum_hasher(digest)
    hasher.update(data)
    return _tagged(hasher.hexdigest(), digest)


def checksum_hasher(digest=None):
    """The xxh3-128 hasher of :func:`tensor_checksum`, fed what comes before the tensor's bytes:
    a decoder feeds it the bytes as it writes them (tensors/hashing.py)."""
    import xxhash

    return xxhash.xxh3_128(bytes.fromhex(digest)) if digest is not None else xxhash.xxh3_128()


def _tagged(hexdigest, digest):
    """The checksum text of a hasher's ``hexdigest``, bound to ``digest`` or not."""
    return (CHECKSUM if digest is None else BOUND_CHECKSUM) + hexdigest


def _checksum_seed(entry, checksum):
    """What an object's recorded ``checksum`` covers before the tensor's bytes: the entry's
    digest when the checksum is bound to it, else None."""
    return entry.digest if isinstance(checksum, str) and checksum.startswith(BOUND_CHECKSUM) else None


def encode_update(tensor, update_name="dense", base=None, **options):
    """(update plugin, Encoded) for ``tensor`` in the named update type, or None if it does not apply.

    Nothing is stored: the caller compares sizes and stores the winner with :func:`store_encoded`.
    ``options`` go to the update type (``factors=`` for low-rank, ``scale=`` for ia3).
    """
    update = plugins.get("update", update_name)
    if not update.keyframe and base is None:
        return None
    encoded = update.encode(tensor, base, **options)
    return None if encoded is None else (update, encoded)


def encoded_size(encoded):
    """Payload bytes of an Encoded (what it adds to the store, less the small header)."""
    return sum(len(p) for p in encoded.parts)


def _object_header(tensor, update, encoded, base):
    """The container header bytes of an object storing ``encoded`` for ``tensor``."""
    header = dict(encoded.header)
    header.update(update=update.name, dtype=tensor.dtype, shape=list(tensor.shape))
    header["check"] = tensor_checksum(tensor.data, tensor.digest)
    if not update.keyframe:
        header["base"] = base.digest
    return object_codec.header_bytes(header)


def object_size(tensor, update, encoded, base=None):
    """Bytes of the object :func:`store_encoded` would store (header and payload)."""
    return len(_object_header(tensor, update, encoded, base)) + encoded_size(encoded)


def store_encoded(store, tensor, update, encoded, base=None, base_entry=None):
    """Store an encoding of ``tensor`` and return its TensorEntry (chain extends ``base_entry``'s)."""
    header = _object_header(tensor, update, encoded, base)
    parts = encoded.parts
    if isinstance(parts, list):
        ref = store.put_chunks([header, *parts])
    else:  # an iterator (a huge tensor's dense payload, encoded while it is written)
        ref = store.put_chunks(itertools.chain([header], parts))
    chain = (ref,) + (tuple(base_entry.objects) if not update.keyframe else ())
    entry = TensorEntry(tensor.name, tensor.dtype, tuple(tensor.shape), tensor.digest, update.name, chain)
    if store.trust is not None:  # encoded here from bytes whose digest the caller computed
        store.trust.record([entry])
    return entry


def encode_tensor(store, tensor, update_name="dense", base=None, base_entry=None, **options):
    """Store ``tensor`` (TensorData with digest) with the named update; return its TensorEntry.

    For a delta, ``base`` is the base TensorData and ``base_entry`` its manifest entry (whose chain
    the new entry extends). Returns None when the update type does not apply to this tensor.
    """
    if update_name == "dense" and nbytes(tensor.dtype, tensor.shape) >= store.stream_threshold:
        dense = plugins.get("update", "dense")
        return store_encoded(store, tensor, dense, dense.encode_streamed(tensor, store.threads))
    result = encode_update(tensor, update_name, base, **options)
    if result is None:
        return None
    return store_encoded(store, tensor, *result, base=base, base_entry=base_entry)


def chain_headers(store, entry):
    """The object headers of ``entry``'s chain, own object first, keyframe last (payloads unread).

    Raises ObjectMissingError / ObjectCorruptError like a decode would.
    """
    headers = []
    for ref in entry.objects:
        above = headers[-1].get("base") if headers else entry.digest
        if ref is entry.objects[-1] and ref.oid == above:
            headers.append(raw_header(entry))  # the keyframe is the tensor's bytes (updates/raw.py)
            continue
        header, _ = object_codec.unpack(store.read(ref.oid), ref.oid)
        headers.append(header)
    return headers


def _keyframe_digest(store, entry):
    """The digest the chain's keyframe decodes to, as the chain claims it: the tensor's own for a
    lone keyframe, else the base named by the delta above it (None if that cannot be read)."""
    if len(entry.objects) == 1:
        return entry.digest
    try:
        header, _ = object_codec.unpack(store.read(entry.objects[-2].oid), entry.objects[-2].oid)
    except (ObjectCorruptError, ObjectMissingError):
        return None
    return header.get("base")


def _unpack(store, entry, depth, raw, ref):
    """(header, payload) of the chain's object at ``depth``; a keyframe whose id is the digest it
    decodes to is the tensor's own bytes (raw): equal sha256 means equal bytes."""
    if (
        depth == len(entry.objects) - 1
        and len(raw) == nbytes(entry.dtype, entry.shape)
        and ref.oid == _keyframe_digest(store, entry)
    ):
        return raw_header(entry), memoryview(raw)
    return object_codec.unpack(raw, ref.oid)


def keyframe_entry(entry, headers):
    """A TensorEntry for the keyframe at the bottom of ``entry``'s chain (``headers`` from
    :func:`chain_headers`); its digest is the one the delta above it names as its base."""
    if len(entry.objects) < 2:
        return entry
    digest = headers[-2].get("base")
    if not isinstance(digest, str):
        raise ObjectCorruptError(f"object {entry.objects[-2].oid} names no base")
    return TensorEntry(
        entry.name, entry.dtype, entry.shape, digest, headers[-1].get("update", "dense"), entry.objects[-1:]
    )


class DecodedCache:
    """Decoded intermediate tensors of delta chains, by object id, bounded in bytes (LRU).

    A decoded base is keyed by the object ids of the chain that produced it (its own object down
    to the keyframe), never by one object: a base's header names its base by a digest nobody
    checked, so two chains sharing an object may decode it to different bytes. A base shared by
    several tensors or files in one checkout is decoded once. Only bases of tensors whose final
    digest checked out are cached. Keeping a base costs a copy of it, so a caller that knows which
    bases will be needed again names them (by their own object id) with :meth:`keep_only`.
    """

    def __init__(self, limit):
        self.limit = limit
        self._items = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._wanted = None  # None: every base is worth keeping

    def keep_only(self, oids):
        """From now on keep only these object ids' results (None: keep every one)."""
        self._wanted = None if oids is None else frozenset(oids)

    def wants(self, oid):
        return self.limit > 0 and (self._wanted is None or oid in self._wanted)

    def get(self, chain):
        """The decoded bytes of ``chain`` (a tuple of object ids, own object first), or None."""
        with self._lock:
            data = self._items.get(chain)
            if data is not None:
                self._items.move_to_end(chain)
            return data

    def put(self, chain, data):
        if len(data) > self.limit:
            return
        with self._lock:
            if chain in self._items:
                return
            self._items[chain] = bytes(data)
            self._used += len(data)
            while self._used > self.limit:
                _, old = self._items.popitem(last=False)
                self._used -= len(old)


def _describe_chain(entry):
    """The chain's object ids, shortened; a long (hostile) chain shows its ends and its length."""
    oids = [ref.oid[:12] for ref in entry.objects]
    if len(oids) > 6:
        oids = [*oids[:3], f"... {len(oids) - 5} more ...", *oids[-2:]]
    return " -> ".join(oids)


def check_chain_length(store, entry, where):
    """Refuse a chain longer than the store accepts (``theta.maxChainDepth`` plus a margin) before
    anything of it is read: a hostile manifest can repeat one delta 100,000 times."""
    limit = store.max_chain_objects
    if len(entry.objects) > limit:
        raise ObjectCorruptError(
            f"{where}: chain of {len(entry.objects)} objects (first {entry.objects[0].oid}) is longer "
            f"than {limit}, the most this clone decodes",
            hint="a damaged or hostile manifest; if its chains really are this deep, raise "
            "theta.maxChainDepth (the limit is that plus a margin of 16)",
        )


def _locate_damage(store, entry):
    """(position, oid) of the first object in the chain whose bytes do not match its id, or None."""
    for position, ref in reversed(list(enumerate(entry.objects))):
        try:
            store.read(ref.oid, verify=True)
        except (ObjectCorruptError, ObjectMissingError):
            return position, ref.oid
    return None


def _chain_error(store, entry, where, detail):
    """An ObjectCorruptError naming the tensor, the chain, the damaged object and what it breaks."""
    damaged = _locate_damage(store, entry)
    chain = f"chain {_describe_chain(entry)} ({entry.chain_depth} delta(s) on a keyframe)"
    if damaged is not None:
        position, oid = damaged
        role = (
            "keyframe" if position == len(entry.objects) - 1 else f"delta at depth {len(entry.objects) - 1 - position}"
        )
        broken = f"; it breaks {position} delta(s) above it" if position else ""
        message = f"{where}: object {oid} ({role} of {chain}) is corrupt{broken}: {detail}"
        hint = "run 'git theta fsck' to find every damaged object; refetch them with 'git theta fetch'"
    else:
        message = f"{where}: {chain} does not decode: {detail}"
        hint = (
            "its objects are intact, so the manifest pairs the tensor's digest with objects that "
            "make other bytes: do not use this version; 'git theta fsck' lists every use"
        )
    return ObjectCorruptError(message, hint=hint)


def decode_tensor(store, entry, path="?", cache=None, known=None, strict=False, full=False):
    """Raw bytes of the tensor ``entry`` describes, verified.

    A pair (chain -> digest) this clone has not checked yet (see :mod:`git_theta.store.trust`) is
    verified by hashing the result with sha256, and recorded as trusted when it matches. A trusted
    pair is read with the object's xxh3-128 checksum of the tensor (taken over the digest and the
    bytes): it detects corrupt objects and decoder faults at a tenth of the cost, but proves
    nothing on its own, since the object's author chose it. ``full`` (fsck) always hashes with
    sha256; objects written before checksums existed are always checked that way. A chain longer
    than ``store.max_chain_objects`` is refused before any object is read.

    ``cache`` (a :class:`DecodedCache`) shares decoded bases between tensors. ``known`` is an
    optional ``(TensorEntry, bytes)`` already decoded (e.g. the older side of a diff): when
    ``entry``'s chain extends that entry's chain, decoding starts from those bytes. Errors name the
    file, the tensor, the chain and the damaged object.

    The final digest check is what guarantees the result. Checking every intermediate base against
    the digest its delta names (``strict``) costs one more sha256 pass per level, so it is done
    only to explain a failure: a failed decode is retried strictly, without the cache, and that
    retry's error says which object and which link of the chain is wrong.
    """
    check_chain_length(store, entry, f"{path}: tensor {entry.name!r}")
    try:
        return _decode_chain(store, entry, path, cache, known, strict, full)
    except ObjectCorruptError:
        if strict:
            raise
    return _decode_chain(store, entry, path, None, None, True, True)


def _usable(checksum):
    """True for a read-time checksum this version knows how to check."""
    return isinstance(checksum, str) and (checksum.startswith(BOUND_CHECKSUM) or checksum.startswith(CHECKSUM))


def _own_copy(data):
    """A copy of ``data`` the chain walk owns, so the deltas above it may decode in place."""
    view = memoryview(data).cast("B")
    copy = new_buffer(len(view))
    copy[:] = view
    return copy


def _decode_chain(store, entry, path, cache, known, strict, full=False):
    where = f"{path}: tensor {entry.name!r}"
    if not entry.objects:
        raise ManifestError(f"{where}: no objects listed")
    objects = list(entry.objects)
    # Start at the nearest cached level (cached only after a decode through it was verified).
    start, data, expected_base = len(objects) - 1, None, None
    if cache is not None:
        for position in range(1, len(objects)):
            cached = cache.get(tuple(ref.oid for ref in objects[position:]))
            if cached is not None:
                start, data = position - 1, _own_copy(cached)
                expected_base = tensor_digest(data) if strict else None
                break
    if known is not None:
        base_entry, base_data = known
        depth = len(objects) - len(base_entry.objects)
        if 0 < depth <= start and tuple(objects[depth:]) == tuple(base_entry.objects):
            start, data, expected_base = depth - 1, _own_copy(base_data), base_entry.digest
    immediate_base, top, running = None, {}, None
    # Whether a trusted pair's xxh3 checksum may stand in for sha256 (known before decoding).
    fast_ok = not (full or strict) and store.trust is not None and store.trust.trusted(entry)
    try:
        for depth in range(start, -1, -1):
            ref = objects[depth]
            header, payload, update = _read_placed(store, entry, where, depth)
            top = header  # ends as the tensor's own object's header (depth 0 is always read)
            if strict and not update.keyframe and header.get("base") != expected_base:
                raise ObjectCorruptError(f"object {ref.oid} is a delta of a different base")
            spec = TensorData(entry.name, entry.dtype, entry.shape, None)
            if depth == 0:
                # The final bytes will be checked, with sha256 or the object's checksum: offer
                # the decoder a running digest it can feed while each piece is in cache
                # (tensors/hashing.py), not a pass over the whole tensor afterwards.
                check = header.get("check")
                hasher = checksum_hasher(_checksum_seed(entry, check)) if fast_ok and _usable(check) else None
                running = RunningDigest(nbytes(entry.dtype, entry.shape), hasher)
            try:
                with offering(running):
                    data = update.decode(header, payload, data, spec, ref.oid)
            except MemoryError:  # a tampered manifest and object can claim any shape
                raise ObjectCorruptError(
                    f"object {ref.oid} claims a {entry.dtype} {list(entry.shape)} tensor, too large to decode here"
                ) from None
            if len(data) != nbytes(entry.dtype, entry.shape):
                raise ObjectCorruptError(f"object {ref.oid} decodes to the wrong size")
            if depth > 0 and strict:
                expected_base = tensor_digest(data)
            if depth == 1 and cache is not None and cache.wants(ref.oid):
                # cached once the result is verified
                immediate_base = (tuple(r.oid for r in objects[1:]), bytes(data))
    except ObjectCorruptError as exc:
        raise _chain_error(store, entry, where, exc.message) from None
    _check_recorded_digest(store, entry, where, top)
    _verify(store, entry, where, top, running, data, fast_ok)
    if immediate_base is not None:
        cache.put(*immediate_base)
    return data


def _read_placed(store, entry, where, depth):
    """``(header, payload, update type)`` of the object at ``depth`` of ``entry``'s chain, read and
    checked to belong there (:func:`_check_placed`); ObjectMissingError, naming the tensor and its
    chain, when it is not in the store."""
    ref = entry.objects[depth]
    try:
        raw = store.read(ref.oid)
    except ObjectMissingError:
        raise ObjectMissingError(
            f"{where}: object {ref.oid} is missing (chain {_describe_chain(entry)})",
            hint="fetch it with 'git theta fetch' (or restore it from a clone that has it)",
            oids=[ref.oid],
        ) from None
    header, payload = _unpack(store, entry, depth, raw, ref)
    update = plugins.get("update", header["update"], needed_by=f"{where}, object {ref.oid}")
    _check_placed(header, update, entry, depth, ref)
    return header, payload, update


def _check_placed(header, update, entry, depth, ref):
    """Refuse an object of the chain at ``depth`` whose header describes another tensor, or a
    keyframe anywhere but at the chain's end (and a delta there)."""
    if header.get("dtype") != entry.dtype or tuple(header.get("shape", ())) != entry.shape:
        raise ObjectCorruptError(
            f"object {ref.oid} holds a {header.get('dtype')} {header.get('shape')} tensor, "
            f"the manifest says {entry.dtype} {list(entry.shape)}"
        )
    if update.keyframe != (depth == len(entry.objects) - 1):
        raise ObjectCorruptError(f"object {ref.oid} is out of place in the chain")


def _check_recorded_digest(store, entry, where, top):
    """Refuse a tensor's own object (header ``top``) that records another digest than the entry."""
    recorded = top.get("digest")
    if recorded is not None and recorded != entry.digest:
        raise _chain_error(
            store,
            entry,
            where,
            f"the object decodes to the tensor with digest "
            f"{str(recorded)[:12]}, the manifest names digest {entry.digest[:12]} "
            "(the manifest was altered)",
        )


def _verify(store, entry, where, top, running, data, fast_ok):
    """The final check of a decoded tensor: ``running`` (what the decoder fed, or None) or else
    ``data`` hashed whole, against the object's checksum (a pair this clone trusts, ``fast_ok``)
    or the entry's sha256 digest, which then makes the pair trusted. ``data`` None: the bytes
    were handed on as they were decoded, so ``running`` must have had every one, in order."""
    fed = running and running.hexdigest()
    if data is None and not fed:
        raise _chain_error(store, entry, where, "the decoder did not give every byte of the tensor once, in order")
    checksum = top.get("check")
    # The object's checksum was chosen by whoever wrote the object: it only stands in for sha256
    # on a pair this clone has verified or encoded itself (the trust ledger, DESIGN §12).
    if fast_ok and _usable(checksum):
        seed = _checksum_seed(entry, checksum)
        if (_tagged(fed, seed) if fed else tensor_checksum(data, seed)) != checksum:
            raise _chain_error(store, entry, where, "decoded bytes do not match the recorded checksum")
    elif (fed or tensor_digest(data)) != entry.digest:
        raise _chain_error(
            store,
            entry,
            where,
            "decoded bytes do not match the tensor digest "
            "(the object is forged or damaged, or the manifest was altered)",
        )
    elif store.trust is not None and not is_raw(entry):  # a raw pair needs no ledger: id == digest
        store.trust.record([entry])


def streamable(store, entry):
    """True when a checkout may write ``entry``'s tensor a piece at a time as it decodes
    (:func:`stream_tensor`): one keyframe object of at least ``theta.streamThreshold`` bytes."""
    return len(entry.objects) == 1 and not is_raw(entry) and nbytes(entry.dtype, entry.shape) >= store.stream_threshold


def stream_tensor(store, entry, path="?"):
    """Yield the bytes of a :func:`streamable` entry's tensor a piece at a time as its update
    type decodes them (``decode_pieces``), with no tensor-sized buffer; a type without
    ``decode_pieces`` gives its :func:`decode_tensor` result as one piece.

    The check :func:`decode_tensor` makes before it returns (sha256, or a trusted pair's
    checksum) is made on the pieces as they pass and settled after the last one: a mismatch
    raises ObjectCorruptError only then. So this is only for a consumer that discards all it
    was given when that happens: git's filter protocol, where the file then ends with
    ``status=error`` and git writes none of it. Each piece is valid until the next is asked for.
    """
    where = f"{path}: tensor {entry.name!r}"
    ref = entry.objects[0]
    try:
        header, payload, update = _read_placed(store, entry, where, 0)
    except ObjectCorruptError as exc:
        raise _chain_error(store, entry, where, exc.message) from None
    _check_recorded_digest(store, entry, where, header)
    pieces = getattr(update, "decode_pieces", None)
    if pieces is None:
        del payload
        yield decode_tensor(store, entry, path)
        return
    fast_ok = store.trust is not None and store.trust.trusted(entry)
    check = header.get("check")
    hasher = checksum_hasher(_checksum_seed(entry, check)) if fast_ok and _usable(check) else None
    running = RunningDigest(nbytes(entry.dtype, entry.shape), hasher)
    spec = TensorData(entry.name, entry.dtype, entry.shape, None)
    try:
        for start, piece in pieces(header, payload, spec, ref.oid):
            running.feed(start, piece)
            yield piece
    except ObjectCorruptError as exc:
        raise _chain_error(store, entry, where, exc.message) from None
    _verify(store, entry, where, header, running, None, fast_ok)
