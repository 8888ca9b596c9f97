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

pytest_collection_modifyitems = _project.pytest_collection_modifyitems
git_env = _project.git_env
repo = _project.repo
make_repo = _project.make_repo
GitRepo = _project.GitRepo
GIT_THETA = _project.GIT_THETA
random_state_dict = _project.random_state_dict
save_safetensors = _project.save_safetensors
