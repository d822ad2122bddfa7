"""The fast CPU kernels (bit-serial, byte path, pack/unpack) are exact on every ISA path
this machine runs, for every bit pair, odd shapes, two-tier operands and thread counts."""
import glob
import itertools
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import soniq
from soniq import ops
from soniq._native import _C

ISAS = soniq.supported_isas() + list(_C.emulated_isas())  # with the AMX kernel on its emulation
ALL_X86 = ["scalar", "avx2", "avx512", "amx", "amx_emu"]
PATHS = ["auto", "bitserial", "bytes"]


def isa_param(name):
    miss = "" if name in ISAS else (_C.missing_features(name) if name in _C.compiled_isas() + ["amx_emu"]
                                    else "not compiled")
    return pytest.param(name, marks=pytest.mark.skipif(
        name not in ISAS, reason=f"{name} kernels need CPU features this machine lacks: {miss}"))


ISA_PARAMS = [isa_param(n) for n in ALL_X86 if n in _C.compiled_isas() or n == "amx_emu"]


@pytest.fixture
def kernel_setup():
    """Restores ISA, kernel path and threads after a test that changes them."""
    isa, path, threads = soniq.get_isa(), _C.get_kernel_path(), soniq.get_num_threads()
    yield
    _C.set_kernel_path("auto")  # a forced path the ISA lacks would refuse the ISA
    soniq.set_isa(isa)
    _C.set_kernel_path(path)
    soniq.set_num_threads(threads)


def random_values(rng, R, K, bits, signed, axis=0):
    """Integers in each channel's range (bits: int or per-channel along axis)."""
    b = np.asarray(bits)
    if b.ndim:
        b = b.reshape([-1, 1] if axis == 0 else [1, -1])
    b = np.broadcast_to(b, (R, K))
    if not signed:
        return rng.integers(0, 1 << b).astype(np.int64)
    lo = np.where(b == 1, -1, -(1 << (b - 1)))
    hi = np.where(b == 1, 1, (1 << (b - 1)) - 1)
    v = rng.integers(lo, hi + 1)
    return np.where((b == 1) & (v == 0), 1, v).astype(np.int64)


def check(a, ba, sa, b, bb, sb, a_axis=0, b_axis=0):
    pa = ops.pack(a, ba, signed=sa, axis=a_axis)
    pb = ops.pack(b, bb, signed=sb, axis=b_axis, k_layout=pa if a_axis == 1 else None)
    if b_axis == 1:
        pa = ops.pack(a, ba, signed=sa, axis=a_axis, k_layout=pb)
    out = ops.mpgemm(pa, pb, out_dtype=torch.int64)
    np.testing.assert_array_equal(out, a @ b.T)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("path", PATHS)
def test_all_bit_pairs_exact(isa, path, kernel_setup):
    rng = np.random.default_rng(hash((isa, path)) % 2**32)
    soniq.set_isa(isa)
    _C.set_kernel_path(path)
    for ba, bb in itertools.product(range(1, 9), range(1, 9)):
        M, N, K = int(rng.integers(1, 6)), int(rng.integers(1, 10)), int(rng.choice([1, 63, 65, 200]))
        sa, sb = bool(rng.integers(2)), bool(rng.integers(2))
        check(random_values(rng, M, K, ba, sa), ba, sa, random_values(rng, N, K, bb, sb), bb, sb)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 70, 63), (67, 1, 65), (70, 131, 200), (3, 5, 4097), (9, 70, 2100)])
@pytest.mark.parametrize("threads", [1, 2])
def test_odd_shapes_and_threads(isa, shape, threads, kernel_setup):
    rng = np.random.default_rng(sum(shape) + threads)
    soniq.set_isa(isa)
    soniq.set_num_threads(threads)
    M, N, K = shape
    for path in _C.kernel_paths():
        _C.set_kernel_path(path)
        for ba, bb in [(1, 1), (2, 2), (8, 1), (8, 4), (4, 8)]:
            check(random_values(rng, M, K, ba, False), ba, False, random_values(rng, N, K, bb, True), bb, True)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("M", [1, 5, 9, 40])
