"""Merge-and-evaluate search: build candidate merges, score each with the user's command, keep the best.

A *candidate* is an operator, its parameters and (with three or more models) which branches take
part and in what order. :func:`run_search` builds each candidate into a temporary checkpoint with a
caller-given ``build`` function (the git porcelain and ``merge-files`` each supply one), runs the
evaluation command with ``{model}`` replaced by that path, and reads the score: the last number the
command printed, or a JSON object on its last line with a ``score`` key. Up to ``jobs`` candidates
run at once (merges are built one at a time, since they share the object store and the CPU; the
commands overlap), within a time budget; a command that fails, prints no score or runs out of time
marks its candidate and the search goes on. Nothing here commits: the caller takes the best result.
"""

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from git_theta.errors import GitThetaError, UsageError

#: the default grid (documented in docs/merge-search.md); slerp and nuslerp only for two models
DEFAULT_GRID = (
    ("linear", {}),
    ("task_arithmetic", {"lambda": "0.5"}),
    ("task_arithmetic", {"lambda": "1.0"}),
    ("ties", {"density": "0.2"}),
    ("ties", {"density": "0.5"}),
    ("ties", {"density": "0.8"}),
    ("dare_ties", {"density": "0.3"}),
    ("dare_ties", {"density": "0.6"}),
    ("model_stock", {}),
    ("slerp", {"t": "0.5"}),
    ("nuslerp", {}),
)
TWO_MODELS_ONLY = ("slerp", "nuslerp")
#: how many characters of a failing command's output are kept for the table
DETAIL_CHARS = 200
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)\b", re.IGNORECASE)


class SearchError(GitThetaError):
    """The search could not run (no candidate, or none scored)."""


@dataclass(frozen=True)
class Candidate:
    """One merge to try: ``operator`` with raw ``params``; ``branches`` (names, in merge order) or
    None for every branch given."""

    operator: str
    params: tuple = ()  # sorted (key, value) pairs, so candidates hash and compare
    branches: tuple = None

    @classmethod
    def of(cls, operator, params=None, branches=None):
        return cls(operator, tuple(sorted((params or {}).items())), tuple(branches) if branches else None)

    @property
    def param_dict(self):
        return dict(self.params)

    @property
    def recipe(self):
        """'ties density=0.5' (what a user would pass as --operator/--param)."""
        return " ".join([self.operator, *(f"{k}={v}" for k, v in self.params)])

    @property
    def label(self):
        if self.branches is None:
            return self.recipe
        return f"{self.recipe} [{', '.join(self.branches)}]"

    def to_json(self):
        return {
            "operator": self.operator,
            "params": self.param_dict,
            "branches": list(self.branches) if self.branches else None,
        }


@dataclass
class Result:
    """What happened to one candidate."""

    candidate: Candidate
    status: str  # "ok", "failed", "timeout", "conflict", "skipped"
    score: float = None
    seconds: float = 0.0
    detail: str = ""
    built: object = field(default=None, repr=False)  # the build's own result (kept for the best only)
    index: int = 0  # the candidate's place in the search (ties go to the earlier one)

    def to_json(self):
        return {
            **self.candidate.to_json(),
            "recipe": self.candidate.label,
            "status": self.status,
            "score": self.score,
            "seconds": round(self.seconds, 3),
            "detail": self.detail,
        }


class BuildFailed(GitThetaError):
    """A candidate could not be built (conflicts, an operator refusing its inputs)."""


def default_candidates(n_models):
    """The default grid for a merge of ``n_models`` models (HEAD included)."""
    return [Candidate.of(op, params) for op, params in DEFAULT_GRID if n_models == 2 or op not in TWO_MODELS_ONLY]


