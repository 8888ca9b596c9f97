"""Where a merge gets its operator and parameters: git config, path attributes and rules.

For a tensor that changed on several sides, the operator is, first match wins:

1. the first per-tensor rule whose glob matches the tensor name (git config ``theta.merge.rule``,
   multi-valued, then the ``.thetamerge`` file at the root of the work tree; see :mod:`.rules`);
2. the path attribute ``theta-merge=NAME`` of the checkpoint (``.gitattributes``);
3. ``theta.merge.operator`` (``git theta merge --operator`` sets it for one merge);
4. none: the tensor is a conflict.

Parameters are ``theta.merge.<param>`` (per-model parameters as comma lists, ours first); a rule's
own ``KEY=VALUE`` words override them for that rule. ``theta.merge.seed`` replaces the seed derived
from the inputs for random operators.
"""

from dataclasses import dataclass, field

from git_theta.git.allowlist import theta_attribute
from git_theta.errors import ConfigError
from git_theta.merge.rules import Rule, normalize_key, parse_rule, parse_rules

RESERVED = {"operator", "seed", "rule"}
RULES_FILE = ".thetamerge"


@dataclass(frozen=True)
class Choice:
    """The operator chosen for one tensor, its raw parameters, and why it was chosen."""

    operator: str
    params: dict
    origin: str
    #: parameters the operator must accept (the others are dropped when it does not know them)
    strict: frozenset = frozenset()


@dataclass
class MergeConfig:
    """Resolved merge configuration of one repository (plus command-line overrides)."""

    operator: str | None = None
    params: dict = field(default_factory=dict)
    seed: int | None = None
    rules: list = field(default_factory=list)
    attributes: dict = field(default_factory=dict)  # path -> operator name (None: unspecified)
    operator_origin: str = "theta.merge.operator"
    #: where each parameter value came from ("git config theta.merge.density", "--param density=0.2")
    origins: dict = field(default_factory=dict)
    #: parameters given explicitly (``--param``): an operator that does not take one is an error;
    #: the others (git config) apply to the operators that take them and are ignored by the rest
    explicit: frozenset = frozenset()

    def choose(self, path, tensor_name):
        """The Choice for tensor ``tensor_name`` of checkpoint ``path``, or None when nothing is set."""
        for rule in self.rules:
            if rule.matches(tensor_name):
                params = dict(self.params)
                params.update(rule.params)
                return Choice(
                    rule.operator, params, f"rule '{rule.glob} {rule.operator}' ({rule.source})", frozenset(rule.params)
                )
        attribute = self.attributes.get(path)
        if attribute:
            return Choice(attribute, dict(self.params), f"attribute theta-merge={attribute}", self.explicit)
        if self.operator:
            return Choice(self.operator, dict(self.params), self.operator_origin, self.explicit)
        return None


def read_merge_config(repo):
    """(key, value) pairs of every ``theta.merge.*`` git config entry, in git's order."""
    from git_theta.config import settings_for

    return [(key[len("theta.merge.") :], value) for key, value in settings_for(repo).entries("theta.merge.")]


def parse_seed(value, source):
    try:
        return int(str(value).strip(), 0)
    except ValueError:
        raise ConfigError(f"{source} must be an integer, not {value!r}") from None


def build_config(pairs, rules_text=None, operator=None, params=None, seed=None, rules=()):
    """A MergeConfig from config pairs and the ``.thetamerge`` text, then command-line overrides.

    ``operator``/``params``/``seed``/``rules`` come from flags and win over git config.
    """
    config = MergeConfig()
    config_rules = []
    for key, value in pairs:
        if key == "operator":
            config.operator = value.strip() or None
        elif key == "seed":
            config.seed = parse_seed(value, "theta.merge.seed")
        elif key == "rule":
            rule = parse_rule(value, "theta.merge.rule")
            if rule is not None:
                config_rules.append(rule)
        else:
            config.params[normalize_key(key)] = value.strip()
            config.origins[normalize_key(key)] = f"git config theta.merge.{key}"
    flag_rules = [parse_rule(text, "--rule") for text in rules]
    config.rules = [r for r in flag_rules if r is not None] + config_rules
    if rules_text is not None:
        config.rules += parse_rules(rules_text.splitlines(), RULES_FILE)
    if operator:
        config.operator = operator
        config.operator_origin = "--operator"
    for key, value in (params or {}).items():
        config.params[normalize_key(key)] = value
        config.origins[normalize_key(key)] = f"--param {normalize_key(key)}={value}"
    config.explicit = frozenset(normalize_key(k) for k in (params or {}))
    if seed is not None:
        config.seed = parse_seed(seed, "--seed")
    return config


def load_config(repo, paths=(), operator=None, params=None, seed=None):
    """The merge configuration of ``repo`` for checkpoints ``paths`` (their attributes are read)."""
    rules_text = None
    if repo.work_tree is not None:
        rules_path = repo.work_tree / RULES_FILE
        if rules_path.is_file():
            rules_text = rules_path.read_text(encoding="utf-8")
    config = build_config(read_merge_config(repo), rules_text, operator, params, seed)
    for path in paths:
        config.attributes[path] = theta_attribute(repo, path, "theta-merge")  # allow-listed, validated
    return config


def parse_param_flags(items):
    """``--param KEY=VALUE`` flags -> dict (normalised keys)."""
    from git_theta.merge.rules import parse_params

    return parse_params(items, "--param")


__all__ = ["Choice", "MergeConfig", "Rule", "build_config", "load_config", "parse_param_flags"]
