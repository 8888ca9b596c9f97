"""Parameter resolution for merge operators: parsing, defaults, broadcasting and every refusal."""

import pytest

from git_theta import registry as plugins
from git_theta.errors import UsageError
from git_theta.merge.params import resolve


def op(name):
    return plugins.get("merge", name)


def test_defaults_are_mergekits():
    p = resolve(op("ties"), {}, 2)
    assert p == {
        "weight": [1.0, 1.0],
        "density": [1.0, 1.0],
        "lambda": 1.0,
        "normalize": True,
        "rescale": False,
        "int8_mask": False,
        "consensus": "sum",
    }
    assert resolve(op("dare_ties"), {}, 3)["normalize"] is False
    assert resolve(op("dare_ties"), {}, 3)["rescale"] is True
    assert resolve(op("breadcrumbs_ties"), {}, 2)["normalize"] is False
    assert resolve(op("breadcrumbs"), {}, 2)["gamma"] == [0.01, 0.01]
    assert resolve(op("della"), {}, 2)["epsilon"] == [0.15, 0.15]
    assert resolve(op("della"), {}, 2)["normalize"] is True
    assert resolve(op("della_linear"), {}, 2)["normalize"] is False
    assert resolve(op("linear"), {}, 2) == {"weight": [1.0, 1.0], "normalize": True}


def test_strings_are_parsed_and_per_model_values_broadcast():
    p = resolve(op("ties"), {"density": "0.2", "weight": "0.7, 0.3", "normalize": "no", "lambda": "-1.5"}, 2)
    assert p["density"] == [0.2, 0.2]
    assert p["weight"] == [0.7, 0.3]
    assert p["normalize"] is False
    assert p["lambda"] == -1.5
    p = resolve(op("ties"), {"weight": ["1", "2", "3"], "consensus": "count"}, 3)
    assert p["weight"] == [1.0, 2.0, 3.0] and p["consensus"] == "count"
    assert resolve(op("karcher"), {"max_iter": "3"}, 2)["max_iter"] == 3


@pytest.mark.parametrize(
    "name, raw, needle",
    [
        ("ties", {"densty": "0.2"}, "no parameter 'densty'"),
        ("ties", {"normalise": "true"}, "no parameter 'normalise'"),
        ("task_arithmetic", {"density": "0.5"}, "no parameter 'density'"),  # a no-op in mergekit
        ("ours", {"weight": "1"}, "no parameter 'weight'"),
        ("ties", {"density": "1.5"}, "must be in [0.0, 1.0]"),
        ("ties", {"density": "-0.1"}, "must be in [0.0, 1.0]"),
        ("ties", {"density": "0.5,0.5,0.5"}, "one value or one per model"),
        ("ties", {"lambda": "1,2"}, "takes a single value"),
        ("ties", {"density": "abc"}, "must be a finite float"),
        ("ties", {"density": "nan"}, "must be a finite float"),
        ("ties", {"normalize": "maybe"}, "must be a finite bool"),
        ("ties", {"consensus": "max"}, "must be one of sum, count"),
        ("karcher", {"max_iter": "2.5"}, "must be a finite int"),
        ("breadcrumbs", {"gamma": "2"}, "must be in [0.0, 1.0]"),
        ("della", {"density": "0.1"}, "leaves [0, 1]"),
        ("della", {"density": "0.9"}, "leaves [0, 1]"),
        ("della_linear", {"density": "0.5", "epsilon": "0.6"}, "must be in [0.0, 0.5]"),
        ("linear", {"weight": "1,-1"}, "sum to 0"),
        ("slerp", {"t": "1.5"}, "must be in [0.0, 1.0]"),
    ],
)
def test_refusals_name_the_operator_and_the_valid_parameters(name, raw, needle):
    with pytest.raises(UsageError) as err:
        resolve(op(name), raw, 2)
    assert needle in str(err.value)
    assert name in str(err.value) or name in (err.value.hint or "")
    assert err.value.hint


def test_unknown_parameter_hint_lists_the_valid_ones():
    with pytest.raises(UsageError) as err:
        resolve(op("ties"), {"densty": "0.2"}, 2)
    for key in ("density", "weight", "lambda", "normalize", "consensus"):
        assert key in err.value.hint


def test_della_band_edges_are_allowed_and_density_0_1_are_exempt():
    # density ± epsilon may touch 0 and 1 (mergekit refuses the equality; see README)
    assert resolve(op("della"), {"density": "0.15"}, 2)["density"] == [0.15, 0.15]
    assert resolve(op("della"), {"density": "0.85"}, 2)["density"] == [0.85, 0.85]
    # density 0 / 1 never sample, so the band does not apply
    assert resolve(op("della"), {"density": "0,1"}, 2)["density"] == [0.0, 1.0]
    with pytest.raises(UsageError, match="model 2"):
        resolve(op("della"), {"density": "0.5,0.9"}, 2)


@pytest.mark.parametrize("name, n", [("slerp", 3), ("nuslerp", 3), ("theirs", 3), ("model_stock", 1)])
def test_model_count_is_checked(name, n):
    with pytest.raises(UsageError, match="models to merge"):
        resolve(op(name), {}, n)


def test_git_config_spellings_of_names():
    # git config names are case-insensitive and cannot contain '_'
    p = resolve(op("sce"), {"Select-TopK": "0.5", "int8-mask": "true"}, 2)
    assert p["select_topk"] == 0.5 and p["int8_mask"] is True
    with pytest.raises(UsageError, match="given twice"):
        resolve(op("sce"), {"select-topk": "0.5", "select_topk": "0.4"}, 2)


def test_canonical_names():
    from git_theta.merge.params import canonical

    assert canonical("Select-TopK") == "select_topk" and canonical("density") == "density"
