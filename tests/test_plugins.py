"""The plugin registry: third-party packages installed with pip are picked up; bad ones fail loudly.

Real packages are written to a temp dir and ``pip install -e``'d into an *overlay* virtualenv: a
venv without its own pip whose site-packages imports the test interpreter's (a .pth file), with a
``git-theta`` launcher. git in the test runs that launcher, so it sees the test's git-theta plus the
throwaway package, while the shared test interpreter (and the tests running beside this one) never
see it; deleting the temp dir is the clean-up.
"""

import json
import os
import re
import site
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from git_theta import registry as plugins
from git_theta.errors import PluginError
from git_theta.manifest import Manifest
from git_theta.merge.operator import MergeOperator

GUIDE = Path(__file__).resolve().parents[1] / "plugins" / "README.md"


def guide_files():
    """The example package of plugins/README.md: {relative path: text} of its '# file:' blocks."""
    files = {}
    for block in re.findall(r"```[a-z]*\n(.*?)```", GUIDE.read_text(), re.S):
        first, _, rest = block.partition("\n")
        if first.startswith("# file: "):
            files[first[len("# file: ") :].strip()] = rest
    return files


def guide_package(root, replace=()):
    """Write the guide's example package to ``root`` (with text replacements); return ``root``."""
    for name, text in guide_files().items():
        for old, new in replace:
            text = text.replace(old, new)
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    (root / "theta_toy" / "__init__.py").write_text("")
    return root


def toy_file(tensors, note="hello"):
    """Bytes of a toy checkpoint holding ``tensors`` (name -> float32 array)."""
    import struct

    names = sorted(tensors)
    header = {"note": note, "tensors": [[n, "F32", list(tensors[n].shape)] for n in names]}
    raw = json.dumps(header).encode()
    return b"TOY1" + struct.pack("<I", len(raw)) + raw + b"".join(tensors[n].astype("<f4").tobytes() for n in names)


