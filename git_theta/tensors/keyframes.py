"""When a changed tensor gets a new keyframe instead of another delta: by cost, not by depth.

A checkout of a version decodes its chain: the keyframe plus every delta above it, so it reads
(and for whole-tensor deltas, passes over) the sum of the chain's objects. A fixed depth cap makes
a sparse history mostly keyframes (8 deltas of 1% each, then a dense copy: 92% of the store) while
letting a chain of large deltas grow unchecked below the cap. The rule here prices the chain:

- a new keyframe when the deltas already stacked on the keyframe add up to ``theta.keyframePercent``
  percent (50 by default) of the keyframe's size: past that, reading the chain costs more than
  1.5 keyframes and a fresh keyframe costs less than the deltas already paid for;
- and in any case once its deltas cover ``theta.maxChainDepth`` versions (32 by default), which
  bounds the objects a checkout opens per tensor however small they are, and what a fresh clone of
  the newest version fetches (a sparse history's keyframe plus ~32 versions of 1% changes: 0.89x
  the bytes Git LFS fetches, measured; with only the 50% rule, 1.13x).

A third rule bounds what reading any one version costs, checkout and fresh clone alike: a delta
is stored only when its chain (keyframe plus deltas, this delta included) stays within
``theta.maxChainPercent`` percent (130 by default) of the tensor's raw size; otherwise the version
is stored as a keyframe. Git LFS reads and fetches exactly the raw size, so a clone of any version
moves at most 1.3x its bytes. This rule needs the new delta's size, so clean applies it after
encoding (:func:`chain_fits`); the room it leaves (:func:`chain_room`) is known before, and a delta
estimated well past it on a sample is not encoded at all (``updates/choose.py``).

130 keeps the int-delta of a full fine-tune step that costs less than half a keyframe (0.39 of the
raw size on GPT-2-size weights, against 0.84 for a keyframe: chain 1.23) and turns a delta that
saves little (0.84 + 0.62, or 0.9 + 0.63) into a keyframe; 110 would make every dense fine-tune a
keyframe, twice the store for a clone that reads 1.1x, not 1.25x.

Deltas that touch only what changed (``sparse``) also skip (``theta.skipDeltas``, on by default): a
new one is taken against an older version of the chain, like a binary counter (:func:`skip_depth`).
Each such delta records the number of versions it covers (``span`` in its header; 1 when absent).
A new delta replaces the newest deltas while their spans are 1, 2, 4, ... in turn, so version 7
of a chain reads deltas covering 4, 2 and 1 versions, version 8 one delta covering 8: a checkout
decodes at most log2(versions) + 1 deltas per tensor instead of one per version (measured on
1 MiB tensors, ~0.2 ms of fixed cost per delta, whatever its size), and an add, which decodes the
parent version, decodes a short chain too. The changes a merged delta holds are those of the
deltas it replaces, so a chain still reads about as many changed elements; a sparse history stores
each change about log2(versions) / 2 times (the merged deltas), against once. The change from the
parent decides the update type (a low-rank step stays low-rank); a merged delta is taken only when
it is no larger than the deltas it replaces plus the new one, and under half the tensor's size. A
whole-tensor delta is never skipped over (its change would land in the sparse delta above it).

So a history of 1% sparse changes keeps a keyframe for 32 versions, and a dense fine-tune whose
change against the keyframe keeps growing re-keys once that change is half a keyframe instead of
storing ever larger deltas. Sizes come from the manifest's object references of the parent
version; the versions a chain covers, from its object headers (:func:`chain_versions`).
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
    return delta_bytes <= chain_room(base_entry, raw_bytes, percent)


def chain_room(base_entry, raw_bytes, percent):
    """The most bytes a delta on ``base_entry``'s chain may take under :func:`chain_fits` (below
    zero when none may): known before the delta is encoded, so a delta whose estimated size is
    far past it need not be encoded at all. Whole bytes, rounded down: ``chain_fits`` stays the
    exact integer comparison it was."""
    return (percent * raw_bytes + HEADER_SLACK * 100) // 100 - sum(ref.size for ref in base_entry.objects)


def skip_depth(spans):
    """``(skipped, span)`` for a new partial delta on a chain whose deltas cover ``spans`` versions
    (newest first, stopping at any delta that may not be skipped): it replaces the newest
    ``skipped`` deltas (its base is the version below them) and covers ``span`` versions.

    The binary counter: the newest deltas are replaced while their spans are 1, 2, 4, ... in turn
    (an increment carries through the ones), so a chain of spans [1, 2, 4] becomes [8], and [2, 4]
    becomes [1, 2, 4].
    """
    covered, skipped = 1, 0
    for span in spans:
        if span != covered:
            break
        covered += span
        skipped += 1
    return skipped, covered


def span_of(header):
    """The versions a delta's object ``header`` says it covers: its ``span``, 1 when absent, None
    when malformed (a span is a claim of whoever wrote the object)."""
    span = header.get("span", 1)
    return span if type(span) is int and span >= 1 else None


def chain_versions(headers):
    """The versions a chain's deltas cover (``headers`` from the chain's own object down to its
    keyframe): the sum of their spans (:func:`span_of`), 1 for a malformed one.
    ``theta.maxChainDepth`` bounds this, not the number of objects, so skip deltas keep the
    keyframe cadence of a chain of one delta per version (and what a fresh clone fetches)."""
    return sum(span_of(header) or 1 for header in headers[:-1])