def parse_candidates(text, source):
    """Candidates from ``--candidates FILE``: a JSON list of ``{"operator", "params"}`` objects, or one
    ``OPERATOR [KEY=VALUE ...]`` per line (``#`` comments and blank lines ignored)."""
    from git_theta.merge.rules import parse_params

    stripped = text.strip()
    out = []
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})",
                hint='give a list like [{"operator": "ties", "params": {"density": 0.5}}]',
            ) from None
        for i, item in enumerate(items):
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("operator"), str)
                or not isinstance(item.get("params", {}), dict)
            ):
                raise UsageError(
                    f'{source}: item {i} is not {{"operator": NAME, "params": {{...}}}}',
                    hint="each candidate names an operator and optional parameters",
                )
            params = {
                k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in item.get("params", {}).items()
            }
            out.append(Candidate.of(item["operator"], parse_params([f"{k}={v}" for k, v in params.items()], source)))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            words = line.split("#", 1)[0].split()
            if words:
                out.append(Candidate.of(words[0], parse_params(words[1:], f"{source}:{number}")))
    if not out:
        raise UsageError(f"{source}: no candidates", hint="one 'OPERATOR [KEY=VALUE ...]' per line")
    return out


def parse_score(output):
    """The score in a command's output: a JSON object with ``score`` on the last non-empty line, else
    the last number printed; None when there is none (or it is not finite)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if lines and lines[-1].startswith("{"):
        try:
            value = json.loads(lines[-1]).get("score")
        except (json.JSONDecodeError, AttributeError):
            value = None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    for line in reversed(lines):
        numbers = _NUMBER.findall(line)
        if numbers:
            value = float(numbers[-1])
            return value if math.isfinite(value) else None
    return None


def substitute(command, model_path):
    """``command`` with every ``{model}`` replaced by the shell-quoted path."""
    return command.replace("{model}", shlex.quote(str(model_path)))


def _spawn(command, timeout):
    """Run ``command`` in a shell, in its own process group so a timeout ends everything it started;
    (exit code or None on timeout, stdout text, stderr text, seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        shell=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        code = None
    return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), time.monotonic() - start


def _last_line(*texts):
    for text in texts:
        lines = text.strip().splitlines()
        if lines:
            return lines[-1][:DETAIL_CHARS]
    return ""


def run_command(command, timeout):
    """Run an evaluation command; (status, score, detail, seconds)."""
    code, out, err, seconds = _spawn(command, timeout)
    if code is None:
        return "timeout", None, f"no score after {timeout:.0f}s", seconds
    if code != 0:
        return "failed", None, f"exit {code}: {_last_line(err, out)}", seconds
    score = parse_score(out)
    if score is None:
        return "failed", None, "printed no score (a number, or a JSON object with 'score')", seconds
    return "ok", score, "", seconds


def run_command_output(command, timeout=600):
    """stdout of ``command`` (a shell command); UsageError when it fails or runs out of time."""
    code, out, err, _ = _spawn(command, timeout)
    if code is None:
        raise UsageError(f"command ran over {timeout}s: {command}", hint="make it faster")
    if code != 0:
        raise UsageError(f"command exited {code}: {command}", hint=_last_line(err, out) or "run it by hand")
    return out


