"""Moving sets of objects between the local store and a remote: batches, parallel transfers,
progress on a terminal, and a local record of what each remote is known to hold.

Objects go in batches of ``theta.batchSize``; within a batch, ``theta.transfers`` objects move at
once. Every failure is collected and reported together (which objects, why) after the other
transfers finished, so one bad object does not hide the rest.
"""

import sys
from concurrent.futures import ThreadPoolExecutor

from git_theta.errors import GitThetaError, ObjectMissingError, RemoteError
from git_theta.config import settings_for
from git_theta.remote.batch import LfsClient, MalformedAnswerError, TransferStats, object_actions
from git_theta.remote.directory import DirectoryRemote


def _dedup(refs):
    seen = {}
    for ref in refs:
        seen.setdefault(ref.oid, ref)
    return list(seen.values())


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Progress:
    """A tqdm byte counter on stderr, only when stderr is a terminal."""

    def __init__(self, total, label):
        self._bar = None
        if total and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr, leave=False)

    def update(self, n):
        if self._bar is not None:
            self._bar.update(n)

    def close(self):
        if self._bar is not None:
            self._bar.close()


class PushedRecord:
    """oids a remote is known to hold: uploaded by us, reported present by it, or downloaded from
    it (a fresh clone's objects came from its origin, so they are not "not pushed" there):
    ``theta/remotes/<key>/pushed``."""

    def __init__(self, repo, endpoint):
        self.path = repo.theta_dir / "remotes" / endpoint.key / "pushed"

    def load(self):
        try:
            return set(self.path.read_text().split())
        except FileNotFoundError:
            return set()

    def add(self, oids):
        if not oids:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write("".join(oid + "\n" for oid in oids))


