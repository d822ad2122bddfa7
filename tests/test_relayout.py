"""mpgemm of operands packed in different K layouts: the side with a single K segment (one
width along K) is re-laid out in the other's layout, exactly; PackedTensor state is declared
by its constructor (what an ActPlan knows is passed in, not attached afterwards)."""
import numpy as np
import pytest
import torch

import soniq
from soniq import ops


@pytest.mark.parametrize("K", [1, 10, 130])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_single_segment_side_is_relaid_out_exactly(K, kind):
    rng = np.random.default_rng(K)
    a_bits = rng.choice([2, 8], K)
    x = rng.integers(0, 2 ** a_bits, (5, K))
    w_bits = rng.choice([1, 4], 7)
    w = np.stack([rng.choice([-1, 1], K) if b == 1 else rng.integers(-8, 8, K) for b in w_bits])
    if kind == "torch":
        x, w = torch.from_numpy(x), torch.from_numpy(w)
    a = ops.pack(x, a_bits, signed=False, axis=1)       # K permuted and cut by activation bits
    b = ops.pack(w, w_bits, signed=True, axis=0)        # K in its own order, one segment
    ref = np.asarray(x, dtype=np.int64) @ np.asarray(w, dtype=np.int64).T
    for out in (ops.mpgemm(a, b), ops.mpgemm(b, a).T):  # either side may be the single-segment one
        assert type(out) is (np.ndarray if kind == "numpy" else torch.Tensor)
        np.testing.assert_array_equal(np.asarray(out), ref)
    # with scales: the same float32 result as packing with k_layout= up front
    bs = ops.pack(w, w_bits, signed=True, axis=0, scale=rng.uniform(0.1, 1, 7))
    up_front = ops.pack(w, w_bits, signed=True, axis=0, scale=bs.scale, k_layout=a)
    assert np.array_equal(np.asarray(ops.mpgemm(a, bs)), np.asarray(ops.mpgemm(a, up_front)))


def test_packed_tensor_state_declared_by_constructor():
    x = torch.randn(3, 12)
    bits = torch.tensor([4, 8] * 6)
    made = ops.quantize_pack(x, torch.full((12,), 0.1), bits, signed=True)
    packed = ops.pack(torch.zeros(3, 12, dtype=torch.int64), bits, signed=True, axis=1)
    assert set(vars(made)) == set(vars(packed))
    moved = packed.to("cpu").with_scale(None)
    assert set(vars(moved)) == set(vars(packed))
