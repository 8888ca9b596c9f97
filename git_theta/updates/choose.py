"""The automatic choice of update type for a changed tensor: the smallest exact encoding wins.

Candidates are the update types that declare ``auto = True`` (built-ins and plugins alike). Those
whose size scales with the data (``sampled = True``: dense, sparse, int-delta) are compared on a
sample of evenly spaced blocks of the tensor; the winner is then encoded in full. A candidate with
an ``encode_if_cheap(tensor, base)`` method (sparse: when few elements changed, encoding them all
costs one comparison pass) is measured exactly instead. Candidates that need the whole tensor's
structure (low-rank) are tried in full only when the sampled winner leaves room for them, before
the winner is encoded: one far smaller than the winner's estimate wins without the winner being
encoded at all. If the full encoding of the winner turns out larger than the dense estimate, dense
is encoded too and the smaller kept, so a bad sample can cost time but never space.
"""

import numpy as np

from git_theta import registry as plugins
from git_theta.tensors.bits import as_bits
from git_theta.updates.chain import encode_update, encoded_size
from git_theta.dtypes import get_dtype
from git_theta.updates.base import TensorData

SAMPLE_BLOCKS = 16
BLOCK_ELEMENTS = 4096
#: a structural candidate (low-rank) is tried only if the best sampled ratio is above this
STRUCTURAL_MIN_RATIO = 0.02
#: tensors smaller than this are not tried with structural candidates: a factorization of a
#: 16 KiB matrix saves a few KiB at most, and trying it costs more than hashing, reading and packing
#: the whole tensor (a 20,000-tensor checkpoint with 1% changed spent 60% of its add in them)
STRUCTURAL_MIN_BYTES = 16 << 10
#: a structural encoding this far below the sampled winner's estimate is kept without encoding the
#: winner in full (estimates are within ~10% of the real size; this leaves room for a bad sample)
CLEAR_WIN = 0.5
#: a sampled whole-tensor delta estimated at more than this times the chain's room is not encoded
#: in full (the chain rule would turn it down for a keyframe); the margin covers a bad sample
ROOM_MARGIN = 1.25


def _candidates():
    found = [u for u in plugins.all_plugins("update") if getattr(u, "auto", False) or u.name == "dense"]
    return [u for u in found if getattr(u, "sampled", True)], [u for u in found if not getattr(u, "sampled", True)]


def sample(tensor, base):
    """(new sample, base sample): the same evenly spaced blocks of both, as flat TensorData."""
    new_bits, base_bits = as_bits(tensor.data, tensor.dtype), as_bits(base.data, base.dtype)
    total = len(new_bits)
    starts = np.linspace(0, total - BLOCK_ELEMENTS, SAMPLE_BLOCKS).astype(np.int64)
    pick = (starts[:, None] + np.arange(BLOCK_ELEMENTS)[None, :]).ravel()
    count = len(pick)
    return (
        TensorData(tensor.name, tensor.dtype, (count,), new_bits[pick].tobytes(), tensor.digest),
        TensorData(base.name, base.dtype, (count,), base_bits[pick].tobytes(), base.digest),
    )


def choose(tensor, base, room=None):
    """(update plugin, Encoded) of the smallest exact encoding of ``tensor`` against ``base``.

    ``base`` may be None (no usable base: dense). ``room`` is the most bytes a delta may take
    (the chain rule, :func:`git_theta.tensors.keyframes.chain_room`): when the sampled winner is
    a whole-tensor delta estimated well past it, nothing is encoded and None comes back, for the
    caller to store a keyframe as the rule would have it anyway (a dense fine-tune of a 1 GiB
    tensor otherwise encoded its 0.8 GB int-delta in full only to throw it away).
    """
    sampled, structural = _candidates()
    if base is None:
        return encode_update(tensor, "dense")
    elements = len(tensor.data) // max(1, get_dtype(tensor.dtype).itemsize)
    if elements <= SAMPLE_BLOCKS * BLOCK_ELEMENTS:
        # Small tensor: encoding every candidate in full is as cheap as estimating.
        results = [r for r in (encode_update(tensor, u.name, base) for u in sampled) if r is not None]
        best = min(results, key=lambda r: encoded_size(r[1]))
        best_size, dense_size = encoded_size(best[1]), None
    else:
        new_s, base_s = sample(tensor, base)
        scale = elements / (len(new_s.data) // get_dtype(tensor.dtype).itemsize)
        estimates, done = {}, {}
        for update in sampled:
            # Exact when the full encoding is as cheap as a pass over the data (sparse with few
            # changes): small samples of a sparse change compress badly and mislead the estimate.
            cheap = getattr(update, "encode_if_cheap", None)
            encoded = cheap(tensor, base) if cheap is not None else None
            if encoded is not None:
                done[update.name] = (update, encoded)
                estimates[update.name] = encoded_size(encoded)
                continue
            result = encode_update(new_s, update.name, base_s)
            if result is not None:
                estimates[update.name] = encoded_size(result[1]) * scale
        winner = min(estimates, key=estimates.get)
        # A structural candidate far below the sampled winner's estimate (a merged LoRA: ~0.04
        # of the raw size against ~0.4) wins without encoding the winner in full first.
        tried = _structural(tensor, base, structural, estimates[winner])
        if tried is not None and encoded_size(tried[1]) <= CLEAR_WIN * estimates[winner]:
            return tried
        # A whole-tensor delta's size scales with the data, so its sampled estimate holds (a
        # sparse one's may not: a small sample of a sparse change compresses badly).
        whole = getattr(next((u for u in sampled if u.name == winner), None), "full_pass", True)
        if (
            room is not None
            and winner != "dense"
            and winner not in done
            and whole
            and estimates[winner] > ROOM_MARGIN * room
        ):
            return tried if tried is not None and encoded_size(tried[1]) <= room else None
        best = done.get(winner) or encode_update(tensor, winner, base) or encode_update(tensor, "dense")
        best_size, dense_size = encoded_size(best[1]), estimates.get("dense")
        for result in done.values():  # an estimate that came out too low loses to exact sizes
            if encoded_size(result[1]) < best_size:
                best, best_size = result, encoded_size(result[1])
        if winner != "dense" and dense_size is not None and best_size > dense_size:
            dense = encode_update(tensor, "dense")
            if encoded_size(dense[1]) < best_size:
                best, best_size = dense, encoded_size(dense[1])
        if tried is not None and encoded_size(tried[1]) < best_size:
            best = tried
        return best
    tried = _structural(tensor, base, structural, best_size)
    return tried if tried is not None and encoded_size(tried[1]) < best_size else best


def _structural(tensor, base, structural, best_size):
    """The smallest full encoding by a structural candidate (low-rank), or None.

    Tried only on tensors of STRUCTURAL_MIN_BYTES or more, when the best so far leaves room
    (above STRUCTURAL_MIN_RATIO of the raw size).
    """
    found = None
    if len(tensor.data) >= STRUCTURAL_MIN_BYTES and best_size > STRUCTURAL_MIN_RATIO * len(tensor.data):
        for update in structural:
            result = encode_update(tensor, update.name, base)
            if result is not None and (found is None or encoded_size(result[1]) < encoded_size(found[1])):
                found = result
    return found
