"""pack / unpack round trips and the packed layout itself."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from soniq import PackedTensor, ops
from soniq.ops import _library as L
from conftest import random_values


@settings(max_examples=60, deadline=None)
@given(R=st.integers(1, 9), K=st.integers(1, 200), signed=st.booleans(), axis=st.sampled_from([0, 1]),
       per_channel=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_roundtrip_numpy(R, K, signed, axis, per_channel, seed):
    rng = np.random.default_rng(seed)
    n = (R, K)[axis]
    bits = rng.integers(1, 9, n) if per_channel else int(rng.integers(1, 9))
    x = random_values(rng, (R, K), bits, signed, axis)
    p = ops.pack(x, bits, signed=signed, axis=axis)
    y = ops.unpack(p)
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
def test_roundtrip_torch_keeps_dtype(dtype):
    rng = np.random.default_rng(0)
    signed = dtype != torch.uint8
    x = torch.from_numpy(random_values(rng, (5, 70), 3, signed)).to(dtype)
    y = ops.unpack(ops.pack(x, 3, signed=signed))
    assert isinstance(y, torch.Tensor) and y.dtype == dtype
    assert torch.equal(x, y)


def test_noncontiguous_and_strided_inputs():
    rng = np.random.default_rng(1)
    base = random_values(rng, (20, 300), 4, True)
    x = base[::2, 1::3]                      # numpy strided view
    np.testing.assert_array_equal(ops.unpack(ops.pack(x, 4, signed=True)), x)
    t = torch.from_numpy(base).t()           # torch transposed view
    assert torch.equal(ops.unpack(ops.pack(t, 4, signed=True)), t)
    raw = np.zeros(20 * 300 * 8 + 1, dtype=np.uint8)   # misaligned int64 buffer
    mis = np.frombuffer(raw.data, dtype=np.int64, count=20 * 300, offset=1).reshape(20, 300)
    mis[...] = base
    np.testing.assert_array_equal(ops.unpack(ops.pack(mis, 4, signed=True)), base)


def test_two_tiers_are_grouped_by_permutation():
    rng = np.random.default_rng(2)
    bits = np.array([4, 2, 2, 4, 2, 2, 2, 4])
    x = random_values(rng, (8, 100), bits, True, axis=0)
    p = ops.pack(x, bits, signed=True)
    assert p.desc.tolist() == [[0, 5, 2], [5, 3, 4]]           # low tier first
    assert p.row_perm.tolist() == [1, 2, 4, 5, 6, 0, 3, 7]      # stable within a tier
    assert p.bit_histogram() == {2: 5, 4: 3}
    a_bits = np.array([8, 4] * 50)
    a = ops.pack(random_values(rng, (3, 100), a_bits, False, axis=1), a_bits, signed=False, axis=1)
    assert a.ksegs.tolist() == [[50, 1], [50, 1]]
    assert a.k_perm[:50].tolist() == list(range(1, 100, 2))


def test_bit_planes_and_code_sums_match_definition():
    rng = np.random.default_rng(3)
    x = random_values(rng, (3, 130), 3, True)
    p = ops.pack(x, 3, signed=True)
    codes = x + 4                                               # signed 3-bit: u = v + 2^(b-1)
    words = p.data.numpy().view(np.uint64).reshape(3, 3, 3)     # [plane][row][kw]
    for pl in range(3):
        for r in range(3):
            for k in range(130):
                assert (int(words[pl, r, k // 64]) >> (k % 64)) & 1 == (codes[r, k] >> pl) & 1
    assert int(words[0, 0, 2]) >> 2 == 0                        # K padding is code 0
    np.testing.assert_array_equal(p.sums[:, 0].numpy(), codes.sum(1))


def test_signed_one_bit_encoding():
    x = np.array([[-1, 1, 1, -1, 1]])
    p = ops.pack(x, 1, signed=True)
    assert int(p.data[0]) == 0b10110                            # v = 2u - 1
    np.testing.assert_array_equal(ops.unpack(p), x)


def test_native_pack_matches_torch_reference():
    rng = np.random.default_rng(4)
    for bits in range(1, 9):
        for rows, klen in [(1, 1), (3, 64), (70, 65), (130, 333)]:
            codes = torch.from_numpy(rng.integers(0, 1 << bits, (rows, klen)).astype(np.uint8))
            kw = (klen + 63) // 64
            native = L.pack_block(codes, bits, kw)
            assert torch.equal(native, L.pack_block_torch(codes, bits, kw)), (bits, rows, klen)
            assert torch.equal(L.unpack_block(native, bits, rows, klen, kw), codes)
            assert torch.equal(L.unpack_block_torch(native, bits, rows, klen, kw), codes)


def test_packed_tensor_repr_and_properties():
    x = np.zeros((4, 100), dtype=np.int64)
    p = ops.pack(x, [2, 2, 4, 4], signed=False, scale=[1.0, 2.0, 3.0, 4.0])
    r = repr(p)
    for part in ("shape=(4, 100)", "per row", "2b: 2", "4b: 2", "signed=False", "scale=per row", "device=cpu"):
        assert part in r, r
    assert p.device == torch.device("cpu") and p.shape == (4, 100) and p.nbytes > 0
    assert torch.equal(p.row_scale, torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_state_dict_roundtrip():
    rng = np.random.default_rng(5)
    x = random_values(rng, (6, 90), [1, 3, 3, 8, 1, 2], True)
    p = ops.pack(x, [1, 3, 3, 8, 1, 2], signed=True, scale=np.linspace(0.1, 1, 6))
    q = PackedTensor.from_state_dict(p.state_dict(), p.metadata())
    assert torch.equal(ops.unpack(q), torch.from_numpy(x))
    assert torch.equal(q.scale, p.scale)
