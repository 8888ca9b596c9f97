"""``git theta merge --search`` / ``merge-files --search`` with a scripted evaluation command, the
score parser, the candidates file, and the ``auto`` predictor's data file and explanation."""

import json
import sys
import textwrap

import numpy as np
import pytest
from conftest import save_safetensors
from safetensors.numpy import load_file

from git_theta.merge.search import Candidate, default_candidates, parse_candidates, parse_score

MODEL = "model.safetensors"

#: The evaluation command: scores a merged model by its distance to a target checkpoint
#: (-max|w - target|, so 0 is a perfect score). MODE picks how it reports or misbehaves.
EVAL = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    from safetensors.numpy import load_file
    path, target, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    w = load_file(path)["w"]
    dist = float(np.abs(w - load_file(target)["w"]).max())
    if mode == "text":
        print("epoch 3 loss 0.25")
        print(f"accuracy {-dist}")
    elif mode == "json":
        print("evaluating 12 batches")
        print(json.dumps({"n": 12, "score": -dist}))
    elif mode == "fail-far" and dist > 0:
        print("out of memory", file=sys.stderr)
        sys.exit(3)
    elif mode == "hang-far" and dist > 0:
        time.sleep(600)
    elif mode == "noscore" and dist > 0:
        print("done")
    elif mode == "together":
        # succeeds only when another candidate's command runs at the same time (-j 2)
        marks = sys.argv[4]
        open(os.path.join(marks, str(os.getpid())), "w").close()
        for _ in range(400):
            if len(os.listdir(marks)) >= 2:
                print(-dist)
                break
            time.sleep(0.05)
        else:
            sys.exit(1)
    else:
        print(-dist)
    """
)


def model(seed):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((8, 8)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32)}


def moved(t, seed):
    return (t + 0.1 * np.random.default_rng(seed).standard_normal(t.shape)).astype(t.dtype)


@pytest.fixture
def setup(repo, tmp_path):
    """base; b1, b2, b3 and then main fine-tune 'w'. Returns a function making the --eval command whose
    target is the linear merge of the given sides (so 'linear' on those sides scores 0)."""
    base = model(0)
    save_safetensors(repo.file(MODEL), base)
    repo.commit("base")
    versions = {"main": base}
    for i, branch in enumerate(("b1", "b2", "b3"), start=1):
        repo.git("checkout", "-q", "-b", branch, "main")
        versions[branch] = dict(base, w=moved(base["w"], i))
        save_safetensors(repo.file(MODEL), versions[branch])
        repo.commit(branch)
    repo.git("checkout", "-q", "main")
    versions["main"] = dict(base, w=moved(base["w"], 9))  # HEAD moves too: every side is a fine-tune
    save_safetensors(repo.file(MODEL), versions["main"])
    repo.commit("main")
    script = tmp_path / "eval.py"
    script.write_text(EVAL)

    def command(sides, mode="plain", extra=""):
        target = tmp_path / f"target-{'-'.join(sides)}.safetensors"
        w = np.mean(np.stack([versions[s]["w"] for s in sides]), axis=0, dtype=np.float32)
        save_safetensors(target, {"w": w})
        return f"{sys.executable} {script} {{model}} {target} {mode} {extra}".strip()

    return command


def candidates_file(tmp_path, text):
    path = tmp_path / "candidates.txt"
    path.write_text(text)
    return str(path)


def test_search_commits_best_with_note_and_log(repo, setup):
    head = repo.git("rev-parse", "HEAD").stdout.strip()
    out = repo.theta("merge", "--search", "--eval", setup(["main", "b1"], "text"), "b1").stdout
    assert "best: linear (score 0)" in out.replace("-0", "0")
    assert "task_arithmetic lambda=0.5" in out and "slerp t=0.5" in out  # the two-model grid
    parents = repo.git("rev-parse", "HEAD^1", "HEAD^2").stdout.split()
    assert parents[0] == head
    message = repo.git("log", "-1", "--format=%B").stdout
    assert "git theta merge --search: chose linear (score" in message
    note = json.loads(repo.git("notes", "--ref=theta", "show", "HEAD").stdout)
    assert note["chosen_by"] == "search" and note["chosen"]["operator"] == "linear"
    assert len(note["candidates"]) == len(default_candidates(2))
    assert all(r["status"] == "ok" for r in note["candidates"])
    log = repo.theta("log").stdout
    assert "chosen by search: linear" in log
    assert (
        json.loads(repo.theta("log", "--json").stdout)["commits"][0]["merge_choice"]["chosen"]["operator"] == "linear"
    )
    merged = load_file(str(repo.file(MODEL)))["w"]
    assert repo.status() == ""
    np.testing.assert_array_equal(merged, load_file(setup(["main", "b1"]).split()[3])["w"])


def test_json_score_failures_and_dry_run(repo, setup, tmp_path):
    head = repo.git("rev-parse", "HEAD").stdout.strip()
    cands = candidates_file(tmp_path, "# tried in order\nties density=0.5\nlinear\ntask_arithmetic lambda=1\n")
    proc = repo.theta(
        "merge",
        "--search",
        "--dry-run",
        "--json",
        "--candidates",
        cands,
        "--eval",
        setup(["main", "b1"], "fail-far"),
        "b1",
    )
    data = json.loads(proc.stdout)
    status = {c["recipe"]: (c["status"], c["detail"]) for c in data["candidates"]}
    assert status["linear"][0] == "ok"
    assert status["ties density=0.5"] == ("failed", "exit 3: out of memory")
    assert status["task_arithmetic lambda=1"][0] == "failed"
    assert data["chosen"]["operator"] == "linear"
    assert repo.git("rev-parse", "HEAD").stdout.strip() == head  # --dry-run wrote nothing
    assert repo.git("notes", "--ref=theta", "list", check=False).stdout == ""
    # a JSON object with "score" on the last line wins over other numbers
    proc = repo.theta(
        "merge", "--search", "--dry-run", "--json", "--candidates", cands, "--eval", setup(["main", "b1"], "json"), "b1"
    )
    assert {c["status"] for c in json.loads(proc.stdout)["candidates"]} == {"ok"}


def test_no_score_and_timeouts_are_marked(repo, setup, tmp_path):
    cands = candidates_file(tmp_path, "linear\nties density=0.5\n")
    proc = repo.theta(
        "merge",
        "--search",
        "--dry-run",
        "--json",
        "--candidates",
        cands,
        "--eval",
        setup(["main", "b1"], "noscore"),
        "b1",
    )
    rows = {c["recipe"]: c for c in json.loads(proc.stdout)["candidates"]}
    assert rows["ties density=0.5"]["status"] == "failed" and "no score" in rows["ties density=0.5"]["detail"]
    proc = repo.theta(
        "merge",
        "--search",
        "--candidates",
        cands,
        "--timeout",
        "1",
        "-j",
        "2",
        "--eval",
        setup(["main", "b1"], "hang-far"),
        "b1",
    )
    note = json.loads(repo.git("notes", "--ref=theta", "show", "HEAD").stdout)
    rows = {c["recipe"]: c for c in note["candidates"]}
    assert rows["ties density=0.5"]["status"] == "timeout"
    assert note["chosen"]["operator"] == "linear"


def test_nothing_scored_is_an_error(repo, setup, tmp_path):
    cands = candidates_file(tmp_path, "ties density=0.5\n")
    proc = repo.theta("merge", "--search", "--candidates", cands, "--eval", "false {model}", "b1", check=False)
    assert proc.returncode != 0
    assert "error: no candidate merge was scored: ties density=0.5: failed (exit 1: )" in proc.stderr
    assert "internal error" not in proc.stderr
    # the time budget: the first candidate runs out of it, the second is never started
    cands = candidates_file(tmp_path, "ties density=0.5\nlinear\n")
    proc = repo.theta(
        "merge",
        "--search",
        "--candidates",
        cands,
        "--time-budget",
        "3",
        "--eval",
        setup(["main", "b1"], "hang-far"),
        "b1",
        check=False,
    )
    assert proc.returncode != 0
    # (on a very busy machine the budget may be spent while the first merge is still being built)
    assert "ties density=0.5: timeout (no score after" in proc.stderr or "ties density=0.5: skipped" in proc.stderr
    assert "linear: skipped (time budget spent)" in proc.stderr


def test_parallel_candidates_run_at_once(repo, setup, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    cands = candidates_file(tmp_path, "linear\nties density=0.5\n")
    proc = repo.theta(
        "merge",
        "--search",
        "--dry-run",
        "--json",
        "-j",
        "2",
        "--candidates",
        cands,
        "--eval",
        setup(["main", "b1"], "together", str(marks)),
        "b1",
    )
    assert {c["status"] for c in json.loads(proc.stdout)["candidates"]} == {"ok"}
    assert len(list(marks.iterdir())) == 2


def test_three_branches_greedy_selection(repo, setup, tmp_path):
    cands = candidates_file(tmp_path, "linear\n")
    proc = repo.theta(
        "merge", "--search", "--candidates", cands, "--eval", setup(["main", "b2", "b1"]), "b1", "b2", "b3"
    )
    assert "greedy forward selection" in proc.stdout
    note = json.loads(repo.git("notes", "--ref=theta", "show", "HEAD").stdout)
    assert sorted(note["chosen"]["branches"]) == ["b1", "b2"]
    parents = repo.git("log", "-1", "--format=%P").stdout.split()
    assert len(parents) == 3  # HEAD and the two branches chosen; b3 left out
    assert "branches in order" in repo.git("log", "-1", "--format=%B").stdout


def test_merge_files_search(repo, setup, tmp_path):
    files = [tmp_path / f"{rev}.safetensors" for rev in ("main", "b1", "b2")]
    for rev, path in zip(("main", "b1", "b2"), files):  # each side's checkpoint as checked out
        repo.git("checkout", "-q", rev)
        path.write_bytes(repo.file(MODEL).read_bytes())
    repo.git("checkout", "-q", "main")
    out = tmp_path / "merged.safetensors"
    cmd = setup(["b1", "b2"])
    dry = repo.theta(
        "merge-files",
        "--search",
        "--dry-run",
        "--eval",
        cmd,
        str(files[1]),
        str(files[2]),
        "--base",
        str(files[0]),
        "-o",
        str(out),
    )
    assert "nothing written" in dry.stdout and not out.exists()
    repo.theta(
        "merge-files", "--search", "--eval", cmd, str(files[1]), str(files[2]), "--base", str(files[0]), "-o", str(out)
    )
    np.testing.assert_array_equal(load_file(str(out))["w"], load_file(cmd.split()[3])["w"])
    assert list(tmp_path.glob("theta-search-*")) == []


def test_usage_errors(repo, setup):
    proc = repo.theta("merge", "--search", "b1", check=False)
    assert proc.returncode != 0 and "--search needs --eval" in proc.stderr
    proc = repo.theta("merge", "--search", "--eval", "true", "b1", check=False)
    assert "has no {model}" in proc.stderr
    proc = repo.theta("merge", "--search", "--operator", "ties", "--eval", "true {model}", "b1", check=False)
    assert "error: --operator goes without --search" in proc.stderr


@pytest.mark.parametrize(
    "output, score",
    [
        ("accuracy 0.91\n", 0.91),
        ("step 10\nloss 1e-3\n\n", 1e-3),
        ('log 5\n{"score": 0.5, "n": 3}\n', 0.5),
        ('{"acc": 0.7}\n', 0.7),  # a JSON object without "score": its last number
        ("-12.5 points\n", -12.5),
        ("nothing here\n", None),
        ("score nan\n", None),
    ],
)
def test_parse_score(output, score):
    assert parse_score(output) == score


def test_parse_candidates():
    assert parse_candidates("ties density=0.2 # sparse\n\nlinear\n", "f") == [
        Candidate.of("ties", {"density": "0.2"}),
        Candidate.of("linear"),
    ]
    assert parse_candidates('[{"operator": "ties", "params": {"density": 0.2, "weight": [1, 0.5]}}]', "f") == [
        Candidate.of("ties", {"density": "0.2", "weight": "1,0.5"})
    ]
    from git_theta.errors import UsageError

    with pytest.raises(UsageError, match="no candidates"):
        parse_candidates("# nothing\n", "f")
    with pytest.raises(UsageError, match="item 0"):
        parse_candidates('[{"params": {}}]', "f")
    assert all(c.operator not in ("slerp", "nuslerp") for c in default_candidates(3))


# ---------------------------------------------------------------------------------------- auto
def predictor_data(features=("cosine", "n_models"), candidates=None):
    """A small predictor in the shipped file's format."""
    return {
        "schema": 1,
        "models": {
            "structural": {
                "features": list(features),
                "mean": [0.0] * len(features),
                "scale": [1.0] * len(features),
                "candidates": candidates
                or [
                    {"operator": "linear", "params": {}, "intercept": 0.5, "coef": [0.2, 0.0]},
                    {"operator": "ties", "params": {"density": 0.5}, "intercept": 0.6, "coef": [-0.2, 0.0]},
                    {"operator": "slerp", "params": {"t": 0.5}, "intercept": 0.9, "coef": [0.0, 0.0], "max_models": 2},
                ],
            }
        },
    }


