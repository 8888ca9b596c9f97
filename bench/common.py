"""What every benchmark script needs: an isolated git environment and the size of a folder."""

import os
import sys
from pathlib import Path


def isolated_env(home):
    """Environment for git and git-theta with their own HOME (identity and default branch set),
    no system config, no prompts, and this interpreter's scripts first on PATH."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / ".gitconfig").write_text(
        "[user]\n\tname = bench\n\temail = bench@example.invalid\n[init]\n\tdefaultBranch = main\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    # As installed, git-theta runs from compiled bytecode (pip compiles it at install time): an
    # environment that forbids writing it would make every filter start recompile each module it
    # imports (~40 ms, measured on the development machine, which sets this).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def du(path):
    """Bytes of all files below ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
