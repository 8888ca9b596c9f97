"""The per-user cache of the plugin groups' entry points (git_theta/entry_points.py): the same
entries as a fresh read, used only while the folders on sys.path are unchanged, and ignored when
it cannot be trusted to be current."""

import json
import os
import sys

import pytest

from git_theta import entry_points, registry

GROUPS = list(registry.GROUPS.values())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache in a temporary folder, for a process run from a folder not on sys.path, with a
    sys.path folder of its own whose time the test may change."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    extra = tmp_path / "site"
    extra.mkdir()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")] + [str(extra)])
    monkeypatch.setattr(entry_points, "_fresh_only", False)
    scans = []
    real = entry_points._scan
    monkeypatch.setattr(entry_points, "_scan", lambda group: scans.append(group) or real(group))
    return extra, scans


def _summary(found):
    return {g: sorted((e.name, e.value, e.package, e.version) for e in entries) for g, entries in found.items()}


def test_a_second_read_comes_from_the_cache_with_the_same_entries(cache):
    _, scans = cache
    first = entry_points.read(GROUPS)
    assert sorted(scans) == sorted(GROUPS) and os.path.isfile(entry_points.cache_path())
    scans.clear()
    second = entry_points.read(GROUPS)
    assert scans == [] and _summary(second) == _summary(first)
    assert ("safetensors", "git-theta") in {(e.name, e.package) for e in second["git_theta.formats"]}
    # A cached entry loads what the entry point names, as importlib.metadata's would.
    cached = {e.name: e for e in second["git_theta.formats"]}["safetensors"]
    real = {e.name: e for e in first["git_theta.formats"]}["safetensors"]
    assert cached.load() is real.load()
    assert cached.distribution().metadata["Name"] == "git-theta"


def test_a_changed_folder_on_sys_path_means_a_fresh_read(cache):
    extra, scans = cache
    entry_points.read(GROUPS)
    scans.clear()
    (extra / "new_plugin-1.0.dist-info").mkdir()  # as installing a distribution there does
    os.utime(extra, ns=(0, os.stat(extra).st_mtime_ns + 10**9))
    entry_points.read(GROUPS)
    assert sorted(scans) == sorted(GROUPS)


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_text("{not json"),
        lambda path: path.write_text(json.dumps({"key": json.loads(path.read_text())["key"], "groups": {}})),
        lambda path: path.write_text(json.dumps({"key": json.loads(path.read_text())["key"], "groups": 7})),
        lambda path: path.write_text(json.dumps({"key": "other", "groups": {}})),
    ],
    ids=["not json", "a group missing", "groups not a map", "another key"],
)
def test_a_cache_that_is_not_current_or_not_whole_is_read_again(cache, damage, tmp_path):
    _, scans = cache
    first = entry_points.read(GROUPS)
    damage(tmp_path / "cache" / "git-theta" / "entry-points.json")
    scans.clear()
    again = entry_points.read(GROUPS)
    assert sorted(scans) == sorted(GROUPS) and _summary(again) == _summary(first)


def test_the_current_folder_on_sys_path_or_forget_means_no_cache(cache, monkeypatch, tmp_path):
    _, scans = cache
    monkeypatch.setattr(sys, "path", ["", *sys.path])  # python -m: the current folder is searched
    entry_points.read(GROUPS)
    entry_points.read(GROUPS)
    assert len(scans) == 2 * len(GROUPS) and not os.path.exists(entry_points.cache_path())
    monkeypatch.setattr(sys, "path", sys.path[1:])
    entry_points.forget()  # what the registry's reset does, for tests that fake entry points
    entry_points.read(GROUPS)
    assert len(scans) == 3 * len(GROUPS) and not os.path.exists(entry_points.cache_path())


def test_a_cached_value_that_names_nothing_fails_to_load():
    entry = entry_points.Entry("bad", "not a module path", "git_theta.formats", "x", "1")
    with pytest.raises(ValueError, match="malformed entry point value"):
        entry.load()
    assert entry_points.Entry("ok", "json:dumps [extra]", "g").load() is json.dumps
