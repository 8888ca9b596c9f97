"""Typed errors raised by library code.

Library modules raise these; only the CLI turns them into ``error:`` / ``hint:`` lines and an exit
code. Every message should name the file, the tensor and the object concerned where they are known,
and every hint should say what the user can do next.
"""

import errno
import os

# errnos that mean "the file system (or the user's quota on it) is full"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class GitThetaError(Exception):
    """Base class of every error git-theta reports to a user."""

    exit_code = 1

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self):
        return self.message


class UsageError(GitThetaError):
    """The command line or a setting is wrong."""

    exit_code = 2


class ConfigError(UsageError):
    """A git config value or attribute is invalid."""


class NotInRepositoryError(GitThetaError):
    """The command needs a git repository and none was found."""

    exit_code = 128


class GitCommandError(GitThetaError):
    """A git subprocess failed."""


class CheckpointError(GitThetaError):
    """A checkpoint file is truncated, corrupt or of an unsupported kind."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need to run code to load (a pickle with globals outside the allow-list)."""


class ManifestError(GitThetaError):
    """A manifest is malformed, tampered with, or of an unknown schema version."""


class ObjectMissingError(GitThetaError):
    """An object a manifest needs is not in the local store."""

    def __init__(self, message, hint=None, oids=()):
        super().__init__(message, hint)
        self.oids = tuple(oids)


class ObjectCorruptError(GitThetaError):
    """An object's bytes do not match its id, or its decoded tensor does not match its digest."""


class PluginError(GitThetaError):
    """A plugin is missing, malformed or registered twice."""


class UpdateError(GitThetaError):
    """An update (delta) cannot be encoded or does not explain the change it claims to."""


class FilterProtocolError(GitThetaError):
    """git spoke the long-running filter protocol in a way we cannot follow."""


class RemoteError(GitThetaError):
    """A remote (LFS server or directory) refused, failed or could not be reached."""


class DiskFullError(GitThetaError):
    """A file system filled up (or a quota ran out) while git-theta wrote to it.

    Raised where the directory written to is known (the object store, the spool's temp dir), so the
    message names that file system; the partial file is removed before it is raised.
    """

    @classmethod
    def check(cls, exc, directory, doing, hint=None):
        """Raise DiskFullError for ``exc`` when it is ENOSPC/EDQUOT while ``doing`` in ``directory``."""
        if not (isinstance(exc, OSError) and exc.errno in DISK_FULL):
            return
        directory = os.path.realpath(directory)
        mount = directory
        while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
            mount = os.path.dirname(mount)
        what = "no space left" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        raise cls(
            f"{what} on the file system mounted at {mount} while {doing} in {directory}; "
            "the partial file was removed and nothing was changed",
            hint=hint
            or f"free space on {mount} (git theta prune deletes unreferenced objects), then run the command again",
        ) from None
