"""soniq.save / soniq.load: one safetensors file (_model_file.py) for any converted model, or
a folder (_st_io.py) for a SentenceTransformer."""
from __future__ import annotations

import os

from torch import nn

from ._model_file import load_file, save_file
from ._st_io import is_model_dir, is_sentence_transformer, load_dir, save_dir


def save(model: nn.Module, path) -> None:
    """Writes a converted model (soniq.convert) to `path` (safetensors), atomically. A
    SentenceTransformer is written as a folder (configuration, tokenizer, soniq weights) that
    soniq.load(path) turns back into a SentenceTransformer."""
    if is_sentence_transformer(model):
        return save_dir(model, path)
    return save_file(model, path)


def load(path, model: nn.Module | None = None) -> nn.Module:
    """Reads a model written by soniq.save. Models built from standard layers (nn.Sequential
    of Linear/Conv2d/activations/pooling/...) are rebuilt from the file; otherwise pass the
    architecture as `model` (its float or prepared form): its packed layers are replaced.
    A folder written for a SentenceTransformer comes back as a SentenceTransformer."""
    if model is None and is_model_dir(os.fspath(path)):
        return load_dir(path)
    return load_file(path, model)
