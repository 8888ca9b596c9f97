"""Gives the plugin packages' tests the project's fixtures (``repo``, ``make_repo``, ``git_env``).

The fixtures live in ``tests/conftest.py``; it is loaded here under its own module name so plugin
tests use exactly the same isolated git environment as the core tests.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "git_theta_project_conftest", Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
)
_project = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_project)

# Every public name of it, fixtures and helpers alike: pytest imports both files as ``conftest``,
# so a core test's ``from conftest import ...`` may find this one (a name missing here failed the
# suite only when the workers happened to load this file first).
globals().update({name: value for name, value in vars(_project).items() if not name.startswith("_")})
