"""``python -m git_theta``: the same CLI as the ``git-theta`` command."""

from .cli import main

main()
