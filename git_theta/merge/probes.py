"""Hidden-state probes of Hugging Face model folders, for ``--operator auto``'s functional features.

auto's functional features (:func:`git_theta.merge.auto.functional_features`) compare how the
models' activations moved from the base's on the same probe inputs. ``--probe CMD`` lets the user
supply them; for a Hugging Face folder (``config.json`` plus safetensors weights, possibly sharded)
whose architecture the installed ``transformers`` knows, :func:`hidden_states` computes them here:
each model is loaded with transformers from its local files only (no hub, ``trust_remote_code``
off, safetensors only, so no code from the checkpoint runs), run in float32 on ``INPUTS``
deterministic inputs of ``LENGTH`` token ids drawn from a seeded generator within the config's
vocabulary (no tokenizer needed), and its final hidden states are mean-pooled over positions, as
``bench/merge_eval.py`` pools the states its predictor was fitted on.

When transformers is missing, or cannot load a folder, :class:`ProbeUnavailable` says why; the
caller then goes on with the structural features only.
"""

from pathlib import Path

INPUTS = 8
LENGTH = 16
SEED = 0
#: a vocabulary larger than this in a config.json is not believed (it sizes the probe's token ids)
MAX_VOCAB = 1 << 24
#: the extra that installs transformers
EXTRA_HINT = "pip install 'git-theta[hf]'"


class ProbeUnavailable(Exception):
    """No hidden states: ``reason`` says why, in a phrase for the user (auto goes on without them)."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def is_hf_folder(path):
    """True when ``path`` is a folder holding ``config.json`` and safetensors weights."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        return False
    return any(p.suffix == ".safetensors" and not p.name.startswith("adapter_model.") for p in path.iterdir())


def hf_folder_of(path):
    """The Hugging Face folder a merge input names (the folder, its index json or its
    ``model.safetensors``), or None."""
    path = Path(path)
    if path.is_file() and (path.name.endswith(".index.json") or path.name == "model.safetensors"):
        path = path.parent
    return path if is_hf_folder(path) else None


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _vocab_size(config, folder):
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not 0 < vocab <= MAX_VOCAB:
        raise ProbeUnavailable(f"{folder}/config.json gives no usable vocab_size ({vocab!r})")
    return vocab


def probe_inputs(vocab, length, inputs=INPUTS, seed=SEED):
    """The probe's token ids: ``inputs`` x ``length`` ids in [0, vocab) from a seeded generator."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, size=(inputs, length), dtype=np.int64)


class _Quiet:
    """transformers' logging and progress bars off while probing (they would land on the user's
    terminal); both restored afterwards."""

    def __enter__(self):
        from transformers.utils import logging

        self._level = logging.get_verbosity()
        self._bars = logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging

        logging.set_verbosity(self._level)
        if self._bars:
            logging.enable_progress_bar()


def _states(folder):
    """(pooled final hidden states [INPUTS x hidden] as float64, model class name) of one folder."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModel

    folder = str(folder)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any refusal by transformers means "not loadable": say why
        raise ProbeUnavailable(f"transformers cannot read {folder}/config.json ({_first_line(exc)})") from None
    vocab = _vocab_size(config, folder)
    positions = getattr(config, "max_position_embeddings", None)
    length = min(LENGTH, positions) if isinstance(positions, int) and positions > 0 else LENGTH
    try:
        model = AutoModel.from_pretrained(
            folder,
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=torch.float32,
        )
    except Exception as exc:  # noqa: BLE001
        raise ProbeUnavailable(f"transformers cannot load {folder} ({_first_line(exc)})") from None
    model.eval()
    ids = torch.from_numpy(probe_inputs(vocab, length))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception as exc:  # noqa: BLE001
        raise ProbeUnavailable(f"{type(model).__name__} failed on the probe inputs ({_first_line(exc)})") from None
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden.float().mean(dim=1).numpy().astype(np.float64), type(model).__name__


def hidden_states(models):
    """Probe activations of each model: ``models`` lists, per model, its Hugging Face folders (the
    same folders of each model, in the same order). Returns (activations per model as flat float64
    arrays, a description of where they came from); raises :class:`ProbeUnavailable`."""
    import numpy as np

    try:
        import transformers
    except ImportError:
        raise ProbeUnavailable(f"transformers is not installed ({EXTRA_HINT})") from None
    try:
        import torch  # noqa: F401 - transformers' models run on torch
    except ImportError:
        raise ProbeUnavailable("torch is not installed (pip install 'git-theta[torch,hf]')") from None
    out, classes = [], set()
    with _Quiet():
        for folders in models:
            parts = []
            for folder in folders:
                states, name = _states(folder)
                parts.append(states.ravel())
                classes.add(name)
            out.append(np.concatenate(parts))
    if len({a.size for a in out}) > 1:
        raise ProbeUnavailable("the models' hidden states differ in size (different architectures)")
    where = ", ".join(sorted(classes))
    return out, (
        f"hidden states of {where} (transformers {transformers.__version__}, local safetensors, no remote code) "
        f"on {INPUTS} generated inputs of up to {LENGTH} token ids (seed {SEED}), final layer mean-pooled"
    )
