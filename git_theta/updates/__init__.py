"""Update types: the encodings a tensor's new version can be stored in (dense, deltas...)."""