def test_shipped_predictor_loads_and_covers_the_grid():
    from git_theta.merge.auto import FUNCTIONAL, STRUCTURAL, load_predictor

    data = load_predictor()
    structural = data["models"]["structural"]
    assert set(STRUCTURAL) <= set(structural["features"])
    assert set(FUNCTIONAL) <= set(data["models"]["functional"]["features"])
    shipped = {
        Candidate.of(c["operator"], {k: str(v) for k, v in c["params"].items()}).recipe
        for c in structural["candidates"]
    }
    assert shipped == {c.recipe for c in default_candidates(2)}
    assert data["held_out"]  # the held-out report travels with the coefficients


def test_predict_ranks_and_respects_max_models(tmp_path):
    from git_theta.merge.auto import load_predictor, predict

    path = tmp_path / "auto.json"
    path.write_text(json.dumps(predictor_data()))
    data = load_predictor(path)
    two = predict({"cosine": 1.0}, 2, data)
    assert (two.operator, two.params) == ("slerp", {"t": "0.5"})
    three = predict({"cosine": 1.0}, 3, data)  # slerp takes two models
    assert three.operator == "linear" and [r for r, _ in three.scores] == ["linear", "ties density=0.5"]
    assert three.scores[0][1] == pytest.approx(0.7)
    assert predict({"cosine": -1.0}, 3, data).operator == "ties"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(schema=2), "schema 1"),
        (lambda d: d["models"].pop("structural"), "no 'structural'"),
        (lambda d: d["models"]["structural"].update(mean=[0.0]), "'mean' must be 2"),
        (lambda d: d["models"]["structural"].update(scale=[1.0, 0.0]), "zero in 'scale'"),
        (lambda d: d["models"]["structural"]["candidates"][0].update(coef=[1.0]), "a candidate is not"),
        (lambda d: d["models"]["structural"]["candidates"][0].update(intercept="x"), "a candidate is not"),
    ],
)
def test_predictor_file_is_checked(tmp_path, change, message):
    from git_theta.errors import ConfigError
    from git_theta.merge.auto import load_predictor

    data = predictor_data()
    change(data)
    path = tmp_path / "auto.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        load_predictor(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        load_predictor(path)


