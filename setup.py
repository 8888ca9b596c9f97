"""Build hook: everything is declared in setup.cfg; this file only makes ``pip install -e`` install
the man pages too.

setuptools' editable wheels skip ``data_files``: ``editable_wheel._run_install("data")`` asks the
distribution for ``has_data()``, which does not exist (it is ``has_data_files()``), so the man pages
never reach ``<venv>/share/man/man1`` and ``git theta --help`` finds no page. The override runs
``install_data`` itself; with a setuptools that does it already, the result is the same.
"""

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel


class EditableWheel(editable_wheel):
    """An editable wheel that carries the data files (the man pages) like a normal wheel does."""

    def _run_install(self, category):
        if category == "data" and self.distribution.has_data_files():
            self.run_command("install_data")
            return
        super()._run_install(category)


setup(cmdclass={"editable_wheel": EditableWheel})
