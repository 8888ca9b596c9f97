"""git-theta plugin: Fisher-weighted averaging as a merge operator (Matena & Raffel 2022)."""

__version__ = "0.1.0"
