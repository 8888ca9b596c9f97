"""Keyframes by cost (git_theta/tensors/keyframes.py): a sparse history stacks deltas, a chain whose
deltas add up to half a keyframe gets a new one, the depth cap still bounds every chain, and no
version's chain passes theta.maxChainPercent of its raw size (what a checkout or clone reads)."""

import numpy as np

from conftest import save_safetensors
from git_theta.manifest import Manifest, ObjectRef, TensorEntry
from git_theta.tensors.keyframes import HEADER_SLACK, needs_keyframe

MODEL = "model.safetensors"


def _chain(*sizes):
    refs = tuple(ObjectRef(f"{i:064x}", size) for i, size in enumerate(sizes))
    return TensorEntry("w", "F32", (4,), "0" * 64, "sparse" if len(refs) > 1 else "dense", refs)


def test_skip_depth_is_a_binary_counter():
    from git_theta.tensors.keyframes import skip_depth

    assert skip_depth([]) == (0, 1)  # on a keyframe: a delta of one version
    assert skip_depth([1]) == (1, 2)  # replaces the newest delta: on the keyframe, two versions
    assert skip_depth([2]) == (0, 1)  # stacks
    assert skip_depth([1, 2, 4, 16]) == (3, 8)  # carries through 1, 2, 4; stops at 16
    assert skip_depth([1, 1, 1]) == (1, 2)  # a chain of one-version deltas (older versions)
    spans = []  # version n's chain is one delta per one bit of n
    for version in range(1, 65):
        skipped, span = skip_depth(spans)
        spans = [span, *spans[skipped:]]
        assert sorted(spans) == [1 << b for b in range(7) if version >> b & 1] and sum(spans) == version


def test_chain_versions_reads_spans_as_claims():
    from git_theta.tensors.keyframes import chain_versions

    keyframe = {"update": "dense"}
    assert chain_versions([keyframe]) == 0
    assert chain_versions([{"span": 4}, {}, {"span": 2}, keyframe]) == 7  # absent: one version
    # a span from someone else's object is a claim: malformed ones count as one version, and a
    # huge one only makes the next version a keyframe (the bound it is compared with)
    assert chain_versions([{"span": "8"}, {"span": True}, {"span": -3}, {"span": 0}, keyframe]) == 4
    assert chain_versions([{"span": 1 << 70}, keyframe]) == 1 << 70


def test_the_rule_prices_the_chain():
    assert not needs_keyframe(_chain(1000), 32, 50)  # a keyframe alone
    assert not needs_keyframe(_chain(10, 10, 10, 1000), 32, 50)  # small deltas stack
    assert needs_keyframe(_chain(300, 200, 1000), 32, 50)  # deltas are half a keyframe: re-key
    assert needs_keyframe(_chain(*[1] * 32, 1000), 32, 50)  # the depth cap, however small
    assert not needs_keyframe(_chain(600, 1000), 32, 100)  # the percentage is a setting


