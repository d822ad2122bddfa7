"""The AMX layout GEMM (cpp/kernels_amx.inl) is exact: natively where the CPU has AMX, and on
every CPU with AVX-512 through the tile emulation (cpp/amx_emu.h, isa 'amx_emu'). Shapes cover
the kernel's edges: tail strips of fewer than 32 rows (zero-padded A tiles) and of at most 16
(one A tile), 64-column blocks with one or two 32-column halves, K past one int32 block."""
import numpy as np
import pytest
import torch

import soniq
from soniq import ops
from soniq._native import _C
from conftest import random_values, ref_matmul

AMX_PATHS = [i for i in ("amx",) if i in soniq.supported_isas()] + list(_C.emulated_isas())
pytestmark = pytest.mark.skipif(not AMX_PATHS, reason="needs AMX, or AVX-512 for the AMX emulation")


@pytest.fixture(params=AMX_PATHS or ["none"])
def amx(request):
    with soniq.use_isa(request.param):
        yield request.param


@pytest.mark.parametrize("wb", range(1, 9))
@pytest.mark.parametrize("wa", [1, 4, 8])
@pytest.mark.parametrize("signed_a,signed_b", [(False, True), (True, False)])
def test_every_weight_bits_integer_and_float(amx, wb, wa, signed_a, signed_b):
    rng = np.random.default_rng(wb * 100 + wa)
    M, N, K = 37, 70, 131  # a tail strip of 5 rows; the second 64-column block has 6 columns
    a = random_values(rng, (M, K), wa, signed_a)
    b = random_values(rng, (N, K), wb, signed_b)
    ref = ref_matmul(a, b)
    out = ops.mpgemm(ops.pack(a, wa, signed=signed_a), ops.pack(b, wb, signed=signed_b))
    np.testing.assert_array_equal(out, ref, err_msg=f"W{wb}A{wa} {amx}")
    # with row scales: the float epilogue at the kernel's store, against the AVX-512 kernel
    sa = rng.uniform(0.01, 2, M).astype(np.float32)
    sb = rng.uniform(0.01, 2, N).astype(np.float32)
    pa, pb = ops.pack(a, wa, signed=signed_a, scale=sa), ops.pack(b, wb, signed=signed_b, scale=sb)
    got = ops.mpgemm(pa, pb)
    with soniq.use_isa("avx512"):
        want = ops.mpgemm(ops.pack(a, wa, signed=signed_a, scale=sa), ops.pack(b, wb, signed=signed_b, scale=sb))
    assert got.dtype == np.float32 and np.array_equal(got, want)


@pytest.mark.parametrize("M", [5, 16, 17, 31, 32, 33, 48, 64, 130])
@pytest.mark.parametrize("N", [1, 16, 32, 33, 64, 65, 200])
def test_strip_and_block_edges(amx, M, N):
    rng = np.random.default_rng(M * 1000 + N)
    K = 200
    a_bits, b_bits = rng.choice([3, 8], M), rng.choice([4, 8], N)  # two row tiers on each side
    a, b = random_values(rng, (M, K), a_bits, False), random_values(rng, (N, K), b_bits, True)
    np.testing.assert_array_equal(ops.mpgemm(ops.pack(a, a_bits, signed=False), ops.pack(b, b_bits, signed=True)),
                                  ref_matmul(a, b))


@pytest.mark.parametrize("M,N", [(20, 17), (37, 70), (48, 64)])
def test_k_past_one_int32_block(amx, M, N):
    """K > 32768 codes: two K blocks, the second added into the int64 totals of the first;
    with a tail strip read from its padded copy at the second block's offset (M = 20, 37) or
    in place (16 rows: M = 48), and 8-bit B tiles read in place from the layout (N >= 64)."""
    rng = np.random.default_rng(7)
    K = 33000
    a = np.full((M, K), 255, np.int64)  # the largest products: any int32 overflow would show
    a[1] = random_values(rng, (1, K), 8, False)
    b = np.where(rng.random((N, K)) < 0.5, -128, 127)
    np.testing.assert_array_equal(ops.mpgemm(ops.pack(a, 8, signed=False), ops.pack(b, 8, signed=True)),
                                  ref_matmul(a, b))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dynamic", [None, "token"])
def test_packed_linear_same_bits_as_avx512(amx, threads, dynamic):
    """The packed layer's fused forward (one or two activation tiers, two weight tiers, per-token
    or static activation scales, bias): the AMX path gives the AVX-512 path's floats bit for bit."""
    from test_fused_linear import make_linear

    rng = np.random.default_rng(3)
    n0 = soniq.get_num_threads()
    soniq.set_num_threads(threads)
    try:
        # K 1500 (one activation tier: the float epilogue) and 3000 (two K segments of ~1500:
        # int64 totals): K sub-blocks whose C tiles wait in the thread's buffer between them
        for K, N, a_tiers in ((70, 17, (4, 8)), (384, 130, (4, 8)), (1500, 70, (8,)), (3000, 70, (4, 8))):
            lin = make_linear(rng, K, N, a_tiers, (4, 8), dynamic=dynamic)
            for M in (5, 16, 33, 131):
                x = torch.randn(M, K) * 3
                got = lin(x)
                with soniq.use_isa("avx512"):
                    want = lin(x)
                assert torch.equal(got, want), (K, N, M)
    finally:
        soniq.set_num_threads(n0)


def test_dispatch_self_check_runs_the_kernel(amx):
    """Before AMX is offered, dispatch compares its layout GEMM with AVX-512's on random
    operands; the check passes for the tile kernel (and is refused for unknown paths)."""
    assert _C.layout_gemm_self_check(amx) is True
    with pytest.raises(ValueError):
        _C.layout_gemm_self_check("bogus")
