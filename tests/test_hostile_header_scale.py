"""A safetensors header of very many tensors (600k empty ones in 40 MB took 5.5 min and 2.2 GB to
add): the work per tensor must not include an object write, a thread hand-off or a database row
per repeated content (issue 13; docs/security.md, "Nothing lost").

No timing is asserted: the test counts what grows with the tensor count (objects written, digest
rows), which is what made the time and memory grow.
"""

import json
import os
import sqlite3
import struct

from git_theta.store.objects import ObjectStore

COUNT = 3000


def _many_empty_tensors(path, count=COUNT):
    header = {f"t{i:07d}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_many_identical_tensors_cost_one_object(repo, monkeypatch):
    _many_empty_tensors(repo.file("many.safetensors"))
    from git_theta.filter.clean import Cleaner
    from git_theta.git.repo import Repo

    writes = []
    original = ObjectStore.put_chunks

    def counting(self, chunks, **options):
        writes.append(1)
        return original(self, chunks, **options)

    monkeypatch.setattr(ObjectStore, "put_chunks", counting)
    r = Repo(repo.path)
    cleaner = Cleaner(r)
    try:
        with open(repo.file("many.safetensors"), "rb") as handle:
            manifest = cleaner.clean(handle, "many.safetensors")
    finally:
        cleaner.close()
        r.close()
    assert manifest.count(b"\n") >= COUNT  # every tensor is in the manifest...
    # ...but their one content is stored once per worker thread at most (two workers may both miss
    # the other's entry for their first batch), plus the pack holding it: not once per tensor
    assert len(writes) <= (os.cpu_count() or 1) + 1
    with sqlite3.connect(repo.path / ".git" / "theta" / "cache.sqlite3") as conn:
        # one row per content at most: a small (raw) one is found among the packs' members instead
        assert conn.execute("SELECT COUNT(*) FROM digests").fetchone()[0] <= 1


def test_many_empty_tensors_add_and_check_out_byte_exact(repo):
    _many_empty_tensors(repo.file("many.safetensors"))
    original = repo.file("many.safetensors").read_bytes()
    repo.commit("many", "many.safetensors")
    repo.file("many.safetensors").unlink()
    repo.git("checkout", "--", "many.safetensors")
    assert repo.file("many.safetensors").read_bytes() == original
    assert repo.status() == ""