def test_sparse_history_stacks_deltas_and_a_drifting_one_rekeys(repo):
    rng = np.random.default_rng(3)
    sparse = (0.02 * rng.standard_normal(20000)).astype(np.float32)
    drifting = (0.02 * rng.standard_normal(20000)).astype(np.float32)
    expected = []
    for version in range(10):
        if version:
            at = rng.choice(sparse.size, sparse.size // 100, replace=False)
            sparse[at] += np.float32(1e-3)
            drifting = drifting + (1e-2 * rng.standard_normal(drifting.size)).astype(np.float32)
        save_safetensors(repo.file(MODEL), {"sparse": sparse, "drifting": drifting})
        expected.append(repo.file(MODEL).read_bytes())
        repo.commit(f"v{version}", MODEL)
    found = [Manifest.parse(repo.show(f"HEAD~{k}:{MODEL}")) for k in range(9, -1, -1)]
    sparse_entries = [m.tensors["sparse"] for m in found]
    # 1% changes: one keyframe for all ten versions (depth 8 used to re-key), and version v's chain
    # holds one delta per one bit of v (skip deltas: 7 reads deltas covering 4, 2 and 1 versions)
    assert len({e.objects[-1] for e in sparse_entries}) == 1
    assert [e.chain_depth for e in sparse_entries] == [bin(v).count("1") for v in range(10)]
    assert sparse_entries[8].objects[1:] == sparse_entries[0].objects  # 8 deltas straight on the keyframe
    kinds = [m.tensors["drifting"] for m in found]
    # every delta of the drifting tensor is large: each is soon half a keyframe, so it re-keys
    assert any(e.chain_depth == 0 for e in kinds[2:])
    assert all(sum(r.size for r in e.objects[:-1]) < 2 * e.objects[-1].size for e in kinds)
    for k, data in zip(range(9, -1, -1), expected):
        repo.git("checkout", "-q", f"HEAD~{k}", "--", MODEL)
        assert repo.file(MODEL).read_bytes() == data


def _sparse_history(repo, versions):
    """Commit ``versions`` states of one tensor with 1% of its entries changed per version; return
    the manifests' entries (oldest first) and each version's bytes."""
    rng = np.random.default_rng(5)
    weight = (0.02 * rng.standard_normal(20000)).astype(np.float32)
    expected = []
    for version in range(versions):
        if version:
            at = rng.choice(weight.size, weight.size // 100, replace=False)
            weight[at] += np.float32(1e-3)
        save_safetensors(repo.file(MODEL), {"w": weight})
        expected.append(repo.file(MODEL).read_bytes())
        repo.commit(f"v{version}", MODEL)
    entries = [Manifest.parse(repo.show(f"HEAD~{k}:{MODEL}")).tensors["w"] for k in range(versions - 1, -1, -1)]
    return entries, expected


def test_max_chain_depth_counts_the_versions_skip_deltas_cover(repo):
    repo.git("config", "theta.maxChainDepth", "5")
    entries, expected = _sparse_history(repo, 9)
    keyframes = [e.objects[-1] for e in entries]
    # versions 0-5 share a keyframe (their deltas cover at most 5 versions); 6 re-keys, though
    # version 5's chain was two objects (spans 4 and 1)
    assert len(set(keyframes[:6])) == 1 and keyframes[6] != keyframes[5] and entries[6].chain_depth == 0
    assert entries[5].chain_depth == 2
    assert [e.chain_depth for e in entries[6:]] == [0, 1, 1]
    for k, data in zip(range(8, -1, -1), expected):
        repo.git("checkout", "-q", f"HEAD~{k}", "--", MODEL)
        assert repo.file(MODEL).read_bytes() == data


def test_skip_deltas_off_stacks_one_delta_per_version(repo):
    repo.git("config", "theta.skipDeltas", "false")
    entries, _ = _sparse_history(repo, 6)
    assert [e.chain_depth for e in entries] == [0, 1, 2, 3, 4, 5]
    assert all(e.objects[1:] == p.objects for p, e in zip(entries, entries[1:]))  # each on its parent


def test_a_delta_is_stored_only_while_its_chain_stays_near_the_raw_size():
    from git_theta.tensors.keyframes import chain_fits

    raw = 100_000
    assert chain_fits(_chain(80_000), 25_000, raw, 110)  # 1.05x the raw size to read
    assert not chain_fits(_chain(80_000), 35_000, raw, 110)  # 1.15x: a keyframe is cheaper to read and fetch
    assert not chain_fits(_chain(1000, 1000, 90_000), 25_000, raw, 110)  # the whole chain counts
    assert chain_fits(_chain(80_000), 35_000, raw, 200)  # the percentage is a setting
    assert chain_fits(_chain(400), 300, 256, 110)  # a tiny tensor's objects are mostly header


def test_the_room_a_chain_leaves_a_delta_is_what_chain_fits_allows():
    """chain_room (known before a delta is encoded) is the largest delta chain_fits takes."""
    from git_theta.tensors.keyframes import chain_fits, chain_room

    for chain, raw, percent in (
        (_chain(80_000), 100_000, 110),
        (_chain(1000, 1000, 90_000), 100_000, 110),
        (_chain(400), 256, 110),
        (_chain(90_000), 100_000, 130),
    ):
        room = chain_room(chain, raw, percent)
        assert chain_fits(chain, int(room), raw, percent) and not chain_fits(chain, int(room) + 1, raw, percent)
    assert chain_room(_chain(120_000), 100_000, 110) < 0  # no delta fits on this chain


def _dense_fine_tune(repo, step, versions=4):
    """Commit ``versions`` states where every entry moves by ~``step`` (N(0, step) noise on weights
    of scale 0.02); return the manifests' entries, oldest first."""
    repo.git("config", "theta.packThreshold", "0")  # a dense keyframe (~0.84 of raw), not raw bytes
    rng = np.random.default_rng(4)
    weight = (0.02 * rng.standard_normal(20000)).astype(np.float32)
    for version in range(versions):
        if version:
            weight = weight + (step * rng.standard_normal(weight.size)).astype(np.float32)
        save_safetensors(repo.file(MODEL), {"w": weight})
        repo.commit(f"v{version}", MODEL)
    return [Manifest.parse(repo.show(f"HEAD~{k}:{MODEL}")).tensors["w"] for k in range(versions - 1, -1, -1)]


RAW = 20000 * 4


def _read(entry):
    """Bytes a checkout (or a fresh clone) of this version reads: its whole chain."""
    return sum(r.size for r in entry.objects)


def test_a_fine_tune_step_keeps_its_int_delta_by_default(repo):
    # a small step: the int-delta is ~0.4 of the raw size, keyframe + delta within 1.3x
    entries = _dense_fine_tune(repo, 1e-6)
    assert entries[1].update == "int-delta"
    # later steps are taken against the keyframe and grow with the distance from it, until a new
    # keyframe is cheaper: whatever each version is, reading it stays within the bound
    assert all(_read(e) <= 1.3 * RAW + HEADER_SLACK for e in entries)


def test_a_delta_that_saves_little_becomes_a_keyframe(repo):
    # a larger step: the int-delta is ~0.6 of the raw size; keyframe + delta would pass 1.3x, so
    # every version is a keyframe and reads one object
    entries = _dense_fine_tune(repo, 1e-4)
    assert all(e.chain_depth == 0 for e in entries)
    assert all(_read(e) <= 1.3 * RAW for e in entries)


def test_raising_max_chain_percent_keeps_a_costly_delta(repo):
    repo.git("config", "theta.maxChainPercent", "1000")
    entries = _dense_fine_tune(repo, 1e-4)
    assert entries[1].update == "int-delta" and _read(entries[1]) > 1.3 * RAW  # smaller store, more to read


def test_lowering_max_chain_percent_makes_even_a_small_step_a_keyframe(repo):
    repo.git("config", "theta.maxChainPercent", "110")  # a clone reads at most 1.1x what Git LFS does
    entries = _dense_fine_tune(repo, 1e-6)
    assert all(e.chain_depth == 0 for e in entries)
