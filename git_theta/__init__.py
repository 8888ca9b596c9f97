"""git-theta: version machine-learning checkpoints with git.

Importing the package is cheap; the heavy parts (numpy, torch, zstandard) load only when used.
"""

__version__ = "0.2.0"
