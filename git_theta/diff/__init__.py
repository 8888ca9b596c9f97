"""What changed: the diff engine, tensor statistics, text and plots, the log, git's diff driver."""
