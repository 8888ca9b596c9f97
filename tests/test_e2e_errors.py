"""Bad input through real git: one clear error, nothing lost, nothing half-written."""

import pytest

from conftest import random_state_dict, save_safetensors

pytestmark = pytest.mark.e2e


def objects_dir(repo):
    return repo.path / ".git" / "theta" / "objects"


def committed(repo, name="model.safetensors", seed=0):
    f = repo.file(name)
    save_safetensors(f, random_state_dict(seed))
    repo.commit("base", name)
    return f


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda b: b[: len(b) - 10], "truncated"),
        (lambda b: b[:9] + b"\xff" + b[10:], "corrupt safetensors header"),
        (lambda b: b + b"trailing", "unexpected bytes"),
    ],
)
def test_broken_safetensors_fails_add_and_keeps_the_index(repo, damage, words):
    f = committed(repo)
    before_index = repo.show(":model.safetensors")
    before_objects = sorted(p.name for p in objects_dir(repo).glob("??/??/*"))
    f.write_bytes(damage(f.read_bytes()))
    proc = repo.git("add", "model.safetensors", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert any("model.safetensors" in line and words in line for line in errors), proc.stderr
    assert repo.show(":model.safetensors") == before_index
    assert sorted(p.name for p in objects_dir(repo).glob("??/??/*")) == before_objects
    assert not any((objects_dir(repo) / "tmp").iterdir())


def test_missing_object_fails_that_file_only(repo):
    repo.git("config", "theta.packThreshold", "0")  # loose objects, one per tensor (packs: test_packs.py)
    a = committed(repo, "a.safetensors", 1)
    b = committed(repo, "b.safetensors", 2)
    b_bytes = b.read_bytes()
    manifest = repo.show("HEAD:a.safetensors").decode()
    line = next(t for t in manifest.splitlines() if t.startswith("tensor head.weight"))
    oid = line.split()[-1].split(":")[0]
    victim = objects_dir(repo) / oid[:2] / oid[2:4] / oid
    victim.unlink()
    a.unlink()
    b.unlink()
    proc = repo.git("checkout", "--", "a.safetensors", "b.safetensors")
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "a.safetensors" in error[0] and "head.weight" in error[0] and oid in error[0]
    assert "hint:" in proc.stderr and "git theta fetch" in proc.stderr
    assert b.read_bytes() == b_bytes  # the other file still checks out
    # the file keeps its manifest (like a Git LFS pointer) until the object is back; nothing is lost
    assert a.read_bytes() == repo.show("HEAD:a.safetensors")
    assert repo.status() == ""


def test_corrupt_object_is_never_written_out(repo):
    f = committed(repo)
    original = f.read_bytes()
    for obj in objects_dir(repo).glob("??/??/*"):
        data = bytearray(obj.read_bytes())
        data[-1] ^= 0x01
        obj.write_bytes(bytes(data))
    f.unlink()
    proc = repo.git("checkout", "--", "model.safetensors", check=False)
    assert proc.returncode != 0
    assert "model.safetensors" in proc.stderr and "fsck" in proc.stderr
    assert not f.exists() or f.read_bytes() != original and len(f.read_bytes()) == 0


def test_manifest_of_an_unknown_schema_is_refused(repo):
    f = committed(repo)
    newer = (
        repo.show("HEAD:model.safetensors")
        .replace(b"manifest v1", b"manifest v7")
        .replace(b"manifest v2", b"manifest v7")
        .replace(b"manifest v3", b"manifest v7")
    )
    blob = repo.git("hash-object", "-w", "--stdin", input=newer.decode()).stdout.strip()
    repo.git("update-index", "--cacheinfo", f"100644,{blob},model.safetensors")
    f.unlink()
    proc = repo.git("checkout", "--", "model.safetensors", check=False)
    assert proc.returncode != 0
    assert "unknown manifest schema" in proc.stderr and "upgrade" in proc.stderr


def test_not_a_checkpoint_is_a_clear_error(repo):
    repo.file("notes.safetensors").write_text("hello, I am text\n")
    proc = repo.git("add", "notes.safetensors", check=False)
    assert proc.returncode != 0
    assert "notes.safetensors" in proc.stderr and "hint:" in proc.stderr
