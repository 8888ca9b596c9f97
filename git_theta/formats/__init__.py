"""Checkpoint formats: how a file splits into tensors and file-level data, and joins back."""
