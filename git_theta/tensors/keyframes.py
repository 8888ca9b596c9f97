"""When a changed tensor gets a new keyframe instead of another delta: by cost, not by depth.

A checkout of a version decodes its chain: the keyframe plus every delta above it, so it reads
(and for whole-tensor deltas, passes over) the sum of the chain's objects. A fixed depth cap makes
a sparse history mostly keyframes (8 deltas of 1% each, then a dense copy: 92% of the store) while
letting a chain of large deltas grow unchecked below the cap. The rule here prices the chain:

- a new keyframe when the deltas already stacked on the keyframe add up to ``theta.keyframePercent``
  percent (50 by default) of the keyframe's size: past that, reading the chain costs more than
  1.5 keyframes and a fresh keyframe costs less than the deltas already paid for;
- and in any case after ``theta.maxChainDepth`` deltas (32 by default), which bounds the objects a
  checkout opens per tensor however small they are.

A third rule bounds what reading any one version costs, checkout and fresh clone alike: a delta
is stored only when its chain (keyframe plus deltas, this delta included) stays within
``theta.maxChainPercent`` percent (130 by default) of the tensor's raw size; otherwise the version
is stored as a keyframe. Git LFS reads and fetches exactly the raw size, so a clone of any version
moves at most 1.3x its bytes. This rule needs the new delta's size, so clean applies it after
encoding (:func:`chain_fits`). 130 keeps the int-delta of a full fine-tune step that costs less than
half a keyframe (0.39 of the raw size on GPT-2-size weights, against 0.84 for a keyframe: chain
1.23) and turns a delta that saves little (0.84 + 0.62, or 0.9 + 0.63) into a keyframe; 110 would
make every dense fine-tune a keyframe, twice the store for a clone that reads 1.1x, not 1.25x.

So a history of 1% sparse changes stacks ~30 deltas per keyframe (a keyframe is ~1/30 of its
store), and a dense fine-tune whose change against the keyframe keeps growing re-keys once that
change is half a keyframe instead of storing ever larger deltas. Sizes come from the manifest's
object references of the parent version (no object is read).
"""


def needs_keyframe(entry, max_depth, percent):
    """True when a new version of the tensor ``entry`` describes should be stored as a keyframe
    rather than as a delta on ``entry``'s chain."""
    if entry.chain_depth + 1 > max_depth:
        return True
    keyframe = entry.objects[-1].size
    deltas = sum(ref.size for ref in entry.objects[:-1])
    return deltas * 100 >= percent * keyframe


#: bytes of object headers a chain may add beyond ``theta.maxChainPercent`` of the raw size: a
#: small tensor's objects are mostly header (a 256-byte tensor's keyframe is ~400 bytes), and its
#: deltas still save space; for a large tensor this is noise.
HEADER_SLACK = 4096


def chain_fits(base_entry, delta_bytes, raw_bytes, percent):
    """True when a delta of ``delta_bytes`` on ``base_entry``'s chain keeps the chain (every
    object a checkout of the new version reads) within ``percent`` percent of ``raw_bytes``
    (plus :data:`HEADER_SLACK`)."""
    chain = sum(ref.size for ref in base_entry.objects) + delta_bytes
    return chain * 100 <= percent * raw_bytes + HEADER_SLACK * 100
