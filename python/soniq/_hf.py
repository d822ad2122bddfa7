"""A scope for calls into transformers / huggingface_hub that should be quiet and offline,
with the process's own settings restored afterwards (soniq changes nothing process-wide)."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def quiet_offline():
    """transformers' logging at error level, its progress bars off and HF_HUB_OFFLINE=1 (unless
    the caller set it) inside the block only. huggingface_hub reads HF_HUB_OFFLINE when it is
    first imported: set here, it keeps a process that imports the hub inside the block
    offline; the soniq calls that use this also pass local_files_only."""
    had_env = "HF_HUB_OFFLINE" in os.environ
    if not had_env:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import transformers  # optional (the transformer extra): imported only by its users
    except ImportError:
        if not had_env:
            del os.environ["HF_HUB_OFFLINE"]
        raise
    log = transformers.utils.logging
    level, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()
        if not had_env:
            os.environ.pop("HF_HUB_OFFLINE", None)