def test_extreme_codes_do_not_saturate(isa, M, kernel_setup):
    """All codes at their maximum: the int16 stages of the byte and table kernels must not
    saturate for any bit pair (the bound that lets them accumulate in int16 is tight)."""
    soniq.set_isa(isa)
    K, N = 4200, 6
    for path in _C.kernel_paths():
        _C.set_kernel_path(path)
        for ba, bb in [(8, 8), (8, 6), (8, 4), (8, 2), (8, 1), (4, 4), (6, 8), (7, 7)]:
            a = np.full((M, K), (1 << ba) - 1, dtype=np.int64)
            b = np.full((N, K), (1 << bb) - 1, dtype=np.int64)
            b[0, ::3] = 0
            check(a, ba, False, b, bb, False)
            check(-(a + 1) // 2, ba, True, -(b + 1) // 2, bb, True)  # most negative signed values


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("M", [1, 3, 6, 40])
def test_long_k_crosses_kernel_blocks(isa, M, kernel_setup):
    """K past every internal K block (bit-serial 8192, byte buffer 4096, VNNI chunk 1024, fused
    GEMV 32768)."""
    rng = np.random.default_rng(M)
    soniq.set_isa(isa)
    K = 33000
    for path in _C.kernel_paths():
        _C.set_kernel_path(path)
        for ba, bb in [(1, 1), (2, 2), (8, 1), (4, 4), (8, 8)]:
            check(random_values(rng, M, K, ba, False), ba, False, random_values(rng, 5, K, bb, False), bb, False)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("threads", [1, 2])
def test_two_tier_operands_both_axes(isa, threads, kernel_setup):
    """Weights with per-row tiers (axis 0) or per-K tiers (axis 1) against activations
    with per-K tiers, as in a mixed layer; every block pair may take a different path."""
    rng = np.random.default_rng(7 + threads)
    soniq.set_isa(isa)
    soniq.set_num_threads(threads)
    M, N, K = 5, 70, 130
    for (la, ha), (lw, hw) in [((4, 8), (2, 4)), ((1, 8), (1, 8)), ((2, 4), (1, 2))]:
        a_bits = rng.choice([la, ha], K)
        a = random_values(rng, M, K, a_bits, False, axis=1)
        w_rows = rng.choice([lw, hw], N)
        check(a, a_bits, False, random_values(rng, N, K, w_rows, True, axis=0), w_rows, True, 1, 0)
        w_cols = rng.choice([lw, hw], K)
        w_cols[a_bits == la] = lw  # K tiers must be shared: one permutation for both operands
        w_cols[a_bits == ha] = hw
        check(a, a_bits, False, random_values(rng, N, K, w_cols, True, axis=1), w_cols, True, 1, 1)


@pytest.mark.parametrize("isa", [i for i in ISA_PARAMS if i.values[0] in ("scalar", "avx2", "avx512", "amx")])
def test_bitserial_kernel_adds_shifted_product_in_place(isa):
    """The bit-serial kernel's contract on its own (kernels.h): C += product << shift, no
    cell outside the M x N block touched (a guard column and row), for row counts on both
    sides of the AVX-512 interleaved kernel's minimum (4), every column tail of its 8-column
    vectors, K across its 128-word blocks and several planes."""
    bad = {}
    for M, N, kw in [(1, 1, 1), (3, 9, 6), (4, 1, 1), (4, 8, 6), (5, 17, 7), (7, 63, 3), (9, 64, 130),
                     (13, 30, 257), (130, 70, 6)]:
        for pa, pb, shift in [(1, 1, 0), (2, 1, 1), (1, 2, 2), (3, 2, 0), (8, 8, 1)]:
            n = _C.bitserial_mismatches(isa, M, N, kw, pa, pb, shift, M * 1000 + N * 10 + pa)
            if n:
                bad[(M, N, kw, pa, pb, shift)] = n
    assert not bad


@settings(max_examples=25, deadline=None)
@given(ba=st.integers(1, 8), bb=st.integers(1, 8), M=st.integers(1, 9), N=st.integers(1, 70),
       K=st.integers(1, 300), sa=st.booleans(), sb=st.booleans(), seed=st.integers(0, 2**31))
def test_property_every_isa_and_path(ba, bb, M, N, K, sa, sb, seed):
    rng = np.random.default_rng(seed)
    a, b = random_values(rng, M, K, ba, sa), random_values(rng, N, K, bb, sb)
    isa0, path0 = soniq.get_isa(), _C.get_kernel_path()
    try:
        for isa in ISAS:
            _C.set_kernel_path("auto")
            soniq.set_isa(isa)
            for path in _C.kernel_paths():
                _C.set_kernel_path(path)
                check(a, ba, sa, b, bb, sb)
    finally:
        _C.set_kernel_path("auto")
        soniq.set_isa(isa0)
        _C.set_kernel_path(path0)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_pack_planes_matches_torch_reference(isa, bits, kernel_setup):
    from soniq.ops._library import pack_block_torch
    rng = np.random.default_rng(bits)
    soniq.set_isa(isa)
    for rows, klen in [(1, 1), (3, 31), (2, 33), (5, 64), (70, 200)]:
        codes = torch.from_numpy(rng.integers(0, 1 << bits, (rows, klen)).astype(np.uint8))
        kw = (klen + 63) // 64 + 1  # one spare word: padding must stay zero
        got = torch.empty(bits * rows * kw, dtype=torch.int64)
        _C.pack_block(codes.data_ptr(), rows, klen, klen, bits, kw, got.data_ptr())
        assert torch.equal(got, pack_block_torch(codes, bits, kw))
        back = ops._library.unpack_block(got, bits, rows, klen, kw)
        assert torch.equal(back, codes)


def test_kernel_path_rejects_unknown_name():
    with pytest.raises(ValueError, match="path must be"):
        _C.set_kernel_path("fastest")


def test_every_isa_has_every_kernel_path(kernel_setup):
    """The byte path runs on the weight-layout kernels, which every ISA has: no path is refused
    on any ISA, and the table-lookup path (replaced by them) is an unknown name."""
    for isa in ISAS:
        soniq.set_isa(isa)
        assert _C.kernel_paths() == ["auto", "bitserial", "bytes"]
    with pytest.raises(ValueError, match="path must be 'auto', 'bitserial' or 'bytes'"):
        _C.set_kernel_path("lut")


def _avx2_object(name):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hits = glob.glob(os.path.join(root, "build", "**", name + ".o"), recursive=True)
    return max(hits, key=os.path.getmtime) if hits else None


@pytest.mark.parametrize("source", ["kernels_avx2.cpp", "kernels_avx2_layout.cpp"])
def test_avx2_object_has_no_avx512_instructions(source):
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not found (binutils)")
    obj = _avx2_object(source)
    if obj is None:
        pytest.skip(f"no build/**/{source}.o (run from a source tree after pip install .)")
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", obj], capture_output=True, text=True,
                         check=True).stdout
    bad = [ln for ln in asm.splitlines() if re.search(r"%zmm|%k[0-7]\b|\{%k|vpopcnt|vpdpbusd|vpternlog", ln)]
    assert not bad, "AVX-512 instructions in the AVX2 object:\n" + "\n".join(bad[:10])
