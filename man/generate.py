"""Generate the man pages of ``git theta`` and each ``git theta <command>`` from the click commands.

git turns ``git theta --help`` into ``man git-theta``, and git-theta's CLI turns
``git theta <command> --help`` into ``man git-theta-<command>`` (``-h`` stays click's short help).
The pages are committed under ``man/man1/`` and installed by pip into ``<prefix>/share/man/man1``
(setup.cfg ``data_files``), where ``man`` finds them from ``PATH`` inside a virtualenv. They are
made with click-man from the same click commands that print ``-h``, so the two cannot disagree;
``tests/test_manpages.py`` checks the committed files equal what this produces now.

Run after changing a command's help text::

    python man/generate.py            # rewrites man/man1/*.1
"""

import importlib.metadata
import sys
from pathlib import Path

import click

OUT = Path(__file__).resolve().parent / "man1"

#: the documentation page of each command, named in the man page's SEE ALSO
DOCS = {
    "install": "commands/setup.md",
    "uninstall": "commands/setup.md",
    "track": "commands/setup.md",
    "untrack": "commands/setup.md",
    "add": "commands/add.md",
    "ls-files": "commands/inspect.md",
    "plugins": "commands/inspect.md",
    "status": "commands/inspect.md",
    "diff": "commands/diff-log.md",
    "log": "commands/diff-log.md",
    "merge": "commands/merge.md",
    "merge-files": "commands/merge.md",
    "push": "commands/remote.md",
    "fetch": "commands/remote.md",
    "pull": "commands/remote.md",
    "checkout": "commands/remote.md",
    "fsck": "commands/maintenance.md",
    "prune": "commands/maintenance.md",
    "repack": "commands/maintenance.md",
}


def _see_also(doc, others):
    refs = ", ".join(rf"\fB{name}\fR(1)" for name in others)
    return (
        '.SH "SEE ALSO"\n'
        f"{refs}\n"
        ".PP\n"
        f"The documentation site, page docs/{doc} of the git-theta repository "
        "(build it with 'pip install -e \".[docs]\" && mkdocs serve').\n"
    )


def _name_line(text, command):
    """The NAME line with the command's whole first sentence (click-man cuts it at 45 characters)."""
    head, sep, rest = text.partition(".SH NAME\n")
    line, newline, tail = rest.partition("\n")
    name = line.split(r" \- ")[0]
    summary = command.get_short_help_str(limit=200)
    return head + sep + rf"{name} \- {summary}" + newline + tail


def _escape_quotes(text):
    """Help text lines that start with an apostrophe would be roff control lines (and vanish):
    ``\\&`` makes them text. click-man emits no line of its own that starts with one."""
    return "\n".join("\\&" + line if line.startswith("'") else line for line in text.split("\n"))


def pages():
    """{file name: man page text} for git-theta and every visible command, in the CLI's order."""
    from click_man.core import generate_man_page

    from git_theta.cli.main import cli

    version = importlib.metadata.version("git-theta")
    commands = {name: command for name, command in cli.commands.items() if not command.hidden}
    # The top page lists only the commands a user runs (git's filter and drivers are hidden).
    top = click.Group(cli.name, commands=list(commands.values()), params=cli.params, help=cli.help)
    root = click.Context(top, info_name="git-theta")
    meta = {"version": f"git-theta {version}", "date": version}
    out = {
        "git-theta.1": _name_line(_escape_quotes(generate_man_page(root, **meta)), cli)
        + _see_also("index.md", [f"git-theta-{name}" for name in commands])
    }
    for name, command in commands.items():
        text = generate_man_page(click.Context(command, info_name=name, parent=root), **meta)
        text = _name_line(_escape_quotes(text), command)
        out[f"git-theta-{name}.1"] = text + _see_also(DOCS.get(name, "index.md"), ["git-theta"])
    return out


def main():
    OUT.mkdir(exist_ok=True)
    wanted = pages()
    for stale in OUT.glob("*.1"):
        if stale.name not in wanted:
            stale.unlink()
    for name, text in wanted.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(wanted)} man pages to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
