"""The stat cache's manifest texts: stored compressed, read back exactly, rows written plain by
an older git-theta still read, a damaged row is a miss (never a wrong manifest)."""

import hashlib
import sqlite3

from git_theta.store import cache as cache_module
from git_theta.store.cache import Cache


def _manifest(rows):
    lines = ["git-theta manifest v3", "format safetensors"]
    lines += [f"tensor w.{i} F32 [80] {hashlib.sha256(b'%d' % i).hexdigest()} raw @0123456789ab" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def _stored(path):
    db = sqlite3.connect(str(path))
    try:
        return db.execute("SELECT manifest FROM stat_texts").fetchall()
    finally:
        db.close()


def test_a_manifest_text_is_stored_compressed_and_read_back_exactly(tmp_path):
    text = _manifest(5000)
    cache = Cache(tmp_path / "cache.db")
    cache.put_stat("/whole-file/model.safetensors", "k1", text, {"w.0": "f"})
    cache.put_stat("other.safetensors", "k2", text, {})  # the same text: stored once
    assert cache.get_stat("/whole-file/model.safetensors", "k1") == (text, {"w.0": "f"})
    assert cache.get_stat("other.safetensors", "k2") == (text, {})
    assert cache.get_stat("other.safetensors", "k1") is None
    cache.close()
    (stored,) = _stored(tmp_path / "cache.db")
    assert bytes(stored[0]).startswith(cache_module.ZSTD_MAGIC) and len(stored[0]) < len(text) / 2


def test_a_plain_row_still_reads_and_a_damaged_one_is_a_miss(tmp_path):
    text = _manifest(300)
    path = tmp_path / "cache.db"
    cache = Cache(path)
    cache.put_stat("a", "k", text, {})
    cache.close()
    db = sqlite3.connect(str(path))
    with db:
        db.execute("UPDATE stat_texts SET manifest=?", (text,))  # as written before compression
    cache = Cache(path)
    assert cache.get_stat("a", "k") == (text, {})
    cache.close()
    damaged = bytearray(cache_module._packed_text(text))
    damaged[len(damaged) // 2] ^= 0xFF
    with db:
        db.execute("UPDATE stat_texts SET manifest=?", (bytes(damaged),))
    db.close()
    cache = Cache(path)
    assert cache.get_stat("a", "k") is None
    cache.close()
