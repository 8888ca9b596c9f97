"""Moving objects to and from remotes: Git LFS servers and directories."""