@dataclass
class Search:
    """One search: ``build(candidate, folder) -> (model path, built)`` writes a candidate under
    ``folder`` (raising :class:`BuildFailed` when it cannot be merged); ``command`` holds ``{model}``."""

    build: object
    command: str
    jobs: int = 1
    budget: float = None  # seconds for the whole search (None: no limit)
    timeout: float = None  # seconds per evaluation (None: only the budget)
    progress: object = None  # callable(Result) as each finishes
    discard: object = None  # callable(built) for builds no longer needed (not, or no longer, the best)
    results: list = field(default_factory=list)

    def __post_init__(self):
        if "{model}" not in self.command:
            raise UsageError("the --eval command has no {model}", hint="e.g. --eval 'python eval.py {model}'")
        self._deadline = None if self.budget is None else time.monotonic() + self.budget
        self._lock = threading.Lock()  # builds share the repository's store: one at a time
        self._settle_lock = threading.Lock()
        self._best = None
        self._tmp = tempfile.mkdtemp(prefix="theta-search-")

    def close(self):
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _drop(self, built):
        if built is not None and self.discard is not None:
            self.discard(built)

    @property
    def best(self):
        """The best scored result so far (ties: the earlier candidate), or None."""
        return self._best

    def _time_left(self):
        return None if self._deadline is None else self._deadline - time.monotonic()

    def _one(self, index, candidate):
        left = self._time_left()
        if left is not None and left <= 0:
            return Result(candidate, "skipped", detail="time budget spent")
        folder = os.path.join(self._tmp, f"c{index}")
        os.makedirs(folder)
        start = time.monotonic()
        try:
            with self._lock:
                path, built = self.build(candidate, folder)
        except GitThetaError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            status = "conflict" if isinstance(exc, BuildFailed) else "error"
            return Result(candidate, status, seconds=time.monotonic() - start, detail=exc.message[:DETAIL_CHARS])
        left = self._time_left()
        limits = [t for t in (left, self.timeout) if t is not None]
        timeout = min(limits) if limits else None
        if timeout is not None and timeout <= 0:
            status, score, detail, seconds = "skipped", None, "time budget spent", 0.0
        else:
            status, score, detail, seconds = run_command(substitute(self.command, path), timeout)
        shutil.rmtree(folder, ignore_errors=True)
        if status != "ok":
            self._drop(built)
            built = None
        return Result(candidate, status, score, seconds, detail, built)

    def run(self, candidates):
        """Evaluate ``candidates`` (up to ``jobs`` at once); returns their results in order (a
        candidate already evaluated in this search is not run again: its first result is returned)."""
        offset = len(self.results)
        done = {r.candidate: r for r in self.results}
        todo = [c for c in dict.fromkeys(candidates) if c not in done]
        results = [None] * len(todo)

        def task(i):
            result = self._one(offset + i, todo[i])
            result.index = offset + i
            results[i] = result
            self._settle(result)
            return result

        with ThreadPoolExecutor(max(1, self.jobs), thread_name_prefix="theta-search") as pool:
            list(pool.map(task, range(len(todo))))
        self.results += results
        done.update((r.candidate, r) for r in results)
        return [done[c] for c in candidates]

    def _settle(self, result):
        with self._settle_lock:
            # equal scores: the earlier candidate wins, whatever order parallel runs finish in
            if result.status == "ok" and (
                self._best is None or (result.score, -result.index) > (self._best.score, -self._best.index)
            ):
                if self._best is not None:  # only the best build is kept
                    self._drop(self._best.built)
                    self._best.built = None
                self._best = result
            elif result.status == "ok":
                self._drop(result.built)
                result.built = None
        if self.progress is not None:
            self.progress(result)


def greedy_branches(search, recipe, branches, fixed=()):
    """Choose which branches to merge (after ``fixed`` ones, e.g. HEAD's implicit place), and in what
    order, with ``recipe`` (a Candidate): forward selection, starting from the best single branch
    and adding, one at a time, the branch that raises the score most, while it rises. Returns the
    branches chosen in order (``fixed`` first); every trial is in ``search.results``."""
    chosen, score = list(fixed), -math.inf
    remaining = [b for b in branches if b not in chosen]
    while remaining:
        everything = list(branches) if not fixed else [*fixed, *(b for b in branches if b not in fixed)]
        trial = [
            Candidate.of(recipe.operator, recipe.param_dict, None if [*chosen, b] == everything else [*chosen, b])
            for b in remaining
        ]
        results = search.run(trial)
        scored = [(r.score, i) for i, r in enumerate(results) if r.status == "ok"]
        if not scored:
            break
        best_score, i = max(scored, key=lambda s: (s[0], -s[1]))
        if best_score <= score:
            break
        chosen.append(remaining.pop(i))
        score = best_score
    return chosen


def table(results, best=None):
    """Lines of the search table (ranked by score, then the others in order)."""
    from git_theta.diff.text import table as render

    ok = sorted((r for r in results if r.status == "ok"), key=lambda r: -r.score)
    rest = [r for r in results if r.status != "ok"]
    rows = [["", "candidate", "score", "seconds", "status"]]
    for r in ok + rest:
        mark = "*" if best is not None and r is best else ""
        score = f"{r.score:.4g}" if r.score is not None else "-"
        status = r.status + (f": {r.detail}" if r.detail else "")
        rows.append([mark, r.candidate.label, score, f"{r.seconds:.1f}", status])
    return render(rows, right=(2, 3), indent="")


def note(results, best, kind="search", extra=None):
    """The JSON recorded in git notes (``refs/notes/theta``) for a merge chosen by search or auto."""
    return {
        "schema": 1,
        "chosen_by": kind,
        "chosen": best.to_json() if best is not None else None,
        "candidates": [r.to_json() for r in results],
        **(extra or {}),
    }
