"""The long-running filter protocol on in-memory streams: handshake, per-file errors, abort."""

import io

from git_theta.errors import CheckpointError, NotInRepositoryError
from git_theta.filter.process import FilterServer
from git_theta.filter.pktline import PktReader, PktWriter


def git_side(requests):
    """Bytes git would send: welcome, capabilities, then (command, path, content) requests."""
    out = io.BytesIO()
    w = PktWriter(out)
    w.write_text_list(["git-filter-client", "version=2"])
    w.write_text_list(["capability=clean", "capability=smudge", "capability=delay"])
    for command, path, content in requests:
        w.write_text_list([f"command={command}", f"pathname={path}"])
        for start in range(0, len(content), 1000):
            w.write_packet(content[start : start + 1000])
        w.flush()
    return io.BytesIO(out.getvalue())


class Upper:
    """A stand-in worker: clean upper-cases, smudge lower-cases; 'bad' paths fail."""

    def __init__(self, settle=None):
        self._settle = settle or (lambda path: None)  # called with the path of a deferred clean
        self._pending = None

    def clean(self, stream, path, defer=False):
        data = stream.read()
        if path.startswith("bad"):
            raise CheckpointError(f"{path}: corrupt")
        self._pending = path if defer else None
        return data.upper()

    def settle(self):
        path, self._pending = self._pending, None
        if path is not None:
            self._settle(path)

    def plan(self, data, path):
        if path.startswith("bad"):
            raise CheckpointError(f"{path}: corrupt")
        return (data,), None

    def write(self, data, path, out, streaming=False):
        out.write(data.lower())
        self.streamed = streaming

    def close(self):
        pass


def serve(requests, make_workers):
    stdout = io.BytesIO()
    reports = []
    FilterServer(git_side(requests), stdout, make_workers, lambda exc, path: reports.append((path, str(exc)))).serve()
    return PktReader(io.BytesIO(stdout.getvalue())), reports


def read_response(reader):
    status = reader.read_key_values()
    if status.get("status") != "success":
        return status["status"], None
    body = b""
    while (packet := reader.read_packet()) is not None:
        body += packet
    trailer = reader.read_key_values()
    return trailer.get("status", "success"), body


def test_handshake_answers_only_supported_capabilities():
    reader, _ = serve([], lambda: (Upper(), Upper()))
    assert reader.read_text_list() == ["git-filter-server", "version=2"]
    assert reader.read_text_list() == ["capability=clean", "capability=smudge"]


def test_one_failing_file_answers_error_and_the_process_keeps_serving():
    big = bytes(range(256)) * 700  # spans many packets
    worker = Upper()
    reader, reports = serve(
        [("clean", "a.bin", b"abc"), ("clean", "bad.bin", big), ("smudge", "b.bin", b"XYZ"), ("smudge", "bad2", b"x")],
        lambda: (worker, worker),
    )
    reader.read_text_list(), reader.read_text_list()
    assert read_response(reader) == ("success", b"ABC")
    assert read_response(reader) == ("error", None)
    assert read_response(reader) == ("success", b"xyz")
    assert read_response(reader) == ("error", None)
    assert [p for p, _ in reports] == ["bad.bin", "bad2"]


def test_a_clean_is_settled_after_its_answer_is_sent_and_before_the_next_request():
    """Bookkeeping waits until git has the manifest (so git stores it meanwhile), and is done
    before the next file is read; when it fails, the file's answer stands and the failure is
    reported."""
    stdout = io.BytesIO()
    seen = []

    def settle(path):
        reader = PktReader(io.BytesIO(stdout.getvalue()))
        reader.read_text_list(), reader.read_text_list()
        answers = [read_response(reader) for _ in range(len(seen) + 1)]
        seen.append((path, answers[-1]))
        if path == "b.bin":
            raise CheckpointError("the cache could not be written")

    worker = Upper(settle)
    reports = []
    requests = [("clean", "a.bin", b"abc"), ("clean", "b.bin", b"def"), ("clean", "c.bin", b"ghi")]
    FilterServer(git_side(requests), stdout, lambda: (worker, worker), lambda exc, path: reports.append(path)).serve()
    assert seen == [("a.bin", ("success", b"ABC")), ("b.bin", ("success", b"DEF")), ("c.bin", ("success", b"GHI"))]
    assert reports == ["b.bin"]
    reader = PktReader(io.BytesIO(stdout.getvalue()))
    reader.read_text_list(), reader.read_text_list()
    assert [read_response(reader) for _ in requests] == [s for _, s in seen]


def test_large_content_round_trips_through_packets():
    big = bytes(range(256)) * 1000
    worker = Upper()
    reader, _ = serve([("smudge", "m", big.upper())], lambda: (worker, worker))
    reader.read_text_list(), reader.read_text_list()
    assert read_response(reader) == ("success", big.upper().lower())
    # git keeps a smudged file until the status after it: the smudge may stream (check late)
    assert worker.streamed is True


def test_systemic_failure_aborts_every_file():
    def broken():
        raise NotInRepositoryError("not a git repository")

    reader, reports = serve([("clean", "a", b"1"), ("clean", "b", b"2")], broken)
    reader.read_text_list(), reader.read_text_list()
    assert read_response(reader) == ("abort", None)
    assert read_response(reader) == ("abort", None)
    assert len(reports) == 1


def test_the_executable_serves_the_filter_without_the_cli(repo):
    """`git-theta filter-process` skips the command-line layer (its start-up is paid by every git
    command), still answers a handshake, and reports git going away mid-handshake as the CLI did."""
    import subprocess
    import sys

    code = "import sys; sys.argv = ['git-theta', 'filter-process']\nfrom git_theta.cli.entry import main\nmain()\n"
    welcome = b"0016git-filter-client\n000eversion=2\n0000" + b"0015capability=clean\n0000"
    proc = subprocess.run([sys.executable, "-c", code], input=welcome, cwd=repo.path, env=repo.env, capture_output=True)
    assert b"git-filter-server" in proc.stdout and b"capability=clean" in proc.stdout
    assert proc.returncode == 0, proc.stderr
    probe = (
        "import sys; sys.argv = ['git-theta', 'filter-process']\n"
        "import git_theta.filter.process as fp\n"
        "fp.run = lambda report: print('click' in sys.modules)\n"
        "from git_theta.cli.entry import main\n"
        "main()\n"
    )
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"
    proc = subprocess.run([sys.executable, "-c", code], input=b"", cwd=repo.path, env=repo.env, capture_output=True)
    assert proc.returncode == 130 and b"error: aborted" in proc.stderr
