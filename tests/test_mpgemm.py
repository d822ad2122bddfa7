"""soniq.ops.mpgemm is exactly a_int @ b_int.T, on every ISA path this CPU has."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import soniq
from soniq import ops
from conftest import TEST_ISAS, random_values, ref_matmul


@pytest.mark.parametrize("wa", range(1, 9))
@pytest.mark.parametrize("signed_a,signed_b", [(False, True), (True, True), (False, False), (True, False)])
def test_every_bit_pair(isa, wa, signed_a, signed_b):
    rng = np.random.default_rng(wa)
    for wb in range(1, 9):
        M, N, K = 3, 5, 131
        a = random_values(rng, (M, K), wa, signed_a)
        b = random_values(rng, (N, K), wb, signed_b)
        out = ops.mpgemm(ops.pack(a, wa, signed=signed_a), ops.pack(b, wb, signed=signed_b))
        assert out.dtype == np.int32
        np.testing.assert_array_equal(out, ref_matmul(a, b), err_msg=f"W{wb}A{wa} {isa}")


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 7, 64), (7, 1, 65), (2, 3, 63), (1, 1, 1000), (17, 70, 129),
                                   (33, 130, 200)])
def test_odd_shapes(isa, M, N, K):
    rng = np.random.default_rng(M * 1000 + N + K)
    a, b = random_values(rng, (M, K), 4, False), random_values(rng, (N, K), 2, True)
    np.testing.assert_array_equal(ops.mpgemm(ops.pack(a, 4, signed=False), ops.pack(b, 2, signed=True)),
                                  ref_matmul(a, b))


@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 20), N=st.integers(1, 70), K=st.integers(1, 300), sa=st.booleans(), sb=st.booleans(),
       a_axis=st.sampled_from([0, 1]), b_axis=st.sampled_from([0, 1]), seed=st.integers(0, 2**32 - 1),
       threads=st.sampled_from([1, 2]))
def test_property_sweep_per_channel_two_tier(M, N, K, sa, sb, a_axis, b_axis, seed, threads):
    """Per-channel two-tier bits on either axis of either operand, random shapes."""
    rng = np.random.default_rng(seed)
    soniq.set_num_threads(threads)
    try:
        for isa in TEST_ISAS:
            with soniq.use_isa(isa):
                tiers_a = rng.choice(np.arange(1, 9), 2)
                tiers_b = rng.choice(np.arange(1, 9), 2)
                if a_axis == 1 and b_axis == 1:  # shared tier permutation: b's tiers follow a's
                    ka = rng.integers(0, 2, K)
                    bits_a, bits_b = tiers_a[ka], tiers_b[ka]
                else:
                    bits_a = tiers_a[rng.integers(0, 2, (M, K)[a_axis])]
                    bits_b = tiers_b[rng.integers(0, 2, (N, K)[b_axis])]
                a = random_values(rng, (M, K), bits_a, sa, a_axis)
                b = random_values(rng, (N, K), bits_b, sb, b_axis)
                if a_axis == 1 and b_axis == 1:
                    kl = soniq.KLayout.from_bits(bits_a, bits_b)
                    pa = ops.pack(a, bits_a, signed=sa, axis=1, k_layout=kl)
                    pb = ops.pack(b, bits_b, signed=sb, axis=1, k_layout=kl)
                elif a_axis == 1:
                    pa = ops.pack(a, bits_a, signed=sa, axis=1)
                    pb = ops.pack(b, bits_b, signed=sb, axis=b_axis, k_layout=pa)
                else:
                    pb = ops.pack(b, bits_b, signed=sb, axis=b_axis)
                    pa = ops.pack(a, bits_a, signed=sa, axis=a_axis, k_layout=pb)
                np.testing.assert_array_equal(ops.mpgemm(pa, pb), ref_matmul(a, b), err_msg=isa)
    finally:
        soniq.set_num_threads(soniq._native._C.default_num_threads())


def test_torch_in_torch_out_and_int64():
    rng = np.random.default_rng(7)
    a = torch.from_numpy(random_values(rng, (4, 300), 8, False)).to(torch.uint8)
    b = torch.from_numpy(random_values(rng, (6, 300), 8, True)).to(torch.int8)
    pa, pb = ops.pack(a, 8, signed=False), ops.pack(b, 8, signed=True)
    ref = a.long() @ b.long().T
    out = ops.mpgemm(pa, pb)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int32 and torch.equal(out.long(), ref)
    out64 = ops.mpgemm(pa, pb, out_dtype=torch.int64)
    assert out64.dtype == torch.int64 and torch.equal(out64, ref)


def test_large_k_exact_and_int32_limit():
    """K near the int32 limit for 4x4-bit unsigned: 15*15*K <= 2**31-1."""
    rng = np.random.default_rng(8)
    K = (2**31 - 1) // (15 * 15)
    a = np.full((1, K), 15, dtype=np.int64)
    b = np.full((2, K), 15, dtype=np.int64)
    b[1] = rng.integers(0, 16, K)
    pa, pb = ops.pack(a, 4, signed=False), ops.pack(b, 4, signed=False)
    assert ops.int32_limit(pa, pb) == 225 * K <= 2**31 - 1
    np.testing.assert_array_equal(ops.mpgemm(pa, pb), ref_matmul(a, b))
    a2 = np.full((1, K + 1), 15, dtype=np.int64)
    pa2, pb2 = ops.pack(a2, 4, signed=False), ops.pack(np.full((1, K + 1), 15), 4, signed=False)
    with pytest.raises(OverflowError, match="int64"):
        ops.mpgemm(pa2, pb2)
    assert int(ops.mpgemm(pa2, pb2, out_dtype=torch.int64)[0, 0]) == 225 * (K + 1)


def test_scales_give_float32(isa):
    rng = np.random.default_rng(9)
    M, N, K = 5, 9, 150
    a_bits = np.where(rng.random(K) < 0.5, 4, 8)
    a = random_values(rng, (M, K), a_bits, False, axis=1)
    w_bits = np.where(rng.random(N) < 0.25, 4, 2)
    w = random_values(rng, (N, K), w_bits, True, axis=0)
    sa_tier = {4: 0.5, 8: 0.03125}
    a_scale = np.array([sa_tier[b] for b in a_bits], dtype=np.float32)   # per K column, constant per tier
    w_scale = rng.uniform(0.01, 1, N).astype(np.float32)
    pa = ops.pack(a, a_bits, signed=False, axis=1, scale=a_scale)
    pw = ops.pack(w, w_bits, signed=True, axis=0, scale=w_scale, k_layout=pa)
    out = ops.mpgemm(pa, pw)
    assert out.dtype == np.float32
    ref = ((a * a_scale.astype(np.float64)) @ w.T.astype(np.float64)) * w_scale.astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    # integer accumulators are unaffected by the scales
    pa0 = ops.pack(a, a_bits, signed=False, axis=1)
    np.testing.assert_array_equal(ops.mpgemm(pa0, ops.pack(w, w_bits, signed=True, k_layout=pa0)),
                                  ref_matmul(a, w))


def test_per_row_scales_on_both_sides():
    rng = np.random.default_rng(10)
    a, b = random_values(rng, (3, 77), 3, True), random_values(rng, (4, 77), 5, True)
    sa, sb = rng.uniform(0.1, 2, 3), rng.uniform(0.1, 2, 4)
    out = ops.mpgemm(ops.pack(a, 3, signed=True, scale=sa), ops.pack(b, 5, signed=True, scale=sb))
    ref = ref_matmul(a, b) * sa.astype(np.float32).astype(np.float64)[:, None] * \
        sb.astype(np.float32).astype(np.float64)[None, :]
    np.testing.assert_allclose(out, ref.astype(np.float32), rtol=1e-6)


def test_results_do_not_depend_on_threads():
    rng = np.random.default_rng(11)
    a, b = random_values(rng, (40, 500), 2, True), random_values(rng, (300, 500), 3, False)
    pa, pb = ops.pack(a, 2, signed=True), ops.pack(b, 3, signed=False)
    outs = []
    for n in (1, 2, 3):
        soniq.set_num_threads(n)
        outs.append(ops.mpgemm(pa, pb))
    soniq.set_num_threads(soniq._native._C.default_num_threads())
    for o in outs:
        np.testing.assert_array_equal(o, ref_matmul(a, b))
