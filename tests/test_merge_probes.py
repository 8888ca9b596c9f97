"""``--operator auto`` on Hugging Face model folders: hidden-state probes (functional features from
transformers, or a stated fallback to structural ones) and ``merge-files --operator auto`` with
sharded folders. Uses the real transformers folders in tests/fixtures/hf (tiny Llama)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

HF = Path(__file__).parent / "fixtures" / "hf"


def copy(source, dest):
    shutil.copytree(HF / source, dest, copy_function=shutil.copy)
    return dest


def folder_tensors(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.fixture
def folders(tmp_path):
    """base (fresh), a fine-tune of layer 0 (tuned) and tuned plus a merged LoRA (lora-merged)."""
    return [copy(name, tmp_path / name) for name in ("fresh", "tuned", "lora-merged")]


@pytest.fixture
def no_transformers(monkeypatch):
    """``import transformers`` fails, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "transformers", None)


def test_hf_probe_features_and_explanation(folders, capsys):
    pytest.importorskip("transformers")
    from git_theta.cli.commands.merge_search import explain
    from git_theta.merge.auto import functional_features
    from git_theta.merge.probes import hidden_states, probe_inputs
    from git_theta.porcelain.merge_search import auto_files

    base, tuned, lora = folders
    acts, source = hidden_states([[base], [tuned], [lora]])
    assert all(a.shape == (8 * 64,) for a in acts)  # 8 probe inputs x hidden 64, mean-pooled
    assert (acts[0] != acts[1]).any() and (acts[1] != acts[2]).any()  # every fine-tune moved them
    again, _ = hidden_states([[base]])
    assert (again[0] == acts[0]).all()  # deterministic inputs, deterministic states
    ids = probe_inputs(256, 16)
    assert ids.shape == (8, 16) and ids.min() >= 0 and ids.max() < 256 and (ids == probe_inputs(256, 16)).all()
    assert "LlamaModel" in source and "no remote code" in source

    prediction = auto_files([tuned, lora], base)
    assert prediction.predictor == "functional"
    assert prediction.features["act_cosine"] == pytest.approx(functional_features(acts[1:], acts[0])["act_cosine"])
    assert prediction.functional == source
    assert prediction.to_json()["functional_source"] == source
    explain(prediction)
    out = capsys.readouterr().out
    assert "act_cosine=" in out and "log_act_rel=" in out and "functional predictor" in out
    assert "functional features (act_cosine, log_act_rel): hidden states of LlamaModel" in out


def test_without_transformers_auto_falls_back_to_structural(folders, no_transformers, capsys):
    from git_theta.cli.commands.merge_search import explain
    from git_theta.porcelain.merge_search import auto_files

    base, tuned, lora = folders
    prediction = auto_files([tuned, lora], base)
    assert prediction.predictor == "structural" and "act_cosine" not in prediction.features
    assert "transformers is not installed (pip install 'git-theta[hf]')" in prediction.functional
    explain(prediction)
    assert "structural features only" in capsys.readouterr().out


def test_unloadable_architecture_and_remote_code_fall_back(folders, tmp_path):
    pytest.importorskip("transformers")
    from git_theta.porcelain.merge_search import auto_files

    base, tuned, lora = folders
    config = json.loads((lora / "config.json").read_text())
    config.update(model_type="not-a-real-arch", architectures=["NotARealModel"])
    (lora / "config.json").write_text(json.dumps(config))
    prediction = auto_files([tuned, lora], base)
    assert prediction.predictor == "structural"
    assert "transformers cannot read" in prediction.functional and str(lora) in prediction.functional

    # code shipped with a checkpoint is never run: a custom architecture with auto_map is refused
    marker = tmp_path / "ran"
    (lora / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (lora / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config.update(
        model_type="evil",
        auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
    )
    (lora / "config.json").write_text(json.dumps(config))
    prediction = auto_files([tuned, lora], base)
    assert prediction.predictor == "structural" and not marker.exists()
    assert "custom code" in prediction.functional


def test_merge_dry_run_auto_probes_the_repository_folder(repo, folders):
    """git theta merge --dry-run --operator auto: a committed HF folder is checked out per side
    and probed; the explanation shows the functional features and where they came from."""
    pytest.importorskip("transformers")
    from git_theta.merge.auto import functional_features
    from git_theta.merge.probes import hidden_states

    base, tuned, lora = folders

    def put(source):
        shutil.rmtree(repo.file("model"), ignore_errors=True)
        shutil.copytree(source, repo.file("model"), copy_function=shutil.copy)

    put(base)
    repo.commit("base")
    repo.git("checkout", "-q", "-b", "a")
    put(tuned)
    repo.commit("tuned")
    repo.git("checkout", "-q", "main")
    put(lora)
    repo.commit("lora")
    out = repo.theta("merge", "--dry-run", "--operator", "auto", "a").stdout
    assert "auto (functional predictor" in out
    acts, _ = hidden_states([[base], [lora], [tuned]])  # base, HEAD, a: as the merge orders them
    expected = functional_features(acts[1:], acts[0])
    assert f"act_cosine={expected['act_cosine']:.3g} log_act_rel={expected['log_act_rel']:.3g}" in out
    assert "functional features (act_cosine, log_act_rel): hidden states of LlamaModel" in out
    assert "\nmodel:\n" in out  # then the per-tensor plan of the (re-sharded) model
    off = repo.theta("merge", "--dry-run", "--json", "--operator", "auto", "--no-hf-probe", "a").stdout
    auto = json.loads(off)["auto"]
    assert auto["predictor"] == "structural" and "probes off" in auto["functional_source"]


def test_merge_files_auto_with_sharded_folders(folders, tmp_path):
    """merge-files --operator auto reads sharded folders (index json + 12 shards) as whole models
    and writes a folder in the first input's layout."""
    from git_theta.porcelain.merge_search import auto_files

    base, tuned, lora = folders
    prediction = auto_files([tuned, lora], base, hf_probe=False)
    assert prediction.functional.startswith("none (no --probe; Hugging Face probes off)")
    assert prediction.predictor == "structural" and prediction.features["n_models"] == 2
    # one file, the index json or the folder name the same model
    by_index = auto_files([tuned, lora / "model.safetensors.index.json"], base, hf_probe=False)
    assert by_index.features == prediction.features

    out = tmp_path / "merged"
    args = ["merge-files", "--operator", "auto", "--no-hf-probe", "--base", str(base), str(tuned), str(lora)]
    git_theta = Path(sys.executable).with_name("git-theta")  # this interpreter's, so this tree's
    proc = subprocess.run([str(git_theta), *args, "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"auto chose {prediction.recipe}")
    merged, t, lo, b = folder_tensors(out), folder_tensors(tuned), folder_tensors(lora), folder_tensors(base)
    assert set(merged) == set(b) and len(list(out.glob("model-*-of-00012.safetensors"))) == 12
    assert (out / "config.json").read_bytes() == (tuned / "config.json").read_bytes()
    for name, value in merged.items():
        changed = [side for side in (t, lo) if (side[name] != b[name]).any()]
        if len(changed) == 1 or (len(changed) == 2 and (t[name] == lo[name]).all()):
            assert (value == changed[0][name]).all(), name  # changed on one side (or alike): taken bit for bit
        elif not changed:
            assert (value == b[name]).all(), name
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert (t[q0] != lo[q0]).any() and (merged[q0] != t[q0]).any()  # both moved it: the operator ran
