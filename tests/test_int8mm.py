"""The cuBLAS-INT8 route of the CUDA mpgemm (python/soniq/ops/_int8mm.py) is exact: its
orchestration -- shifted int8 codes, code-sum corrections, segment and row scales,
permutations -- run here on the CPU with the torch twin of the expansion kernel and
torch._int_mm, against ops.mpgemm (bitwise, float outputs included)."""
import numpy as np
import pytest
import torch

import soniq
from soniq import ops
from soniq.ops import _int8mm
from conftest import random_values


def run(pa, pb, out_dtype):
    da, ks, _ = pa.host_meta()
    out = torch.empty(pa.shape[0], pb.shape[0], dtype=out_dtype)
    return _int8mm.mpgemm_int8mm(pa.data, da, pa.sums, pa.row_perm, pa.signed, pb.data, pb.host_meta()[0], pb.sums,
                                 pb.row_perm, pb.signed, ks, pa.row_scale, pb.row_scale, pa.seg_scale,
                                 pb.seg_scale, out)


@pytest.mark.parametrize("wa", [1, 2, 5, 8])
@pytest.mark.parametrize("signed_a,signed_b", [(False, True), (True, True), (False, False)])
def test_bit_pairs(wa, signed_a, signed_b):
    rng = np.random.default_rng(wa)
    for wb in (1, 3, 4, 8):
        a = torch.from_numpy(random_values(rng, (19, 133), wa, signed_a))
        b = torch.from_numpy(random_values(rng, (21, 133), wb, signed_b))
        pa, pb = ops.pack(a, wa, signed=signed_a), ops.pack(b, wb, signed=signed_b)
        assert torch.equal(run(pa, pb, torch.int64), a @ b.T)
        assert torch.equal(run(pa, pb, torch.int32), ops.mpgemm(pa, pb))


@pytest.mark.parametrize("seed", range(4))
def test_two_tiers_and_scales(seed):
    rng = np.random.default_rng(seed)
    M, N, K = 37, 29, 300
    ka = rng.integers(0, 2, K)
    bits_a, bits_b = np.array([2, 8])[ka], np.array([4, 1])[ka]
    kl = soniq.KLayout.from_bits(bits_a, bits_b)
    a = torch.from_numpy(random_values(rng, (M, K), bits_a, True, axis=1))
    b = torch.from_numpy(random_values(rng, (N, K), bits_b, False, axis=1))
    seg = {2: 0.37, 8: 0.011}
    pa = ops.pack(a, bits_a, signed=True, axis=1, k_layout=kl,
                  scale=torch.tensor([seg[int(x)] for x in bits_a], dtype=torch.float32))
    pb = ops.pack(b, bits_b, signed=False, axis=1, k_layout=kl)
    want = ops.mpgemm(pa, pb)
    got = run(pa, pb, torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    # rows in two tiers on both operands, row scales
    bits_r = np.array([3, 6])[rng.integers(0, 2, M)]
    bits_w = np.array([1, 8])[rng.integers(0, 2, N)]
    a = torch.from_numpy(random_values(rng, (M, K), bits_r, True))
    b = torch.from_numpy(random_values(rng, (N, K), bits_w, True))
    pa = ops.pack(a, bits_r, signed=True, scale=torch.rand(M) + 0.5)
    pb = ops.pack(b, bits_w, signed=True, scale=torch.rand(N) + 0.5)
    want = ops.mpgemm(pa, pb)
    assert torch.equal(run(pa, pb, torch.float32).view(torch.int32), want.view(torch.int32))
    assert torch.equal(run(pa.with_scale(None), pb.with_scale(None), torch.int64), a @ b.T)


def test_odd_shapes():
    rng = np.random.default_rng(1)
    for M, N, K in [(1, 1, 1), (17, 3, 63), (40, 9, 65), (5, 70, 200)]:
        a = torch.from_numpy(random_values(rng, (M, K), 8, False))
        b = torch.from_numpy(random_values(rng, (N, K), 8, True))
        assert torch.equal(run(ops.pack(a, 8, signed=False), ops.pack(b, 8, signed=True), torch.int64), a @ b.T)


def test_expand_block_matches_unpack():
    rng = np.random.default_rng(3)
    codes = torch.from_numpy(rng.integers(0, 32, (7, 130)).astype(np.uint8))
    planes = ops._library.pack_block_torch(codes, 5, 3)
    e = _int8mm.expand_block(planes, 0, 5, 7, 130, 3, 32, 144)
    assert e.shape == (32, 144) and e.dtype == torch.int8
    assert torch.equal(e[:7, :130].to(torch.int16), codes.to(torch.int16) - 128)
    assert not bool(e[7:].any()) and not bool(e[:, 130:].any())
