"""``low-rank``: a 2-D change that is (nearly) low rank, as after merging a LoRA adapter.

The change ``new - base`` is approximated by factors ``A`` (m x r) and ``B`` (r x n) found by a
randomized SVD and stored as float32. The prediction ``base + A @ B`` is computed in a fixed order
with float64 elementwise operations (one rank-1 term at a time, never BLAS, whose summation order
differs between machines), rounded to the tensor's dtype, and an exact residual (zigzag integer
difference of bit patterns) makes the result bit-exact. Supplied factors (a PEFT adapter) are
stored the same way.
"""

import numpy as np

from ..bits import as_bits, from_float, to_float
from ..dtypes import get_dtype
from ..errors import ObjectCorruptError
from ..planes import decode_sections, encode_sections
from .base import Encoded, UpdateType
from .int_delta import apply_zigzag_delta, zigzag_delta

LOW_RANK_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_RANK = 64
SEED = 0x7E7A  # fixed: the factorisation must not depend on the machine or the run


def predict(base_values, a, b, dtype):
    """Bit patterns of ``base + a @ b`` rounded to ``dtype``, computed deterministically."""
    acc = np.array(base_values, dtype=np.float64, copy=True)
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    for k in range(a64.shape[1]):
        acc += np.multiply.outer(a64[:, k], b64[k, :])
    return np.frombuffer(from_float(acc, dtype), dtype=get_dtype(dtype).bits_name)


def randomized_factors(delta, max_rank=MAX_RANK, tolerance=1e-6):
    """Factors (a, b) of the smallest rank <= max_rank explaining ``delta`` to ``tolerance``.

    Returns None when no such rank exists (the change is not low rank).
    """
    m, n = delta.shape
    limit = min(max_rank, m // 4, n // 4)
    if limit < 1:
        return None
    rng = np.random.default_rng(SEED)
    sketch = delta @ rng.standard_normal((n, limit + 8))
    q, _ = np.linalg.qr(sketch)
    small = q.T @ delta
    u, s, vt = np.linalg.svd(small, full_matrices=False)
    total = float(np.sum(delta * delta))
    if total == 0.0:
        return None
    energy = np.cumsum(s * s)
    for rank in range(1, limit + 1):
        if total - energy[rank - 1] <= tolerance * total:
            a = (q @ u[:, :rank]) * s[:rank]
            return a.astype(np.float32), vt[:rank].astype(np.float32)
    return None


def low_rank_cost_estimate(delta):
    """Cheap check: relative energy left outside a rank-``MAX_RANK`` sketch (0 = exactly low rank)."""
    m, n = delta.shape
    limit = min(MAX_RANK, m // 4, n // 4)
    if limit < 1:
        return 1.0
    rng = np.random.default_rng(SEED)
    sketch = delta @ rng.standard_normal((n, limit + 8))
    q, _ = np.linalg.qr(sketch)
    projected = q @ (q.T @ delta)
    total = float(np.sum(delta * delta))
    return float(np.sum((delta - projected) ** 2)) / total if total else 1.0


def encode_with_factors(tensor, base, a, b):
    """Encoded factors plus the exact residual of the prediction they give."""
    shape = tuple(tensor.shape)
    base_values = to_float(base.data, base.dtype, shape)
    predicted = predict(base_values, a, b, tensor.dtype)
    residual = zigzag_delta(as_bits(tensor.data, tensor.dtype), predicted)
    parts, sections = encode_sections([a.ravel(), b.ravel(), residual])
    return Encoded({"rank": int(a.shape[1]), "sections": sections}, parts)


class LowRankUpdate(UpdateType):
    """A delta stored as low-rank factors plus an exact residual (2-D float tensors only)."""

    name = "low-rank"

    def applies(self, tensor):
        return len(tensor.shape) == 2 and tensor.dtype in LOW_RANK_DTYPES and min(tensor.shape) >= 4

    def encode(self, tensor, base=None, factors=None):
        if base is None or not self.applies(tensor):
            return None
        if factors is None:
            shape = tuple(tensor.shape)
            delta = to_float(tensor.data, tensor.dtype, shape) - to_float(base.data, base.dtype, shape)
            delta[~np.isfinite(delta)] = 0.0  # inf/nan changes are left to the exact residual
            factors = randomized_factors(delta)
            if factors is None:
                return None
        return encode_with_factors(tensor, base, *factors)

    def decode(self, header, payload, base, spec, oid="?"):
        sections = header.get("sections")
        rank = header.get("rank")
        if not isinstance(sections, list) or len(sections) != 3 or not isinstance(rank, int) or len(spec.shape) != 2:
            raise ObjectCorruptError(f"object {oid} has a corrupt header")
        m, n = spec.shape
        a, b, residual = decode_sections(payload, sections, oid)
        if a.size != m * rank or b.size != rank * n or a.dtype != np.float32 or b.dtype != np.float32:
            raise ObjectCorruptError(f"object {oid}: low-rank factors have the wrong size")
        predicted = predict(to_float(base, spec.dtype, spec.shape), a.reshape(m, rank), b.reshape(rank, n), spec.dtype)
        if residual.size != predicted.size or residual.dtype.itemsize != predicted.dtype.itemsize:
            raise ObjectCorruptError(f"object {oid}: residual has the wrong size")
        return bytearray(apply_zigzag_delta(predicted, residual.view(predicted.dtype)).tobytes())