def test_auto_explains_its_pick_then_merges(repo, setup):
    head = repo.git("rev-parse", "HEAD").stdout.strip()
    out = repo.theta("merge", "--dry-run", "--operator", "auto", "b1").stdout
    assert "features: cosine=" in out and "log_rel_norm=" in out
    assert "predicted normalized accuracy:" in out
    pick = out.split("pick: ")[1].splitlines()[0]
    scores = [line.split() for line in out.splitlines() if line.startswith("   ")]
    assert scores[0][0] == "*" and " ".join(scores[0][2:]) == pick
    assert [float(s[-len(s) + (1 if s[0] == "*" else 0)]) for s in scores] == sorted(
        (float(s[-len(s) + (1 if s[0] == "*" else 0)]) for s in scores), reverse=True
    )
    assert repo.git("rev-parse", "HEAD").stdout.strip() == head
    data = json.loads(repo.theta("merge", "--dry-run", "--json", "--operator", "auto", "b1").stdout)["auto"]
    assert data["predictor"] == "structural" and data["branches"] == ["b1"]
    repo.theta("merge", "--operator", "auto", "b1")
    assert "git theta merge --operator auto: chose " + pick in repo.git("log", "-1", "--format=%B").stdout
    note = json.loads(repo.git("notes", "--ref=theta", "show", "HEAD").stdout)
    assert note["chosen_by"] == "auto" and note["auto"]["features"] == data["features"]
    assert f"chosen by auto: {pick}" in repo.theta("log").stdout


