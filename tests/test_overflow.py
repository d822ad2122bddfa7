"""The int32 accumulator limit (issue 7.3): K * max|a| * max|b| is computed and enforced.

At the largest K that int32 allows, the op runs and is exact (the all-extreme inputs
reach the limit itself); one more K column raises OverflowError, and out_dtype=int64
then gives the exact wide result.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from soniq import ops

INT32_MAX = 2**31 - 1


def max_abs(bits: int, signed: bool) -> int:
    if not signed:
        return 2**bits - 1
    return 1 if bits == 1 else 2 ** (bits - 1)


def extreme(bits: int, signed: bool) -> int:
    """The value of largest magnitude (the one that reaches the limit)."""
    return -max_abs(bits, signed) if signed and bits > 1 else max_abs(bits, signed)


def exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.int64) @ b.astype(np.int64).T


CASES = [  # (bits_a, signed_a, bits_b, signed_b)
    (8, False, 8, False),  # 255 * 255: K <= 33,025
    (8, True, 8, True),    # (-128) * (-128): K <= 131,071
    (8, False, 8, True),   # 255 * (-128): negative extreme
    (4, True, 8, False),   # K about 1M
]


@pytest.mark.parametrize("ba,sa,bb,sb", CASES)
def test_int32_boundary_exact_then_refused(ba, sa, bb, sb):
    prod = max_abs(ba, sa) * max_abs(bb, sb)
    k_max = INT32_MAX // prod
    va, vb = extreme(ba, sa), extreme(bb, sb)

    a = np.full((2, k_max), va, dtype=np.int64)
    a[1, ::3] = 0 if not (sa and ba == 1) else 1  # a second, non-extreme row
    b = np.full((1, k_max), vb, dtype=np.int64)
    pa, pb = ops.pack(a, ba, signed=sa), ops.pack(b, bb, signed=sb)
    assert ops.int32_limit(pa, pb) == k_max * prod <= INT32_MAX
    out = ops.mpgemm(pa, pb)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out.astype(np.int64), exact(a, b))
    assert abs(int(out[0, 0])) == k_max * prod  # the limit is reached, not just bounded

    a1 = np.full((1, k_max + 1), va, dtype=np.int64)
    b1 = np.full((1, k_max + 1), vb, dtype=np.int64)
    pa1, pb1 = ops.pack(a1, ba, signed=sa), ops.pack(b1, bb, signed=sb)
    assert ops.int32_limit(pa1, pb1) == (k_max + 1) * prod > INT32_MAX
    with pytest.raises(OverflowError, match="int64"):
        ops.mpgemm(pa1, pb1)
    with pytest.raises(OverflowError):
        ops.mpgemm(pa1, pb1, out_dtype=torch.int32)
    wide = ops.mpgemm(pa1, pb1, out_dtype=torch.int64)
    assert wide.dtype == np.int64
    np.testing.assert_array_equal(wide, exact(a1, b1))


def test_limit_uses_the_widest_row_group():
    """Per-row weight bits: the limit is the worst pair of row groups, not an average."""
    k = INT32_MAX // (255 * 255)
    bits = np.array([2, 8, 4])
    w = np.stack([np.full(k, 3), np.full(k, 255), np.full(k, 15)])
    x = np.full((1, k), 255)
    pw, px = ops.pack(w, bits, signed=False), ops.pack(x, 8, signed=False)
    assert ops.int32_limit(px, pw) == k * 255 * 255
    np.testing.assert_array_equal(ops.mpgemm(px, pw), exact(x, w))


def test_limit_sums_k_segments():
    """Per-K-column activation bits: the limit is a sum over the K segments."""
    k8 = 30_000
    k2 = (INT32_MAX - k8 * 255 * 255) // (3 * 255)
    kbits = np.array([8] * k8 + [2] * k2)
    x = np.where(kbits == 8, 255, 3)[None, :]
    px = ops.pack(x, kbits, signed=False, axis=1)
    w = np.full((1, k8 + k2), 255)
    pw = ops.pack(w, 8, signed=False, k_layout=px)
    limit = k8 * 255 * 255 + k2 * 3 * 255
    assert ops.int32_limit(px, pw) == limit <= INT32_MAX
    np.testing.assert_array_equal(ops.mpgemm(px, pw), exact(x, w))


@settings(max_examples=40, deadline=None)
@given(ba=st.integers(1, 8), bb=st.integers(1, 8), sa=st.booleans(), sb=st.booleans(),
       k=st.integers(1, 300))
def test_limit_formula_matches_an_independent_count(ba, bb, sa, sb, k):
    a = np.full((1, k), extreme(ba, sa))
    b = np.full((1, k), extreme(bb, sb))
    pa, pb = ops.pack(a, ba, signed=sa), ops.pack(b, bb, signed=sb)
    assert ops.int32_limit(pa, pb) == k * max_abs(ba, sa) * max_abs(bb, sb)
    assert abs(int(ops.mpgemm(pa, pb)[0, 0])) == ops.int32_limit(pa, pb)


def test_int64_is_exact_far_beyond_int32():
    k = 3 * (INT32_MAX // (255 * 255))
    a = np.full((1, k), 255)
    pa = ops.pack(a, 8, signed=False)
    out = ops.mpgemm(pa, pa, out_dtype=torch.int64)
    assert int(out[0, 0]) == k * 255 * 255 > INT32_MAX
