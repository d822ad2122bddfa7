"""The CUDA kernels of cuda/ on the CPU emulator (tests/cuda_emu), so they are checked on
every machine, GPU or not: the same sources compiled as C++ with AddressSanitizer and
UBSan, every mpgemm kernel exact against the CPU for every bit pair and layout, the
quantizer and expand_codes bitwise, and synchronization bugs made visible by running the
threads of a block in different orders with cp.async landing late or early.

This does not replace a GPU run (tests/test_cuda.py): the emulator follows the PTX ISA's
documented semantics, not the silicon, and measures nothing."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cuda-emu"
EXE = BUILD / "soniq_cuda_emu_test"


def _sanitizer_runtime_available() -> bool:
    gcc = shutil.which("gcc")
    if not gcc:
        return False
    out = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(out) and os.path.exists(out)


@pytest.fixture(scope="module")
def emulator():
    """Configures and builds tests/cuda_emu once (incremental afterwards)."""
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("g++") is None:
        pytest.skip("the CUDA emulator test needs cmake and g++")
    if not _sanitizer_runtime_available():
        pytest.skip("the CUDA emulator test needs gcc's AddressSanitizer runtime (libasan)")
    configure = [cmake, "-S", str(ROOT), "-B", str(BUILD), "-DSONIQ_CUDA=OFF", "-DSONIQ_BUILD_PYTHON=OFF",
                 "-DSONIQ_CUDA_EMU=ON", "-DSONIQ_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
                 "-DCMAKE_CXX_COMPILER=g++"]
    if shutil.which("ninja") and not (BUILD / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja"]
    for cmd in (configure, [cmake, "--build", str(BUILD), "--target", "soniq_cuda_emu_test", "-j", "2"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return EXE


# (thread order, when cp.async lands, seed, --quick): each combination exposes other bugs
CONFIGS = [
    ("forward", "late", 1, False),
    ("reverse", "eager", 2, False),
    ("reverse", "late", 3, True),
    ("forward", "eager", 4, True),
]


@pytest.mark.parametrize("order,copies,seed,quick", CONFIGS, ids=[f"{o}-{c}" for o, c, _, _ in CONFIGS])
def test_cuda_kernels_on_cpu_emulator(emulator, order, copies, seed, quick):
    env = dict(os.environ, SONIQ_EMU_ORDER=order, SONIQ_EMU_CP_ASYNC=copies,
               ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    env.pop("LD_PRELOAD", None)
    cmd = [str(emulator), "--seed", str(seed)] + (["--quick"] if quick else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    report = r.stdout[-6000:] + "\n" + r.stderr[-6000:]
    assert r.returncode == 0, report
    assert r.stdout.splitlines()[-1].endswith(", 0 failures"), report
    assert "runtime error" not in r.stderr and "ERROR: AddressSanitizer" not in r.stderr, report
