"""mkdocs hook: the settings table of docs/configuration.md, generated from git-theta's defaults.

The page holds the placeholder ``<!-- settings-table -->``; at build time it is replaced by one row
per entry of ``DEFAULTS`` (git config key, environment variable, default, meaning), read from the
installed package, so the page cannot drift from the code. A missing placeholder fails the build.
"""

import importlib

PLACEHOLDER = "<!-- settings-table -->"


def _settings_module():
    """The settings module: ``git_theta.config`` after the issue-14 move, ``git_theta.config`` before."""
    for name in ("git_theta.config", "git_theta.config"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "DEFAULTS"):
            return module
    raise ImportError("neither git_theta.config nor git_theta.config defines DEFAULTS")


def _size(value):
    """192 MiB rather than 201326592 for byte sizes that are whole MiB or GiB."""
    for shift, unit in ((30, "GiB"), (20, "MiB")):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return f"{value >> shift} {unit}"
    return str(value)


def _default(value, kind):
    if kind == "bool":
        return "`true`" if value else "`false`"
    if kind == "int":
        return _size(value)
    return f"`{value}`" if value != "" else "unset"


def env_name(module, name):
    """The ``GIT_THETA_*`` variable of setting ``name``, as the settings module computes it."""
    return module._env_name(name)


def settings_table():
    """The Markdown table of every setting in DEFAULTS, in the order the code lists them."""
    module = _settings_module()
    rows = [
        "| git config | environment | default | type | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, (default, kind, meaning) in module.DEFAULTS.items():
        meaning = meaning.replace("|", "\\|")
        rows.append(f"| `theta.{name}` | `{env_name(module, name)}` | {_default(default, kind)} | {kind} | {meaning} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    """Replace the placeholder of configuration.md with the generated table."""
    if page.file.src_uri != "configuration.md":
        return markdown
    if PLACEHOLDER not in markdown:
        raise ValueError(f"docs/configuration.md lost its placeholder {PLACEHOLDER}")
    return markdown.replace(PLACEHOLDER, settings_table())
