"""``dense``: the whole tensor as byte planes compressed with zstandard (a keyframe)."""

from git_theta.tensors import hashing
from git_theta.tensors.buffers import new_buffer
from git_theta.dtypes import element_count, get_dtype
from git_theta.tensors.planes import check_planes, decode_planes, encode_planes
from git_theta.tensors.streaming import RELEASE_BYTES, decode_releasing, encoded_chunks, iter_decoded_releasing
from git_theta.updates.base import Encoded, UpdateType


class DenseUpdate(UpdateType):
    """Store the tensor itself; needs no base, so it starts every chain."""

    name = "dense"
    keyframe = True

    def encode(self, tensor, base=None):
        return Encoded({}, encode_planes(tensor.data, get_dtype(tensor.dtype).itemsize))

    def encode_streamed(self, tensor, threads=1):
        """:meth:`encode` with the payload as an iterator of parts, encoded chunk by chunk on
        ``threads`` threads a few chunks ahead of its reader (a huge tensor: see
        :mod:`git_theta.tensors.streaming`). The same bytes as :meth:`encode`."""
        return Encoded({}, encoded_chunks(tensor.data, get_dtype(tensor.dtype).itemsize, threads))

    def decode(self, header, payload, base, spec, oid="?"):
        itemsize = get_dtype(spec.dtype).itemsize
        nbytes = itemsize * element_count(spec.shape)
        check_planes(payload, nbytes, itemsize, oid)  # before allocating what the header claims
        out = new_buffer(nbytes)
        digest = hashing.claim()  # the tensor's bytes, written once in order: hashed as they go
        if nbytes >= RELEASE_BYTES:
            # A huge keyframe: drop the mapped object's pages chunk by chunk as they are decoded.
            return decode_releasing(payload, nbytes, itemsize, oid, out, digest)
        return decode_planes(payload, nbytes, itemsize, oid, out=out, digest=digest)

    def decode_pieces(self, header, payload, spec, oid="?"):
        """Yield ``(start, piece)``: the bytes :meth:`decode` gives, in order, a piece at a time
        (each valid until the next is asked for), with no tensor-sized buffer; a huge keyframe's
        checkout writes them to git as they come (see ``stream_tensor`` in updates/chain.py)."""
        itemsize = get_dtype(spec.dtype).itemsize
        nbytes = itemsize * element_count(spec.shape)
        check_planes(payload, nbytes, itemsize, oid)
        yield from iter_decoded_releasing(payload, nbytes, itemsize, oid)
