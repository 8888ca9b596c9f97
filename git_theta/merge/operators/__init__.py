"""The built-in merge operators, grouped by family (each registered as an entry point in setup.cfg)."""
