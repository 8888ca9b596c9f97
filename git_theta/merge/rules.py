"""Per-tensor merge rules: a data-only format naming which operator merges which tensors.

One rule per line: ``GLOB OPERATOR [KEY=VALUE ...]``. ``GLOB`` is matched against the tensor name
with shell-style wildcards (``*``, ``?``, ``[...]``; ``*`` also crosses dots); the first matching
rule wins. Values are plain strings (numbers, booleans, comma lists for per-model parameters,
gradients ``[0,0.5,1]`` and filter lists in YAML flow syntax; quote a word holding spaces),
passed to the operator's parameter resolution: nothing in a rule is ever executed. Blank lines and
lines starting with ``#`` are ignored. Rules come from the multi-valued git config key
``theta.merge.rule`` (first) and from a ``.thetamerge`` file at the root of the work tree.
"""

import fnmatch
import re
import shlex
from dataclasses import dataclass, field

from git_theta.errors import ConfigError

_OPERATOR = re.compile(r"[a-z][a-z0-9_-]*\Z")
_KEY = re.compile(r"[a-z][a-z0-9_-]*\Z")


@dataclass(frozen=True)
class Rule:
    """One rule: tensors matching ``glob`` are merged by ``operator`` with ``params``."""

    glob: str
    operator: str
    params: dict = field(default_factory=dict)
    source: str = ""

    def matches(self, name):
        return fnmatch.fnmatchcase(name, self.glob)


def normalize_key(key):
    """Parameter names are mergekit's (``select_topk``); git config keys cannot hold ``_``, so
    ``select-topk`` is accepted as the same name (see :func:`.params.canonical`)."""
    from git_theta.merge.params import canonical

    return canonical(key)


def parse_params(words, source):
    """``["density=0.2", "weight=1,0.5"]`` -> ``{"density": "0.2", "weight": "1,0.5"}``."""
    params = {}
    for word in words:
        key, sep, value = word.partition("=")
        key = normalize_key(key)
        if not sep or not _KEY.match(key) or not value:
            raise ConfigError(
                f"{source}: expected KEY=VALUE, got {word!r}",
                hint="a rule is 'GLOB OPERATOR [KEY=VALUE ...]', e.g. 'model.layers.* ties density=0.2'",
            )
        params[key] = value
    return params


def parse_rule(line, source):
    """Parse one rule line; None for blank lines and comments."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    try:
        # quotes keep a value with spaces in one word: "t=[{filter: mlp, value: [0, 1]}, {value: 0.5}]"
        words = shlex.split(text)
    except ValueError:
        raise ConfigError(
            f"{source}: unbalanced quotes in merge rule {text!r}",
            hint="close the quote, e.g. 'model.* slerp \"t=[0, 0.5, 1]\"'",
        ) from None
    if len(words) < 2 or not _OPERATOR.match(words[1]):
        raise ConfigError(
            f"{source}: malformed merge rule {text!r}",
            hint="a rule is 'GLOB OPERATOR [KEY=VALUE ...]', e.g. 'lm_head.* ours'",
        )
    return Rule(words[0], words[1], parse_params(words[2:], source), source)


def parse_rules(lines, source):
    """Rules from an iterable of lines (a ``.thetamerge`` file or git config values)."""
    rules = []
    for number, line in enumerate(lines, start=1):
        rule = parse_rule(line, f"{source}:{number}" if source.endswith(".thetamerge") else source)
        if rule is not None:
            rules.append(rule)
    return rules


def first_match(rules, name):
    """The first rule whose glob matches tensor ``name``, or None."""
    for rule in rules:
        if rule.matches(name):
            return rule
    return None
