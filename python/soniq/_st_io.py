"""Saving and loading SentenceTransformer models whose Linear layers are soniq packed modules.

A saved model is a folder:
- `soniq.json`             manifest: {"format": "soniq-dir", "kind": "sentence-transformers", ...}
- `soniq_model.safetensors` every tensor of the model (packed layers, embeddings, norms),
                            written by soniq.save (checksummed, atomic)
- the SentenceTransformer's own configuration and tokenizer files, with an empty
  `model.safetensors` (the float weights are not kept: that is the point of packing)

`soniq.load(folder)` rebuilds the architecture from the configuration, swaps in the packed
layers and their state, and returns a SentenceTransformer (`.encode(list_of_str)` works).
Needs the `transformer` extra (`pip install 'soniq[transformer]'`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from ._hf import quiet_offline
from ._model_file import _umask, default_mode, load_file, save_file
from ._version import __version__

MANIFEST, MODEL_FILE, KIND = "soniq.json", "soniq_model.safetensors", "sentence-transformers"


def _require():
    try:
        import sentence_transformers  # noqa: F401
    except ImportError as e:
        raise RuntimeError("SentenceTransformer models need the transformer extra: "
                           f"pip install 'soniq[transformer]' ({e})") from None


def save_dir(model, path) -> None:
    """Writes a SentenceTransformer with soniq packed layers to the folder `path`. The folder is
    assembled beside it and renamed into place, so an interrupted save never leaves a mix."""
    from safetensors.torch import save_file as st_save_file

    _require()
    from sentence_transformers import SentenceTransformer

    if not isinstance(model, SentenceTransformer):
        raise TypeError(f"model must be a sentence_transformers.SentenceTransformer, got {type(model).__name__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"path {path!r} exists and is not a folder")
    if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, MANIFEST)):
        raise ValueError(f"path {path!r} is a non-empty folder that does not hold a soniq model; "
                         "refusing to overwrite it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".soniq-", dir=parent)
    try:
        with quiet_offline():
            model.save(tmp)  # configuration, tokenizer, pooling; its weights file is replaced below
        for name in os.listdir(tmp):
            if name.endswith((".safetensors", ".bin")) and name.startswith(("model", "pytorch_model")):
                os.remove(os.path.join(tmp, name))
        empty = os.path.join(tmp, "model.safetensors")
        st_save_file({}, empty, metadata={"format": "pt"})
        os.chmod(empty, 0o666 & ~_umask())  # safetensors writes it owner-only; open() would not
        save_file(model, os.path.join(tmp, MODEL_FILE))
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"format": "soniq-dir", "kind": KIND, "model_file": MODEL_FILE,
                       "soniq_version": __version__}, f, indent=1)
        os.chmod(tmp, default_mode(path, folder=True))
        old = None
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=".soniq-old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_sentence_transformer(model) -> bool:
    return any(c.__name__ == "SentenceTransformer" and c.__module__.startswith("sentence_transformers")
               for c in type(model).__mro__)


def is_model_dir(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def load_dir(path, device: str = "cpu"):
    """Reads a folder written by save_dir and returns the SentenceTransformer."""
    path = os.fspath(path)
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable soniq manifest {MANIFEST}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "soniq-dir":
        raise ValueError(f"{path}: {MANIFEST} is not a soniq model manifest")
    if manifest.get("kind") != KIND:
        raise ValueError(f"{path}: model kind {manifest.get('kind')!r} is not supported (expected {KIND!r})")
    model_file = manifest.get("model_file", MODEL_FILE)
    if not isinstance(model_file, str) or not model_file or os.path.basename(model_file) != model_file:
        raise ValueError(f"{path}: {MANIFEST} names model_file {model_file!r}; it must be a file name in the folder")
    _require()
    from sentence_transformers import SentenceTransformer

    # quiet: rebuilding from a folder without float weights makes transformers list every
    # weight as 'newly initialized' (the soniq file replaces them all right after)
    with quiet_offline():
        model = SentenceTransformer(path, device="cpu", local_files_only=True)
    model = load_file(os.path.join(path, model_file), model=model)
    return model.to(device) if device != "cpu" else model
