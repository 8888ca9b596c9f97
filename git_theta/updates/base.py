"""The update-type plugin interface.

An update type turns a tensor (and, for a delta, the base tensor it changes) into an object payload
and back, bit-exactly. Built-ins and third-party plugins register the same way: an entry point in
the ``git_theta.updates`` group whose object is a class (or instance) with this interface.
"""

from dataclasses import dataclass


@dataclass
class TensorData:
    """A tensor as raw little-endian C-order bytes plus its description."""

    name: str
    dtype: str
    shape: tuple
    data: object  # bytes-like (bytes, bytearray, memoryview)
    digest: str = ""


@dataclass
class TensorRun:
    """Consecutive small tensors of a checkpoint as columns over one buffer: tensor ``i`` is
    ``names[i]`` (``dtypes[i]``, ``shapes[i]``), its bytes ``data[bounds[i]:bounds[i + 1]]``.

    What a reader may yield in place of many TensorData (``CheckpointReader.runs``): 200,000
    tensors of a few hundred bytes each cost a read and an object each otherwise."""

    names: list
    dtypes: list
    shapes: list
    bounds: list  # len(names) + 1 offsets into data
    data: object  # bytes-like


@dataclass
class Encoded:
    """What an update type produced: header fields for the container and the payload parts."""

    header: dict
    parts: list  # bytes-like pieces, concatenated in order


class UpdateType:
    """Base class of update types. ``name`` is written into manifests and objects: never change it."""

    name = ""
    #: True when the encoding needs no base tensor (it can start a chain).
    keyframe = False
    #: True when the automatic choice in clean should try this update type on changed tensors.
    auto = False
    #: True when its encoded size is proportional to the data, so it can be estimated on a sample
    #: of the tensor; False when it depends on the whole tensor (low rank): tried in full.
    sampled = True
    #: True when decoding costs a pass over every element, as a keyframe does (int-delta,
    #: low-rank, ia3), False when it touches only what changed (sparse). A chain stacks at most
    #: ``theta.maxFullDeltas`` such deltas, so a checkout's decode time stays bounded.
    full_pass = True

    def encode(self, tensor, base=None):
        """Encode ``tensor`` (TensorData), optionally against ``base`` (TensorData).

        Return an :class:`Encoded`, or None when this update type does not apply.
        """
        raise NotImplementedError

    def decode(self, header, payload, base, spec, oid="?"):
        """Rebuild the raw bytes of the tensor described by ``spec`` (TensorData without data).

        ``base`` is the raw bytes of the base tensor (None for a keyframe), ``payload`` a
        memoryview of what :meth:`encode` wrote after the header. A ``bytearray`` base belongs to
        the chain walk that passed it: a decoder may write the result into it and return it,
        which saves allocating and copying a tensor-sized buffer.
        """
        raise NotImplementedError

    #: Optional, for a keyframe type: ``decode_pieces(header, payload, spec, oid)`` yielding
    #: ``(start, piece)``, the bytes :meth:`decode` gives in order, a piece at a time (each valid
    #: until the next is asked for). Checkout then writes a huge tensor to git as it decodes,
    #: with no tensor-sized buffer, and checks it after its last byte. None: decoded whole.
    decode_pieces = None


def writable_base(base):
    """``base`` itself when the chain walk handed it over to be decoded in place (a bytearray, see
    :meth:`UpdateType.decode`), else a bytearray copy of it."""
    return base if isinstance(base, bytearray) else bytearray(base)
