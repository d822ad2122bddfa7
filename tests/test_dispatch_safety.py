"""Dispatch safety (issue 7.6): no instruction beyond the selected ISA can run.

- Object files of the native core are disassembled (objdump): files without an ISA in
  their name hold baseline x86-64 only (no VEX/EVEX: they run before dispatch decides);
  '*avx2*' files hold no EVEX (AVX-512) instruction; '*avx512*' and '*amx*' files may use
  anything.
- ISA files must not define weak (COMDAT) code symbols: the linker could pick such a copy
  (e.g. an inline std:: function compiled with -mavx512f) for baseline callers.
- SONIQ_ISA naming a path the CPU lacks, or no path at all, is a clear error at import;
  soniq.set_isa likewise.

The objects come from the build tree (build/*/ in the source checkout, as left by
`pip install .` or .ci/reliability.sh; SONIQ_BUILD_DIR overrides); without one the
disassembly tests skip.
"""
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import soniq
from soniq import _native

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")
LEGACY_PREFIXES = {"26", "2e", "36", "3e", "64", "65", "66", "67", "f0", "f2", "f3"}


def core_objects() -> list:
    roots = [Path(os.environ["SONIQ_BUILD_DIR"])] if os.environ.get("SONIQ_BUILD_DIR") else \
        sorted((ROOT / "build").glob("*"))
    objs = []
    for r in roots:
        for d in ("soniq_core.dir", "_C.dir"):
            objs += sorted(r.glob(f"**/CMakeFiles/{d}/**/*.o"))
    return objs


def isa_of(obj: Path) -> str:
    name = obj.name.lower()
    if "avx512" in name or "amx" in name:  # the AMX files are AVX-512 code too
        return "avx512"
    if "avx2" in name:
        return "avx2"
    return "baseline"


def encodings(obj: Path) -> dict:
    """Counts VEX and EVEX encoded instructions in the object's code, with examples."""
    raw = subprocess.run(["objdump", "-d", "--insn-width=15", str(obj)],
                         capture_output=True, text=True, check=True).stdout
    found = {"vex": [], "evex": []}
    for line in raw.splitlines():
        m = re.match(r"^\s*[0-9a-f]+:\t((?:[0-9a-f]{2} )+)\s*\t(.*)$", line)
        if not m:
            continue
        bytes_ = m.group(1).split()
        i = 0
        while i < len(bytes_) and bytes_[i] in LEGACY_PREFIXES:
            i += 1
        if i < len(bytes_) and re.fullmatch(r"4[0-9a-f]", bytes_[i]):  # REX
            i += 1
        op = bytes_[i] if i < len(bytes_) else ""
        # in 64-bit mode c4/c5 can only start a VEX prefix and 62 an EVEX prefix
        if op in ("c4", "c5"):
            found["vex"].append(m.group(2).strip())
        elif op == "62":
            found["evex"].append(m.group(2).strip())
    return found


needs_objects = pytest.mark.skipif(
    not (X86 and shutil.which("objdump") and core_objects()),
    reason="needs x86-64, objdump and the build tree's object files (pip install . from the checkout)")


@needs_objects
def test_objects_hold_no_instruction_beyond_their_isa():
    objs = core_objects()
    assert any(isa_of(o) == "avx2" for o in objs), "no AVX2 object found in the build tree"
    problems = []
    for obj in objs:
        isa, enc = isa_of(obj), encodings(obj)
        if isa == "baseline" and (enc["vex"] or enc["evex"]):
            problems.append(f"{obj}: baseline file has AVX instructions, e.g. {(enc['vex'] + enc['evex'])[:3]}")
        if isa == "avx2" and enc["evex"]:
            problems.append(f"{obj}: AVX2 file has AVX-512 (EVEX) instructions, e.g. {enc['evex'][:3]}")
    assert not problems, "\n".join(problems)


@needs_objects
def test_the_checker_sees_avx512_instructions():
    """The EVEX detector is not vacuous: the AVX-512 objects are flagged by it (if the
    compiler emitted any AVX-512 there, which the fast kernels do)."""
    objs = [o for o in core_objects() if isa_of(o) == "avx512"]
    if not objs:
        pytest.skip("no AVX-512 object in this build")
    if not any(encodings(o)["evex"] for o in objs):
        pytest.skip("the AVX-512 objects hold no EVEX code yet (reference kernels only)")


@needs_objects
def test_isa_objects_define_no_weak_code_symbols():
    problems = []
    for obj in core_objects():
        if isa_of(obj) == "baseline":
            continue
        out = subprocess.run(["nm", "--defined-only", "-C", str(obj)], capture_output=True, text=True,
                             check=True).stdout
        weak = [ln for ln in out.splitlines() if re.match(r"^[0-9a-f]+ W ", ln)]
        if weak:
            problems.append(f"{obj}: weak code symbols the linker may share with baseline code "
                            f"(put helpers in an anonymous namespace): {weak[:5]}")
    assert not problems, "\n".join(problems)


def test_kernel_tables_are_filled_by_field_name():
    """A positional KernelTable{...} puts a kernel in the wrong slot, silently, when a field is
    added or moved; each ISA file sets its table's fields by name (unset ones stay null)."""
    files = sorted((ROOT / "cpp").glob("kernels_*.cpp"))
    assert len(files) >= 3
    for f in files:
        src = f.read_text()
        assert not re.search(r"KernelTable\s*\w*\s*\{", src), f"{f.name}: a brace-initialized KernelTable"
        if "KernelTable& kernels_" in src:
            assert re.search(r"\bk\.name = ", src), f"{f.name}: no table filled by field name"


# ---- SONIQ_ISA / set_isa -------------------------------------------------------------------
def _import_with_isa(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SONIQ_ISA=value)
    code = "import soniq; print(soniq.get_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def _unsupported_isas() -> list:
    return [i for i in _native._C.compiled_isas() if i not in soniq.supported_isas()]


def test_soniq_isa_unsupported_by_this_cpu_is_a_clear_error():
    missing = _unsupported_isas()
    if not missing:
        pytest.skip("this CPU supports every compiled ISA path")
    r = _import_with_isa(missing[-1])
    assert r.returncode != 0
    assert "RuntimeError" in r.stderr and "SONIQ_ISA" in r.stderr and "missing" in r.stderr, r.stderr
    assert "Illegal instruction" not in r.stderr and r.returncode > 0  # an exception, not a signal


def test_soniq_isa_unknown_is_a_clear_error():
    r = _import_with_isa("bogus")
    assert r.returncode == 1, r.stderr
    assert "RuntimeError" in r.stderr and "SONIQ_ISA" in r.stderr, r.stderr


def test_soniq_isa_auto_picks_the_best_supported():
    r = _import_with_isa("auto")
    assert r.returncode == 0 and r.stdout.strip() == soniq.supported_isas()[-1], r.stderr


def test_each_supported_isa_can_be_forced_by_env():
    for isa in soniq.supported_isas():
        r = _import_with_isa(isa.upper())
        assert r.returncode == 0 and r.stdout.strip() == isa, r.stderr


def test_set_isa_refuses_what_the_cpu_lacks():
    before = soniq.get_isa()
    for isa in _unsupported_isas() + ["bogus"]:
        with pytest.raises(ValueError):
            soniq.set_isa(isa)
        assert soniq.get_isa() == before  # unchanged after a refusal
    with pytest.raises(TypeError):
        soniq.set_isa(2)
