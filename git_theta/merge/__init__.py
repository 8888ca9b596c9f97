"""Model merging: the three-way merge driver, its configuration and the merge operators."""
