"""Threads, ISA selection and the build/CPU report behind soniq.info()."""
from __future__ import annotations

import contextlib
import numbers
import os
import platform
from typing import Iterator

import torch

from ._native import _C
from ._version import __version__


def get_num_threads() -> int:
    """Threads soniq's CPU kernels use: set_num_threads's n; until it is called, torch's count
    (torch.get_num_threads() as seen by its OpenMP runtime in this thread; not capped, so the
    kernels can run on torch's own team), or the physical cores available to this process
    when no OpenMP runtime is loaded."""
    return _C.get_num_threads()


def set_num_threads(n: int) -> None:
    """Sets the number of threads soniq's CPU kernels use (results do not depend on it). The
    kernels run on torch's OpenMP threads: keep n equal to torch.get_num_threads() (or never
    call this: the default follows torch) so one set of threads serves both."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"n must be an int in 1..{MAX_THREADS}, got {n!r}")
    _C.set_num_threads(int(n))


MAX_THREADS = 1024  # a bound on the threads one call may start (a typo must not start 100,000)


def microarch_of(vendor: str, family: int, model: int) -> str | None:
    """'zen1' .. 'zen5' for AMD CPUs from their CPUID family and model, else None."""
    if vendor != "AuthenticAMD":
        return None
    if family == 0x17:
        return "zen2" if model >= 0x30 else "zen1"
    if family == 0x19:
        return "zen4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF else "zen3"
    return "zen5" if family == 0x1A else None


def cpu_microarch() -> str | None:
    """This CPU's microarchitecture where known (microarch_of). VMs often report a bare brand
    ("AMD EPYC") for CPUs whose speed differs a lot (Zen 5 retires two zmm vpdpbusd per cycle,
    Zen 4 one), so benchmark results are named by it too."""
    cpu = _C.cpu_info()
    return microarch_of(cpu["vendor"], cpu["family"], cpu["model"])


def supported_isas() -> list[str]:
    """ISA paths this CPU can run, e.g. ['scalar', 'avx2', 'avx512', 'amx'] (the last is the default).
    'amx_emu' (the AMX kernel on its emulation, slow: for tests) is not listed but set_isa takes it
    on CPUs with AVX-512."""
    return list(_C.supported_isas())


def get_isa() -> str:
    """The CPU kernel path in use: 'scalar', 'avx2', 'avx512', 'amx' (or 'amx_emu')."""
    return _C.active_isa()


def set_isa(isa: str) -> None:
    """Forces a CPU kernel path for the whole process (all threads); raises ValueError if
    unknown or unsupported by this CPU. "auto" goes back to the best path the CPU has."""
    if not isinstance(isa, str):
        raise TypeError(f"isa must be a str, got {type(isa).__name__}")
    isa = isa.lower()
    _C.set_isa(supported_isas()[-1] if isa == "auto" else isa)


@contextlib.contextmanager
def use_isa(isa: str) -> Iterator[None]:
    """Context manager running the enclosed code on one ISA path, then restoring the old one.
    The path is process-wide (like torch.set_num_threads): not for threads that each want
    their own path at once."""
    old = get_isa()
    set_isa(isa)
    try:
        yield
    finally:
        set_isa(old)


def _cuda_report() -> dict:
    rep = {"built": bool(_C.built_with_cuda), "archs": _C.cuda_archs() or None, "devices": 0}
    if rep["built"]:
        rep["devices"] = _C.cuda_device_count()
        if rep["devices"] == 0:
            rep["note"] = _C.cuda_error() or "no CUDA device"
    return rep


def info(verbose: bool = True) -> dict:
    """Returns (and by default prints) version, build, CPU features, ISA path and threads."""

    cpu = _C.cpu_info()
    d = {
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "compiler": _C.compiler(),
        "cuda": _cuda_report(),
        "cpu": {"vendor": cpu["vendor"], "model": cpu["brand"], "family": cpu["family"], "model_id": cpu["model"],
                "microarch": cpu_microarch(), "features": list(cpu["features"])},
        "isa": {
            "compiled": list(_C.compiled_isas()),
            "supported": supported_isas(),
            "emulated": list(_C.emulated_isas()),  # set_isa only (tests): the AMX kernel on its emulation
            "active": get_isa(),
            "forced_by_env": os.environ.get("SONIQ_ISA") or None,
        },
        "threads": {"soniq": get_num_threads(), "default": _C.default_num_threads(),
                    "torch": torch.get_num_threads(), "backend": _C.thread_backend(),
                    "openmp_library": _C.openmp_library() or None},
    }
    if verbose:
        print(format_info(d))
    return d


def _backend_line(t: dict) -> str:
    if t.get("backend") == "openmp":
        return f"torch's OpenMP threads, {t['openmp_library']}"
    return "soniq's own pool"


def format_info(d: dict) -> str:
    cuda = d["cuda"]
    if not cuda["built"]:
        cuda_line = "not built (CPU only)"
    else:
        cuda_line = f"built for {cuda['archs']}; devices: {cuda['devices']}"
        if cuda.get("note"):
            cuda_line += f" ({cuda['note']})"
    lines = [
        f"soniq {d['version']}  (python {d['python']}, torch {d['torch']})",
        f"  compiler : {d['compiler']}",
        f"  cuda     : {cuda_line}",
        f"  cpu      : {d['cpu']['model'] or 'unknown'} "
        f"[{', '.join(x for x in (d['cpu']['vendor'], d['cpu']['microarch']) if x)}]",
        f"  features : {' '.join(d['cpu']['features']) or '(none detected)'}",
        f"  isa      : {d['isa']['active']} (supported: {', '.join(d['isa']['supported'])}; "
        f"compiled: {', '.join(d['isa']['compiled'])})",
        f"  threads  : {d['threads']['soniq']} (default {d['threads']['default']}; torch uses {d['threads']['torch']}; "
        f"run on {_backend_line(d['threads'])})",
    ]
    return "\n".join(lines)