def test_auto_with_probe_and_three_branches(repo, setup, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(
            """
        import sys, numpy as np
        from safetensors.numpy import load_file
        w = load_file(sys.argv[1] + "/model.safetensors")["w"]
        print(" ".join(str(v) for v in np.tanh(w @ np.ones(8, np.float32))))
        """
        )
    )
    out = repo.theta(
        "merge", "--dry-run", "--operator", "auto", "--probe", f"{sys.executable} {probe} {{model}}", "b1", "b2", "b3"
    ).stdout
    assert "act_cosine=" in out and "functional predictor" in out
    assert "branches, in merge order (greedy on predicted pair scores): " in out
    proc = repo.theta("merge", "--dry-run", "--operator", "auto", "--probe", "false {model}", "b1", check=False)
    assert proc.returncode != 0 and "error: command exited 1" in proc.stderr


def test_merge_files_auto(repo, setup, tmp_path):
    files = [tmp_path / f"{rev}.safetensors" for rev in ("main", "b1", "b2")]
    for rev, path in zip(("main", "b1", "b2"), files):
        repo.git("checkout", "-q", rev)
        path.write_bytes(repo.file(MODEL).read_bytes())
    repo.git("checkout", "-q", "main")
    out = tmp_path / "merged.safetensors"
    args = ("merge-files", "--operator", "auto", str(files[1]), str(files[2]), "--base", str(files[0]), "-o", str(out))
    text = repo.theta(*args[:3], "--dry-run", *args[3:]).stdout
    pick = text.split("pick: ")[1].splitlines()[0]
    assert "features: cosine=" in text and not out.exists()
    assert repo.theta(*args).stdout.startswith(f"auto chose {pick}")
    assert set(load_file(str(out))) == {"w", "b"}
