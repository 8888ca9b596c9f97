"""Hostile safetensors files: each is refused with one clear error and the repository stays intact."""

import io
import json
import struct

import numpy as np
import pytest

from git_theta.errors import CheckpointError
from git_theta.formats.safetensors_format import SafetensorsFormat


def _file(header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _t(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


HOSTILE = {
    "overlapping offsets": (_file({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, bytes(12)), "overlap"),
    "gap between tensors": (_file({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, bytes(12)), "gap"),
    "offsets past the end": (_file({"a": _t("F32", [4], 0, 16)}, bytes(8)), "truncated"),
    "offsets not matching shape": (_file({"a": _t("F32", [4], 0, 8)}, bytes(8)), "do not match"),
    "negative offsets": (_file({"a": _t("F32", [1], -4, 0)}, bytes(4)), "do not match"),
    "huge claimed tensor": (_file({"a": _t("F32", [1 << 40], 0, 4 << 40)}, bytes(64)), "truncated"),
    "huge header length": (struct.pack("<Q", 1 << 62) + b"{}", "too large"),
    "header longer than file": (struct.pack("<Q", 4096) + b'{"a":1}', "truncated"),
    "unknown dtype": (_file({"a": _t("F128", [1], 0, 16)}, bytes(16)), "unsupported dtype"),
    "trailing bytes": (_file({"a": _t("F32", [1], 0, 4)}, bytes(4) + b"extra"), "after the last tensor"),
    "duplicate tensor names": (
        _file(
            b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
            bytes(8),
        ),
        "duplicate",
    ),
    "deeply nested header": (_file(b"[" * 50000 + b"]" * 50000), "nested"),
    "header not json": (_file(b"{not json}"), "corrupt safetensors header"),
    "header not utf-8": (_file(b'{"\xff":1}'), "corrupt safetensors header"),
    "bool in shape": (
        _file({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4)),
        "invalid shape",
    ),
    "metadata not strings": (_file({"__metadata__": {"k": {"code": 1}}}), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_reader_refuses_hostile_file(case):
    data, expected = HOSTILE[case]
    with pytest.raises(CheckpointError) as info:
        list(SafetensorsFormat().split(io.BytesIO(data), "evil.safetensors").tensors())
    assert expected in info.value.message and "evil.safetensors" in info.value.message
    assert "\n" not in info.value.message


def test_git_add_of_hostile_files_fails_cleanly_and_leaves_the_repository_intact(repo):
    good = _file({"w": _t("F32", [2], 0, 8)}, struct.pack("<2f", 1.0, 2.0))
    repo.file("model.safetensors").write_bytes(good)
    repo.commit("good", "model.safetensors")
    staged = repo.show(":model.safetensors")
    store = repo.path / ".git" / "theta" / "objects"
    objects_before = sorted(p.name for p in store.rglob("*") if p.is_file() and p.parent.name != "tmp")
    for case in (
        "overlapping offsets",
        "huge claimed tensor",
        "unknown dtype",
        "trailing bytes",
        "duplicate tensor names",
    ):
        repo.file("model.safetensors").write_bytes(HOSTILE[case][0])
        proc = repo.git("add", "model.safetensors", check=False)
        assert proc.returncode != 0, case
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and HOSTILE[case][1] in errors[0], (case, proc.stderr)
        assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
        assert repo.show(":model.safetensors") == staged  # the index is untouched
    # Tensors read before the problem showed up may have been stored: harmless orphans that
    # nothing references, which prune removes.
    assert repo.theta("fsck", "--all").returncode == 0
    repo.theta("prune", "--expire=now", "--include-unpushed")
    objects_after = sorted(p.name for p in store.rglob("*") if p.is_file() and p.parent.name != "tmp")
    assert objects_after == objects_before
    repo.git("checkout", "--", "model.safetensors")
    assert repo.file("model.safetensors").read_bytes() == good and repo.status() == ""


def test_written_headers_are_the_json_the_safetensors_library_writes():
    """build_header writes entry by entry; its bytes must equal json.dumps of the whole header
    (what safetensors writes and what clean recognises as canonical), whatever the names hold."""
    from safetensors.numpy import save

    from git_theta.formats.safetensors_format import _canonical_order, build_header

    names = ["a", 'q"uote\\back', "é ü", "tab\tnl\n", "\u2028sep", "emoji😀", "\x01ctl", "__meta"]
    tensors = {
        name: np.zeros((i % 3, 2), dtype=[np.float32, np.int8, np.float16][i % 3]) for i, name in enumerate(names)
    }
    metadata = {"note": 'x"\\y\u2028é'}  # one key: the library orders several as it likes
    written = save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", written[:8])
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.int8): "I8", np.dtype(np.float16): "F16"}
    ordered = _canonical_order([(n, dtypes[t.dtype], t.shape) for n, t in tensors.items()])
    assert build_header(metadata, ordered) == written[8 : 8 + length]
    body = {"__metadata__": {"b": "1", "a": "é"}}
    offset = 0
    for name, dtype, shape in ordered:
        size = int(np.prod(shape)) * {"F32": 4, "I8": 1, "F16": 2}[dtype]
        body[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    assert build_header(body.pop("__metadata__"), ordered) == text + b" " * (-len(text) % 8)
