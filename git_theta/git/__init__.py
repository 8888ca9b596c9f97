"""The only code that runs git: the repository, attributes, hooks, install, scans of manifests."""
