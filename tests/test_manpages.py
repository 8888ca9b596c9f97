"""Man pages: generated from the click commands, committed, installed where ``man`` finds them.

git turns ``git theta --help`` into ``man git-theta``; git-theta turns ``git theta <command>
--help`` into ``man git-theta-<command>``; ``-h`` stays click's short help. The pages in
``man/man1/`` must be exactly what ``man/generate.py`` makes from the commands now, so the help
text and the pages cannot drift apart.
"""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from git_theta import registry as plugins
from git_theta.cli.main import cli, man_page

ROOT = Path(__file__).resolve().parent.parent
MAN1 = ROOT / "man" / "man1"


def _generator():
    spec = importlib.util.spec_from_file_location("man_generate", ROOT / "man" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore:.*make_default_short_help:DeprecationWarning")  # inside click-man
def test_committed_man_pages_are_what_the_generator_makes_now():
    pytest.importorskip("click_man")
    wanted = _generator().pages()
    committed = {p.name: p.read_text() for p in MAN1.glob("*.1")}
    assert sorted(committed) == sorted(wanted), "run: python man/generate.py"
    for name, text in wanted.items():
        assert committed[name] == text, f"{name} is stale: run python man/generate.py"


def test_every_command_a_user_runs_has_a_page():
    visible = {name for name, command in cli.commands.items() if not command.hidden}
    assert {p.name for p in MAN1.glob("*.1")} == {"git-theta.1"} | {f"git-theta-{n}.1" for n in visible}
    assert {"install", "track", "merge", "push", "fsck"} <= visible


def test_which_page_help_asks_for():
    assert man_page(["--help"]) == "git-theta"
    assert man_page(["merge", "--help"]) == "git-theta-merge"
    assert man_page(["ls-files", "HEAD", "--help"]) == "git-theta-ls-files"
    assert man_page(["nosuch", "--help"]) == "git-theta"
    assert man_page(["merge", "-h"]) is None  # click's short help
    assert man_page(["diff", "--", "--help"]) is None  # a path, not an option
    assert man_page(["filter-process", "--help"]) == "git-theta"  # hidden: git's, no page


def test_short_help_answers_the_first_questions():
    """merge -h lists every built-in operator and says what happens without --operator; track -h
    shows an example pattern; ls-files -h says what 'stored' means."""

    def short_help(*args):
        proc = subprocess.run([sys.executable, "-m", "git_theta", *args, "-h"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return " ".join(proc.stdout.split())

    merge = short_help("merge")
    builtin = [row["name"] for row in plugins.describe() if row["kind"] == "merge" and row["builtin"]]
    assert len(builtin) >= 18
    for name in builtin:
        assert f" {name}," in merge or f" {name} " in merge, name
    assert "Without --operator" in merge and "conflict" in merge
    assert "git theta track '*.safetensors'" in short_help("track")
    assert "'stored' is the bytes of the objects this version added" in short_help("ls-files")


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed (apt-get install man-db)")
@pytest.mark.parametrize(
    ("args", "title", "expected"),
    [
        (["git", "theta", "--help"], "GIT-THETA(1)", "git-theta-merge(1)"),
        (["git", "theta", "merge", "--help"], "GIT-THETA MERGE(1)", "model_stock"),
        (["git", "theta", "ls-files", "--help"], "GIT-THETA LS-FILES(1)", "this version added"),
    ],
)
def test_help_shows_the_installed_man_page(git_env, tmp_path, args, title, expected):
    """In this interpreter's environment (a venv: man derives <venv>/share/man from PATH)."""
    env = {k: v for k, v in git_env.items() if k not in ("MANPATH", "MANOPT")}
    env.update(MANPAGER="cat", PAGER="cat", MANWIDTH="100")
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "No manual entry" not in proc.stderr
    # undo man's line-end hyphenation (U+2010 in a UTF-8 locale, '-' in C) before matching words
    text = " ".join(re.sub(r"[\u2010-]\n\s+", "", proc.stdout).split())
    assert text.startswith(title), text[:200]
    assert expected in text


def test_short_help_is_still_clicks(git_env, tmp_path):
    proc = subprocess.run(["git", "theta", "merge", "-h"], cwd=tmp_path, env=git_env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: git-theta merge")
