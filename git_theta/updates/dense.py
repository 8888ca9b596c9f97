"""``dense``: the whole tensor as byte planes compressed with zstandard (a keyframe)."""

from git_theta.tensors.buffers import new_buffer
from git_theta.dtypes import element_count, get_dtype
from git_theta.tensors.planes import check_planes, decode_planes, encode_planes
from git_theta.updates.base import Encoded, UpdateType


class DenseUpdate(UpdateType):
    """Store the tensor itself; needs no base, so it starts every chain."""

    name = "dense"
    keyframe = True

    def encode(self, tensor, base=None):
        return Encoded({}, encode_planes(tensor.data, get_dtype(tensor.dtype).itemsize))

    def decode(self, header, payload, base, spec, oid="?"):
        itemsize = get_dtype(spec.dtype).itemsize
        nbytes = itemsize * element_count(spec.shape)
        check_planes(payload, nbytes, itemsize, oid)  # before allocating what the header claims
        return decode_planes(payload, nbytes, itemsize, oid, out=new_buffer(nbytes))
