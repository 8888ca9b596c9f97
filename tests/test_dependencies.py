"""Every declared dependency is used, and the plugin API and the filter stay light."""

import ast
import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: distribution name -> the module it installs, where the two differ
MODULE_OF = {"pyyaml": "yaml"}


def _imported_top_level_modules():
    found = set()
    for path in (ROOT / "git_theta").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_every_install_requirement_is_imported():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requirements = [line.strip() for line in config["options"]["install_requires"].splitlines() if line.strip()]
    names = [req.split(">")[0].split("=")[0].split("<")[0].strip().lower() for req in requirements]
    imported = _imported_top_level_modules()
    unused = [name for name in names if MODULE_OF.get(name, name.replace("-", "_")) not in imported]
    assert names and not unused, f"declared in setup.cfg but never imported by git_theta: {unused}"


def test_plugin_api_and_filter_import_no_heavy_module():
    """A format plugin loads inside the filter process: importing the plugin API, like the filter
    itself, must not pull in numpy, click, typing or a git library. Only what these imports load
    counts: an editable install's import hook may load typing before any of git-theta runs."""
    code = (
        "import sys; before = set(sys.modules); import git_theta.plugin_api, git_theta.filter.process;"
        "print(','.join(m for m in ('numpy', 'click', 'typing', 'git', 'requests')"
        " if m in sys.modules and m not in before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_the_diff_function_survives_a_diff_subpackage():
    """git_theta.diff is a public function and (after issue 14's relayout) a subpackage: importing
    the subpackage must leave ``git_theta.diff(...)`` callable, with the subpackage's attributes."""
    code = """
import sys, types, git_theta
calls = []
git_theta._diff_function = lambda *a, **k: calls.append((a, k)) or {"files": []}
sub = types.ModuleType("git_theta.diff")
sub.text = "the text module"
sys.modules["git_theta.diff"] = sub
setattr(git_theta, "diff", sub)  # what the import system does for a submodule
assert git_theta.diff is sub and git_theta.diff.text == "the text module"
assert git_theta.diff("m.safetensors", stat=True) == {"files": []}
assert calls == [(("m.safetensors",), {"stat": True})]
"""
    subprocess.run([sys.executable, "-c", code], check=True)
