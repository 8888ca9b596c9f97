"""One function per user command: returns data, usable from Python; the CLI renders it."""