class Transfer:
    """Transfers for one endpoint (open once per command, reuse for several calls)."""

    def __init__(self, repo, endpoint, settings=None):
        self.repo = repo
        self.endpoint = endpoint
        self.settings = settings or settings_for(repo)
        self.workers = max(1, self.settings.get_int("transfers"))
        self.batch_size = max(1, self.settings.get_int("batchSize"))
        if endpoint.kind == "dir":
            self._dir = DirectoryRemote(endpoint.path, fsync=self.settings.get_bool("fsync"))
            self._http = None
        else:
            self._dir = None
            self._http = LfsClient(endpoint, repo, self.settings)

    def close(self):
        if self._http is not None:
            self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- what the remote has ----------------------------------------------------------------------
    def present(self, refs):
        """The oids among ``refs`` that the remote holds (a download batch request over HTTP)."""
        refs = _dedup(refs)
        if self._dir is not None:
            return {r.oid for r in self._dir.present(refs)}
        found = set()
        for batch in _batches(refs, self.batch_size):
            answer = self._http.batch("download", batch)  # an unusable answer says nothing: raise
            for ref, actions in self._checked(answer, batch, []):
                if "download" in actions:
                    found.add(ref.oid)
        return found

    def _ask(self, operation, batch, failures):
        """``(ref, checked actions)`` for each ref of ``batch`` the server answered usably; every
        other ref goes to ``failures`` with its reason, also when the whole answer is malformed.
        A refused or failed request (HTTP error, no connection) raises: nothing else would work."""
        try:
            answer = self._http.batch(operation, batch)
        except MalformedAnswerError as exc:
            failures.extend((ref, exc) for ref in batch)
            return []
        return self._checked(answer, batch, failures)

    @staticmethod
    def _checked(answer, batch, failures):
        result = []
        for ref in batch:
            try:
                result.append((ref, object_actions(answer.get(ref.oid))))
            except RemoteError as exc:
                failures.append((ref, exc))
        return result

    # -- upload -----------------------------------------------------------------------------------
    def upload(self, refs, label="Uploading objects"):
        """Send the objects of ``refs`` the remote lacks; returns TransferStats of what moved."""
        store = self.repo.store
        refs = _dedup(list(refs) + store.chunk_parts(refs))
        limit = self.settings.get_int("maxObjectSize")
        too_big = [r for r in refs if limit and r.size > limit]
        if too_big:
            raise RemoteError(
                f"object {too_big[0].oid} is {too_big[0].size} bytes, more than theta.maxObjectSize ({limit})",
                hint="it was stored before the limit was lowered: re-add the file after "
                "'git theta checkout --force' so it is stored in parts",
            )
        stats = TransferStats()
        record = PushedRecord(self.repo, self.endpoint)
        progress = _Progress(sum(r.size for r in refs), label)
        failures = []
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="theta-upload") as pool:
                for batch in _batches(refs, self.batch_size):
                    jobs = []  # (ref, callable)
                    if self._dir is not None:
                        needed = self._dir.needs_upload(batch)
                        jobs = [(r, lambda r=r: self._dir.upload(r, store)) for r in needed]
                    else:
                        needed = []
                        for ref, actions in self._ask("upload", batch, failures):
                            if "upload" in actions:
                                needed.append(ref)
                                jobs.append((ref, lambda r=ref, a=actions: self._upload_http(r, a, store)))
                    missing = [r for r in needed if store.size(r.oid) != r.size]
                    if missing:
                        raise ObjectMissingError(
                            f"{len(missing)} object(s) to push are not in the local store (first: {missing[0].oid})",
                            hint="fetch them first (git theta fetch) from a remote that has them",
                            oids=[r.oid for r in missing],
                        )
                    # Objects the remote already had count as pushed as well.
                    failed = {f[0].oid for f in failures}
                    already = [r for r in batch if r not in needed and r.oid not in failed]
                    record.add([r.oid for r in already])
                    progress.update(sum(r.size for r in already))
                    done = self._run(pool, jobs, stats, progress, failures)
                    record.add([r.oid for r in done])
        finally:
            progress.close()
        _raise_failures(failures, "upload to", self.endpoint)
        return stats

    def _upload_http(self, ref, actions, store):
        self._http.upload(actions["upload"], ref, store.path(ref.oid))
        if "verify" in actions:
            self._http.verify(actions["verify"], ref)

    # -- download ---------------------------------------------------------------------------------
    def download(self, refs, label="Downloading objects"):
        """Fetch the objects of ``refs`` missing locally; each is verified before it is stored.

        The parts of chunked objects are only known once their index is here: a second round
        fetches them.
        """
        refs = _dedup(refs)
        stats = TransferStats()
        self._download(refs, label, stats)
        self._download(self.repo.store.chunk_parts(refs), label, stats)
        return stats

    def _download(self, refs, label, stats):
        store = self.repo.store
        # A pack 'git theta repack' replaced is here in the members that were still used.
        refs = [r for r in _dedup(refs) if store.size(r.oid) != r.size and not store.replaced(r.oid)]
        if not refs:
            return stats
        progress = _Progress(sum(r.size for r in refs), label)
        record = PushedRecord(self.repo, self.endpoint)  # what we download, the remote holds
        failures = []
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="theta-download") as pool:
                for batch in _batches(refs, self.batch_size):
                    jobs = []
                    if self._dir is not None:
                        present = {r.oid for r in self._dir.present(batch)}
                        for ref in batch:
                            if ref.oid in present:
                                jobs.append((ref, lambda r=ref: self._dir.download(r, store)))
                            else:
                                failures.append((ref, "not on the remote"))
                    else:
                        for ref, actions in self._ask("download", batch, failures):
                            action = actions.get("download")
                            if action is None:
                                failures.append((ref, "not on the remote"))
                                continue
                            jobs.append((ref, lambda r=ref, a=action: self._http.download(a, r, store)))
                    record.add([r.oid for r in self._run(pool, jobs, stats, progress, failures)])
        finally:
            progress.close()
        _raise_failures(failures, "download from", self.endpoint)
        return stats

    def _run(self, pool, jobs, stats, progress, failures):
        """Run ``jobs`` on the pool; returns the refs that succeeded, appends the failures."""
        futures = [(ref, pool.submit(job)) for ref, job in jobs]
        done = []
        for ref, future in futures:
            try:
                future.result()
            except GitThetaError as exc:
                failures.append((ref, exc))
                continue
            except OSError as exc:
                failures.append((ref, f"{type(exc).__name__}: {exc}"))
                continue
            stats.add(ref)
            progress.update(ref.size)
            done.append(ref)
        return done


def _raise_failures(failures, verb, endpoint):
    """One error for every failed object: the first reason in full, the count, the hint."""
    if not failures:
        return
    ref, reason = failures[0]
    first = reason if isinstance(reason, GitThetaError) else None
    text = reason.message if first else reason
    more = f" ({len(failures) - 1} more failed)" if len(failures) > 1 else ""
    if first is not None and type(first) is not RemoteError and len(failures) == 1:
        raise type(first)(f"{verb} {endpoint.describe()} failed: {text}", hint=first.hint)
    raise RemoteError(
        f"{verb} {endpoint.describe()} failed for object {ref.oid}: {text}{more}",
        hint=(first.hint if first is not None and first.hint else None)
        or (
            "push the objects from a clone that has them (git theta push)" if "not on the remote" in str(text) else None
        ),
    )


def fetch_refs(repo, refs, remote=None, settings=None):
    """Download ``refs`` (missing ones only) from ``remote`` (default remote); returns TransferStats."""
    from git_theta.remote.endpoint import resolve

    endpoint = resolve(repo, remote, "download")
    with Transfer(repo, endpoint, settings) as transfer:
        return transfer.download(refs)
