"""``python -m git_theta``: the same CLI as the ``git-theta`` command."""

from git_theta.cli.main import main

main()
