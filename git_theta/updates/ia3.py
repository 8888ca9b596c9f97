"""``ia3``: a change that scales the base tensor along some axes, as an (IA)^3 adapter does.

Only stored when the user supplies the scaling vector (``git theta add --update-type ia3
--update-path ...``, the older git-theta's ``<param>/ia3`` side-load naming): the prediction
``base * scale`` (``scale`` broadcast over the tensor) is computed elementwise in float64, rounded
to the tensor's dtype, and an exact residual (:mod:`.residual`) makes the result bit-exact.
"""

import numpy as np

from git_theta.tensors.bits import as_bits, from_float, to_float
from git_theta.dtypes import element_count, get_dtype
from git_theta.errors import ObjectCorruptError
from git_theta.tensors.planes import decode_sections, encode_sections
from git_theta.updates.base import Encoded, UpdateType
from git_theta.updates.residual import decode_residual, encode_residual
from git_theta.updates.low_rank import LOW_RANK_DTYPES


def predict(base_values, scale, dtype):
    """Bit patterns of ``base * scale`` rounded to ``dtype`` (elementwise float64, deterministic)."""
    with np.errstate(all="ignore"):
        values = base_values * np.asarray(scale, dtype=np.float64)
    return np.frombuffer(from_float(values, dtype), dtype=get_dtype(dtype).bits_name)


def broadcast_shape(scale_shape, shape):
    """``scale_shape`` padded on the left to the tensor's rank, or None if it does not broadcast."""
    if len(scale_shape) > len(shape):
        return None
    padded = (1,) * (len(shape) - len(scale_shape)) + tuple(scale_shape)
    if any(s not in (1, d) for s, d in zip(padded, shape)):
        return None
    return padded


class IA3Update(UpdateType):
    """A delta stored as a broadcast scaling vector plus an exact residual."""

    name = "ia3"

    def encode(self, tensor, base=None, scale=None):
        if base is None or scale is None or tensor.dtype not in LOW_RANK_DTYPES:
            return None
        scale = np.asarray(scale, dtype=np.float32)
        shape = broadcast_shape(scale.shape, tuple(tensor.shape))
        if shape is None:
            return None
        scale = scale.reshape(shape)
        predicted = predict(to_float(base.data, base.dtype, tuple(tensor.shape)), scale, tensor.dtype)
        mode, residual_parts, residual_sections = encode_residual(as_bits(tensor.data, tensor.dtype), predicted)
        parts, sections = encode_sections([scale.ravel()])
        header = {"scale_shape": list(shape), "residual": mode, "sections": sections + residual_sections}
        return Encoded(header, parts + residual_parts)

    def decode(self, header, payload, base, spec, oid="?"):
        sections = header.get("sections")
        shape = header.get("scale_shape")
        if (
            not isinstance(sections, list)
            or len(sections) < 2
            or not isinstance(shape, list)
            or broadcast_shape(shape, tuple(spec.shape)) != tuple(shape)
        ):
            raise ObjectCorruptError(f"object {oid} has a corrupt header")
        scale, *residual = decode_sections(payload, sections, oid)
        if scale.dtype != np.float32 or scale.size != element_count(shape):
            raise ObjectCorruptError(f"object {oid}: scaling vector has the wrong size")
        predicted = predict(to_float(base, spec.dtype, tuple(spec.shape)), scale.reshape(shape), spec.dtype)
        out = bytearray(predicted)  # the residual is applied over the prediction, in place
        decode_residual(header.get("residual"), residual, as_bits(out, spec.dtype), oid)
        return out
