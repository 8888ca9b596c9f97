"""A directory remote: objects on a plain or shared file system, laid out like the local store.

``theta.remote.<name>.url = /mnt/models`` keeps objects at ``/mnt/models/ab/cd/<oid>``; a git remote
that is a local repository keeps them in that repository's own store. Copies go through
``ObjectStore.put_chunks`` with the expected id, so both directions are atomic (temp + rename) and
verified (size and sha256) before an object appears under its name.
"""

from git_theta.store.objects import ObjectStore

CHUNK = 1 << 20


def _chunks(path):
    with open(path, "rb") as handle:
        while True:
            block = handle.read(CHUNK)
            if not block:
                return
            yield block


class DirectoryRemote:
    """Transfers between the local store and a directory (the same interface as the HTTP remote)."""

    def __init__(self, path, fsync=True):
        self.store = ObjectStore(path, fsync=fsync)

    def needs_upload(self, refs):
        return [r for r in refs if self.store.size(r.oid) != r.size]

    def present(self, refs):
        return [r for r in refs if self.store.size(r.oid) == r.size]

    def upload(self, ref, local_store):
        self.store.put_chunks(_chunks(local_store.path(ref.oid)), expect=ref)

    def download(self, ref, local_store):
        local_store.put_chunks(_chunks(self.store.path(ref.oid)), expect=ref)
