"""Real English text available offline: sentences from the Python standard library's
docstrings, with a fixed train / held-out split (by module, so no sentence leaks), and a
second, disjoint source for evaluation only: the Python language reference's prose
(pydoc_data.topics, shipped with CPython; other authors, other style)."""
from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import warnings

# Modules whose import is slow, noisy or has side effects (GUI, self-tests, antigravity).
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
         "ensurepip", "venv", "pydoc_data", "__main__", "__phello__", "__hello__", "xxsubtype"}
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _docstrings(module) -> list[str]:
    out = [inspect.getdoc(module) or ""]
    for _, obj in inspect.getmembers(module):
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == module.__name__:
            out.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for _, meth in inspect.getmembers(obj, inspect.isfunction):
                    out.append(inspect.getdoc(meth) or "")
    return out


def _sentences(doc: str) -> list[str]:
    text = " ".join(doc.split())
    return [s for s in _SENT.split(text)
            if 40 <= len(s) <= 300 and s[0].isupper() and s[-1] in ".!?" and ">>>" not in s
            and sum(c.isalpha() or c == " " for c in s) > 0.85 * len(s)]


def stdlib_sentences(max_modules: int | None = None) -> dict[str, list[str]]:
    """{module name: unique sentences}, deterministic for a given Python version."""
    import sys

    names = sorted(n for n in sys.stdlib_module_names if n not in _SKIP and not n.startswith("_"))
    seen, out = set(), {}
    for name in names[:max_modules]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # platform-specific or optional modules
            continue
        sents = []
        for doc in _docstrings(mod):
            for s in _sentences(doc):
                if s not in seen:
                    seen.add(s)
                    sents.append(s)
        if sents:
            out[name] = sents
    return out


def train_heldout_split(held_out_fraction: float = 0.2, max_modules: int | None = None):
    """(train sentences, held-out sentences): modules go to one side by a stable hash."""
    train, held = [], []
    for name, sents in stdlib_sentences(max_modules).items():
        h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < held_out_fraction else train).extend(sents)
    return train, held


def reference_sentences(exclude=()) -> list[str]:
    """Unique sentences of the Python language reference (pydoc_data.topics), in a fixed
    order, less any sentence in `exclude` (e.g. the docstring corpus): text the demo never
    trains or tunes on."""
    from pydoc_data.topics import topics

    skip, seen, out = set(exclude), set(), []
    for key in sorted(topics):
        for s in _sentences(topics[key]):
            if s not in seen and s not in skip:
                seen.add(s)
                out.append(s)
    return out
