"""git's filters: the long-running process, pkt-line, clean and smudge."""
