"""The command line (click): parse, call the porcelain, render. The only layer that prints."""
