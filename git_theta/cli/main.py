"""The ``git-theta`` command line (``git theta <verb>``). Only this layer prints and exits."""

import sys

import click

from git_theta.cli.entry import single_threaded_blas
from git_theta.cli.messages import exit_reporting


class ThetaGroup(click.Group):
    """Lists commands in the order they were added (the order a user meets them)."""

    def list_commands(self, ctx):
        return list(self.commands)


@click.group(cls=ThetaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="git-theta", prog_name="git-theta")
def cli():
    """Version machine-learning checkpoints with git.

    Checkpoints are stored per tensor in a content-addressed store; git keeps a small text
    manifest. Run 'git theta install' once, then 'git theta track PATTERN'.
    """


def _register():
    from git_theta.cli.commands import filters, history, inspect, maintenance, merge, remote, setup, updates

    for module in (setup, inspect, updates, history, merge, remote, maintenance, filters):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def man_page(args):
    """The man page ``--help`` in ``args`` asks for, as git-lfs does: ``git-theta-<command>``, or
    ``git-theta`` without a command; None when there is no ``--help`` (``-h`` is click's short help).

    ``git theta --help`` never gets here (git itself runs ``man git-theta``); ``git theta <command>
    --help`` does, and shows the same kind of page.
    """
    options = args[: args.index("--")] if "--" in args else args
    if "--help" not in options:
        return None
    words = [a for a in options if not a.startswith("-")]
    command = cli.commands.get(words[0]) if words else None
    if command is not None and not command.hidden:
        return f"git-theta-{words[0]}"
    return "git-theta"


def show_man_page(page):
    """Show ``page`` with man and return its exit code; None when man or the page is missing (then
    click's help is printed instead, e.g. on a system without man-db)."""
    import subprocess

    try:
        found = subprocess.run(["man", "-w", page], capture_output=True).returncode == 0
    except OSError:
        return None
    return subprocess.call(["man", page]) if found else None


def main(argv=None):
    """Run the CLI; GitThetaError becomes ``error:``/``hint:`` lines and its exit code."""
    single_threaded_blas()
    page = man_page(sys.argv[1:] if argv is None else list(argv))
    if page is not None:
        code = show_man_page(page)
        if code is not None:
            sys.exit(code)

    def invoke():
        try:
            return cli.main(args=argv, prog_name="git-theta", standalone_mode=False)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)

    code = exit_reporting(invoke, aborts=(click.exceptions.Abort,))
    sys.exit(code if isinstance(code, int) else 0)
