"""Loads the native core and applies SONIQ_ISA (a clear error instead of SIGILL)."""
import os

# torch first: its OpenMP runtime (libgomp) must be loaded before soniq's kernels look for it
# (cpp/omp_borrow.cpp), so that they run on torch's threads instead of a second set
import torch  # noqa: F401

try:
    from . import _C
except ImportError as e:  # pragma: no cover - only a broken install gets here
    raise ImportError(
        "soniq's native extension soniq._C failed to load; reinstall with `pip install .` "
        f"from the source tree ({e})"
    ) from e


def _apply_isa_env() -> None:
    want = os.environ.get("SONIQ_ISA", "").strip().lower()
    if not want or want == "auto":
        return
    try:
        _C.set_isa(want)
    except ValueError as e:
        raise RuntimeError(
            f"SONIQ_ISA={want!r} cannot be used: {e}. Supported on this CPU: "
            f"{', '.join(_C.supported_isas())}; unset SONIQ_ISA to choose automatically."
        ) from None


_apply_isa_env()
