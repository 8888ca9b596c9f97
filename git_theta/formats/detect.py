"""Which checkpoint format a file is: the ``theta-format`` attribute, else its content.

Every reader of a checkpoint starts here: clean, ``git theta add --update-path`` (an adapter file),
merge-files and the merge's side data.
"""

from git_theta import registry as plugins
from git_theta.errors import CheckpointError
from git_theta.git.allowlist import theta_attribute

#: how many leading bytes a format's ``sniff`` is shown
SNIFF_BYTES = 4096


def detect_format(repo, path, head):
    """The format plugin for ``path``: the ``theta-format`` attribute if set, else by content."""
    forced = theta_attribute(repo, path, "theta-format") if repo is not None else None
    if forced is not None:
        return plugins.get("format", forced, needed_by=f"{path} (attribute theta-format)")
    candidates = plugins.all_plugins("format")
    # Prefer formats whose usual suffix matches, then the rest; content decides in both cases.
    candidates.sort(key=lambda f: not path.endswith(tuple(f.suffixes)))
    for fmt in candidates:
        if fmt.sniff(head, path):
            return fmt
    raise CheckpointError(
        f"{path}: not a checkpoint format git-theta knows ({', '.join(plugins.names('format'))})",
        hint="set the format with the attribute theta-format=NAME in .gitattributes, "
        "or untrack the file with 'git theta untrack'",
    )
