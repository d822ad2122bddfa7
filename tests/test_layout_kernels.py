"""Every ISA's weight-layout kernels (cpp/kernels.h LayoutGemmFn: GEMV in registers for up to
four A rows, the decode-buffer GEMM above) are exact against numpy, on every ISA this machine
runs (the AMX emulation included): each weight width, GEMV and GEMM row counts, 64-column
blocks with 1 to 4 tiles, K past one int32 block, and the code ranges where AVX2's int16
sums (n vpmaddubsw results per vpmaddwd) and its split 7- and 8-bit operands sit at their
exact limits. The float epilogue at the kernel's store matches the scalar reference bit for bit."""
import numpy as np
import pytest

import soniq
from soniq import ops
from conftest import random_values, ref_matmul


@pytest.mark.parametrize("wb", range(1, 9))
@pytest.mark.parametrize("wa", [1, 4, 8])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 37])  # GEMV (<= 4 rows) and GEMM strips with a tail row
def test_every_weight_width(isa, wb, wa, M):
    rng = np.random.default_rng(wb * 100 + wa * 10 + M)
    N, K = 70, 131  # the second 64-column block has one tile of 6 columns
    for signed_a, signed_b in ((False, True), (True, False)):
        a = random_values(rng, (M, K), wa, signed_a)
        b = random_values(rng, (N, K), wb, signed_b)
        out = ops.mpgemm(ops.pack(a, wa, signed=signed_a), ops.pack(b, wb, signed=signed_b))
        np.testing.assert_array_equal(out, ref_matmul(a, b), err_msg=f"W{wb}A{wa} M={M} {isa}")


@pytest.mark.parametrize("wb", range(1, 9))
@pytest.mark.parametrize("M", [1, 4, 6, 9])
def test_largest_codes(isa, wb, M):
    """Every product at its largest magnitude (A codes 255, weight codes at both ends): int16
    and int32 sums at their exact limits. Unsigned A 8 bits, signed weights: the stored codes
    are 0 and 2^wb - 1, the values -2^(wb-1) and 2^(wb-1) - 1."""
    rng = np.random.default_rng(wb * 7 + M)
    N, K = 65, 1000
    a = np.full((M, K), 255, np.int64)
    lo, hi = (-1, 1) if wb == 1 else (-(1 << (wb - 1)), (1 << (wb - 1)) - 1)
    b = np.full((N, K), hi, np.int64)
    b[1::2] = lo  # odd rows at the low end
    b[2, : K // 2] = lo  # one row mixed
    a[0, ::3] = rng.integers(0, 256, size=len(range(0, K, 3)))
    np.testing.assert_array_equal(ops.mpgemm(ops.pack(a, 8, signed=False), ops.pack(b, wb, signed=True)),
                                  ref_matmul(a, b), err_msg=f"W{wb} {isa}")


@pytest.mark.parametrize("N", [1, 16, 17, 32, 33, 48, 49, 64, 65, 130])
def test_block_tiles(isa, N):
    """64-column blocks of 1, 2, 3 and 4 tiles (AVX2 runs tile pairs), two weight tiers."""
    rng = np.random.default_rng(N)
    M, K = 11, 200
    a = random_values(rng, (M, K), 8, False)
    bits = rng.choice([4, 8], N)
    b = random_values(rng, (N, K), bits, True)
    np.testing.assert_array_equal(ops.mpgemm(ops.pack(a, 8, signed=False), ops.pack(b, bits, signed=True)),
                                  ref_matmul(a, b))


@pytest.mark.parametrize("wb", [4, 8])
@pytest.mark.parametrize("M", [2, 20])
@pytest.mark.parametrize("N", [17, 81])
def test_k_past_one_int32_block(isa, wb, M, N):
    """K > 32768 codes: two K blocks, the second added into the int64 totals of the first (a
    whole first 64-column block too: AVX-512 decodes it in its first strip, per K block, or
    reads 8-bit weights in place)."""
    rng = np.random.default_rng(wb + M + N)
    K = 33000
    a = np.full((M, K), 255, np.int64)
    a[1] = random_values(rng, (1, K), 8, False)
    lo, hi = -(1 << (wb - 1)), (1 << (wb - 1)) - 1
    b = np.where(rng.random((N, K)) < 0.5, lo, hi)
    np.testing.assert_array_equal(ops.mpgemm(ops.pack(a, 8, signed=False), ops.pack(b, wb, signed=True)),
                                  ref_matmul(a, b))


@pytest.mark.parametrize("wb", [2, 4, 6, 7, 8])
def test_float_epilogue_same_bits_as_reference(isa, wb):
    """Row scales on both sides: the float epilogue at the kernel's store gives the scalar
    reference's floats bit for bit."""
    rng = np.random.default_rng(wb)
    M, N, K = 13, 70, 300
    a = random_values(rng, (M, K), 8, False)
    b = random_values(rng, (N, K), wb, True)
    sa = rng.uniform(0.01, 2, M).astype(np.float32)
    sb = rng.uniform(0.01, 2, N).astype(np.float32)
    got = ops.mpgemm(ops.pack(a, 8, signed=False, scale=sa), ops.pack(b, wb, signed=True, scale=sb))
    with soniq.use_isa("scalar"):
        want = ops.mpgemm(ops.pack(a, 8, signed=False, scale=sa), ops.pack(b, wb, signed=True, scale=sb))
    assert got.dtype == np.float32 and np.array_equal(got, want)


@pytest.mark.parametrize("signed_a", [False, True])
def test_float_epilogue_shifted_products(isa, signed_a):
    """Signed 1-bit weights (values 2u - 1: products shifted left by one, by two with signed
    1-bit activations): AVX-512 adds the code-sum terms at the store instead of starting its
    accumulators at them; the floats equal the scalar reference bit for bit."""
    rng = np.random.default_rng(int(signed_a))
    M, N, K = 13, 70, 300
    wa = 1 if signed_a else 8
    a = random_values(rng, (M, K), wa, signed_a)
    b = random_values(rng, (N, K), 1, True)
    sa = rng.uniform(0.01, 2, M).astype(np.float32)
    sb = rng.uniform(0.01, 2, N).astype(np.float32)
    got = ops.mpgemm(ops.pack(a, wa, signed=signed_a, scale=sa), ops.pack(b, 1, signed=True, scale=sb))
    with soniq.use_isa("scalar"):
        want = ops.mpgemm(ops.pack(a, wa, signed=signed_a, scale=sa), ops.pack(b, 1, signed=True, scale=sb))
    assert got.dtype == np.float32 and np.array_equal(got, want)