class Overlay:
    """A throwaway virtualenv layered over the test interpreter's packages."""

    def __init__(self, path, git_env):
        self.path = path
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
        purelib = subprocess.run(
            [str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        parents = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
        parents = [p for p in parents if os.path.isdir(p)]  # pip --user installs (CI as non-root) too
        (Path(purelib) / "_parent_site.pth").write_text(
            "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in parents) + "\n"
        )
        launcher = path / "bin" / "git-theta"
        launcher.write_text(f"#!{path}/bin/python\nimport sys\nfrom git_theta.cli.main import main\nsys.exit(main())\n")
        launcher.chmod(0o755)
        self.env = dict(git_env, PATH=f"{path / 'bin'}{os.pathsep}{git_env['PATH']}")

    def pip_install_editable(self, package_dir):
        proc = subprocess.run(
            [
                str(self.path / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--disable-pip-version-check",
                "--no-index",
                "-e",
                str(package_dir),
            ],
            capture_output=True,
            text=True,
            env=self.env,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def run(self, *args, cwd=None):
        return subprocess.run(list(args), cwd=cwd, env=self.env, capture_output=True, text=True)


@pytest.fixture
def overlay(tmp_path, git_env):
    return Overlay(tmp_path / "overlay", git_env)


def test_guide_example_is_picked_up_by_git_add_and_the_merge_driver(tmp_path, overlay, make_repo, git_env):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    package = guide_package(tmp_path / "pkg")
    overlay.pip_install_editable(package)

    listed = json.loads(overlay.run("git-theta", "plugins", "--json").stdout)
    toy = next(r for r in listed if r["name"] == "toy")
    assert (toy["kind"], toy["package"], toy["version"], toy["builtin"]) == (
        "format",
        "theta-toy-plugin",
        "0.0.1",
        False,
    )
    assert toy["location"] == f"{package} (editable)"
    assert next(r for r in listed if r["name"] == "safetensors")["builtin"] is True

    repo = make_repo("toy")
    repo.env = overlay.env
    repo.theta("install", "--local")  # install records the git-theta it runs from: the overlay's
    repo.theta("track", "*.toy")
    rng = np.random.default_rng(0)
    original = toy_file({"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)})
    repo.file("model.toy").write_bytes(original)
    repo.commit("add", ".gitattributes", "model.toy")
    manifest = Manifest.parse(repo.show("HEAD:model.toy"))
    assert manifest.format == "toy"
    assert set(manifest.tensors) == {"w", "b"}
    assert manifest.fields == {plugins.PACKAGE_FIELD: "theta-toy-plugin"} and set(manifest.blobs) == {"header"}
    repo.file("model.toy").unlink()
    repo.git("checkout", "--", "model.toy")
    assert repo.file("model.toy").read_bytes() == original
    assert repo.status() == ""

    # The merge driver runs the third-party operator on tensors changed on both sides.
    assert next(r for r in listed if r["name"] == "elementwise_max")["kind"] == "merge"
    repo.theta("track", "*.safetensors")
    repo.git("config", "theta.merge.operator", "elementwise_max")
    w = rng.standard_normal((3, 5)).astype(np.float32)
    save_file({"w": w}, str(repo.file("m.safetensors")))
    repo.commit("base", ".gitattributes", "m.safetensors")
    repo.git("checkout", "-q", "-b", "theirs")
    theirs = w + rng.standard_normal(w.shape).astype(np.float32)
    save_file({"w": theirs}, str(repo.file("m.safetensors")))
    repo.theta("add", "--update-type", "xor", "m.safetensors")  # the third-party update type
    repo.commit("theirs", "m.safetensors")
    assert Manifest.parse(repo.show("HEAD:m.safetensors")).tensors["w"].update == "xor"
    repo.git("checkout", "-q", "main")
    ours = w + rng.standard_normal(w.shape).astype(np.float32)
    save_file({"w": ours}, str(repo.file("m.safetensors")))
    repo.commit("ours", "m.safetensors")
    repo.git("merge", "-q", "--no-edit", "theirs")
    assert np.array_equal(load_file(str(repo.file("m.safetensors")))["w"], np.maximum(ours, theirs))
    assert Manifest.parse(repo.show("HEAD:m.safetensors")).tensors["w"].shape == (3, 5)
    assert repo.status() == ""

    # The same repository seen by a git-theta without the package: checkouts fail, saying why.
    repo.env = git_env
    repo.theta("install", "--local")  # git now runs this installation's git-theta
    repo.file("model.toy").unlink()
    failed = repo.git("checkout", "--", "model.toy", check=False)
    assert failed.returncode != 0
    assert "no format plugin named 'toy' is installed (needed by model.toy)" in failed.stderr
    assert "pip install theta-toy-plugin" in failed.stderr  # the package recorded in the manifest
    failed = repo.git("checkout", "theirs", "--", "m.safetensors", check=False)
    assert failed.returncode != 0
    assert "no update plugin named 'xor' is installed (needed by m.safetensors: tensor 'w'" in failed.stderr
    assert "'git_theta.updates' entry point 'xor'" in failed.stderr


def test_duplicate_name_from_an_installed_package_fails_at_load(tmp_path, overlay):
    duplicate = guide_package(
        tmp_path / "dup",
        replace=[
            ("name = theta-toy-plugin", "name = theta-dup-plugin"),
            ("    toy = theta_toy.fmt:ToyFormat", "    safetensors = theta_toy.fmt:ToyFormat"),
            ('    name = "toy"', '    name = "safetensors"'),
        ],
    )
    overlay.pip_install_editable(duplicate)
    proc = overlay.run("git-theta", "plugins")
    assert proc.returncode == 1
    assert "format plugin 'safetensors' is registered twice" in proc.stderr
    assert "theta-dup-plugin 0.0.1" in proc.stderr and "git-theta" in proc.stderr
    assert "hint: names are written into manifests and must be unique" in proc.stderr


@pytest.fixture
def fake_group(monkeypatch):
    """Replace a group's entry points in this process (for checks that need no real package)."""

    def install(kind, **targets):
        plugins.reset()
        eps = [EntryPoint(name, value, plugins.GROUPS[kind]) for name, value in targets.items()]
        monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: [e for e in eps if e.group == group])

    yield install
    plugins.reset()


class Named:
    def __init__(self):
        self.name = "good"

    def merge(self, models, base, params, rng):
        return models[0]


class NoMerge:
    name = "nomerge"


class Forgetful(MergeOperator):
    """Subclasses the interface but forgets merge(): the inherited stub does not count."""

    name = "forgetful"


def test_malformed_name_is_an_error(fake_group):
    fake_group("merge", **{"Bad.Name": f"{__name__}:Named"})
    with pytest.raises(PluginError, match="malformed merge plugin name 'Bad.Name'"):
        plugins.names("merge")


def test_plugin_must_call_itself_by_its_entry_point_name(fake_group):
    fake_group("merge", other=f"{__name__}:Named")
    with pytest.raises(PluginError, match="calls itself 'good'"):
        plugins.get("merge", "other")


def test_plugin_must_implement_its_interface(fake_group):
    fake_group("merge", nomerge=f"{__name__}:NoMerge", forgetful=f"{__name__}:Forgetful", good=f"{__name__}:Named")
    with pytest.raises(PluginError, match="does not implement merge") as info:
        plugins.get("merge", "nomerge")
    assert "merge" in info.value.hint
    with pytest.raises(PluginError, match="'forgetful' .* does not implement merge"):
        plugins.get("merge", "forgetful")
    assert plugins.get("merge", "good").name == "good"


def test_import_failure_names_the_plugin(fake_group):
    fake_group("update", broken="no_such_module_for_theta:Thing")
    with pytest.raises(PluginError, match="update plugin 'broken' .* failed to load"):
        plugins.get("update", "broken")


def test_missing_plugin_hint_names_the_package(fake_group):
    fake_group("format")
    with pytest.raises(PluginError) as known:
        plugins.get("format", "gguf", needed_by="model.gguf")
    assert "needed by model.gguf" in known.value.message
    assert known.value.hint == "install the package that provides it: pip install git-theta-gguf"
    with pytest.raises(PluginError) as recorded:
        plugins.get("format", "mine", package="acme-theta-format")
    assert "pip install acme-theta-format" in recorded.value.hint
    with pytest.raises(PluginError) as unknown:
        plugins.get("format", "mine")
    assert "'git_theta.formats' entry point 'mine'" in unknown.value.hint


def test_builtins_register_through_the_entry_points():
    rows = plugins.describe()
    builtin = {(r["kind"], r["name"]) for r in rows if r["builtin"]}
    assert {("format", "safetensors"), ("update", "dense")} <= builtin
    for kind, name in builtin:
        assert plugins.get(kind, name).name == name


def test_unknown_merge_operator_from_a_plugin_package_says_what_to_install(fake_group):
    from git_theta.errors import UsageError
    from git_theta.merge.engine import get_operator

    fake_group("merge", good=f"{__name__}:Named")
    with pytest.raises(UsageError, match="unknown merge operator 'fisher'") as info:
        get_operator("fisher", "theta.merge.operator")
    assert "pip install git-theta-fisher" in info.value.hint
