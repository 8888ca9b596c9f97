"""The ``git-theta`` command line (``git theta <verb>``). Only this layer prints and exits."""

import sys

import click

from .entry import single_threaded_blas
from .messages import exit_reporting


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
    from .commands import filters, history, inspect, maintenance, merge, remote, setup, updates

    for module in (setup, inspect, updates, history, merge, remote, maintenance, filters):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main(argv=None):
    """Run the CLI; GitThetaError becomes ``error:``/``hint:`` lines and its exit code."""
    single_threaded_blas()

    def invoke():
        try:
            return cli.main(args=argv, prog_name="git-theta", standalone_mode=False)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)

    code = exit_reporting(invoke, aborts=(click.exceptions.Abort,))
    sys.exit(code if isinstance(code, int) else 0)
