"""soniq.ops.quantize: native == torch reference, exact mode == torch.fake_quantize, Philox
known answers, noise determinism (threads, CPU vs CUDA), bad input."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import soniq
from soniq import ops
from soniq.ops._quantize import level_bounds, philox_bits_torch, philox_uniform_torch, quantize_reference

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def _ref(x, s, bits, signed, axis, noise, seed, values_only=False):
    lo, hi, al = (t.to(x.dtype) for t in level_bounds(bits.double(), signed))
    return quantize_reference(x, s.to(x.dtype), lo, hi, al, axis, noise, seed, values_only)


def test_philox_known_answers():
    # Random123 KAT for philox4x32_10: counter 0, key 0 -> words of block 0
    got = philox_bits_torch(4, 0).tolist()
    assert got == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert torch.equal(ops.philox_uniform(1000, 77), philox_uniform_torch(1000, 77))
    assert torch.equal(ops.philox_uniform(37, 2**40 + 3, dtype=torch.float64),
                       philox_uniform_torch(37, 2**40 + 3, torch.float64))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_exact_equals_torch_fake_quantize(signed, bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 6, 5, 3, generator=g) * 3
    x[0, 0, 0, 0] = 0.5  # ties go to even, as torch does
    s = torch.rand(6, generator=g) * 0.5 + 0.01
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    ref = torch.fake_quantize_per_channel_affine(x, s, torch.zeros(6, dtype=torch.int32), 1, lo, hi)
    assert torch.equal(ops.quantize(x, s, bits, signed=signed, axis=1), ref)


def test_one_bit_signed_and_values_only():
    x = torch.tensor([[-3.0, -0.2, 0.2, 5.0]])
    v = ops.quantize(x, 1.0, 1, signed=True, axis=0, values_only=True)
    assert v.tolist() == [[-1.0, -1.0, 1.0, 1.0]]
    v = ops.quantize(x, 0.5, 2, signed=False, axis=0, values_only=True)
    assert v.tolist() == [[0.0, 0.0, 0.0, 3.0]]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 70), st.booleans(), st.sampled_from([0, 1]),
       st.integers(0, 2**62), st.sampled_from([torch.float32, torch.float64]))
def test_native_equals_reference(outer, C, inner, signed, noise, seed, dtype):
    g = torch.Generator().manual_seed(seed % 1000)
    x = (torch.randn(outer, C, inner, generator=g) * 4).to(dtype)
    s = (torch.rand(C, generator=g) + 0.05).to(dtype)
    if noise:
        bits = 1 + torch.rand(C, generator=g, dtype=torch.float64) * 7
    else:
        bits = torch.randint(1 if signed else 1, 9, (C,), generator=g).double()
    mode = "uniform" if noise else "none"
    for vo in (False, True):
        got = ops.quantize(x, s, bits, signed=signed, noise=mode, seed=seed, axis=1, values_only=vo)
        assert torch.equal(got, _ref(x, s, bits, signed, 1, noise, seed, vo))


def test_noise_is_one_step_and_deterministic_across_threads():
    x = torch.randn(64, 300) * 0.01  # far from the clamp
    s = torch.full((64,), 0.5)
    n0 = soniq.get_num_threads()
    try:
        soniq.set_num_threads(1)
        a = ops.quantize(x, s, 8, signed=True, noise="uniform", seed=9)
        soniq.set_num_threads(2)
        b = ops.quantize(x, s, 8, signed=True, noise="uniform", seed=9)
    finally:
        soniq.set_num_threads(n0)
    assert torch.equal(a, b)
    d = (a - x) / 0.5
    assert d.min() >= -0.5 and d.max() < 0.5 and abs(float(d.mean())) < 0.02
    assert not torch.equal(a, ops.quantize(x, s, 8, signed=True, noise="uniform", seed=10))
    torch.manual_seed(3)
    c = ops.quantize(x, s, 8, signed=True, noise="uniform")
    torch.manual_seed(3)
    assert torch.equal(c, ops.quantize(x, s, 8, signed=True, noise="uniform"))


def test_numpy_in_numpy_out():
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    out = ops.quantize(x, np.array([0.5, 0.25, 1.0]), 3, signed=True, axis=0)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, ops.quantize(torch.from_numpy(x), torch.tensor([0.5, 0.25, 1.0]), 3,
                                                    signed=True, axis=0).numpy())


@pytest.mark.parametrize("kwargs, match", [
    (dict(scale=0.0), "scales must be finite and > 0"),
    (dict(scale=float("nan")), "scales must be finite"),
    (dict(scale=1e300), "scale = 1e\\+300 cannot be represented as torch.float32"),  # a fuzzer finding
    (dict(bits=9), "bit widths must be"),
    (dict(bits=2.5), "integers in 1..8 in exact mode"),
    (dict(noise="gauss"), "noise must be one of"),
    (dict(axis=3), "axis must be"),
    (dict(scale=torch.ones(5)), "one per channel"),
])
def test_bad_input(kwargs, match):
    args = dict(scale=0.1, bits=4, signed=True, axis=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ops.quantize(torch.randn(3, 4), args.pop("scale"), args.pop("bits"), **args)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.quantize(torch.ones(3, dtype=torch.int32), 1.0, 4, signed=True)


def test_opcheck():
    x = torch.randn(3, 4, 5)
    vec = [torch.rand(4) + 0.1, torch.full((4,), -8.0), torch.full((4,), 7.0), torch.ones(4)]
    torch.library.opcheck(torch.ops.soniq.quantize_raw.default, (x, *vec, 1, 1, 123, False))


@CUDA
@pytest.mark.parametrize("noise", ["none", "uniform"])
def test_cuda_equals_cpu(noise):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 33, 17, generator=g) * 3
    s = torch.rand(33, generator=g) + 0.05
    bits = torch.randint(1, 9, (33,), generator=g).double()
    if noise == "uniform":
        bits = bits - torch.rand(33, generator=g, dtype=torch.float64) * 0.9
    for signed in (False, True):
        cpu = ops.quantize(x, s, bits, signed=signed, noise=noise, seed=42, axis=1)
        gpu = ops.quantize(x.cuda(), s.cuda(), bits.cuda(), signed=signed, noise=noise, seed=42, axis=1)
        assert torch.equal(cpu, gpu.cpu())
    assert torch.equal(ops.philox_uniform(999, 5), ops.philox_uniform(999, 5, device="cuda").cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_rounding_edges(dtype):
    # ties, values far outside the range, infinities: same as the torch reference
    x = torch.cat([torch.arange(-300, 300, dtype=dtype) + 0.5, torch.tensor([1e30, -1e30, 3e9], dtype=dtype),
                   torch.tensor([float("inf"), float("-inf")], dtype=dtype)]).reshape(1, -1)
    for signed in (False, True):
        for b in (1, 2, 5, 8):
            got = ops.quantize(x, 1.0, b, signed=signed, axis=0)
            assert torch.equal(got, _ref(x, torch.ones(1, dtype=dtype), torch.tensor([float(b)]), signed, 0, 0, 0))


@pytest.mark.parametrize("shape,axis", [((0, 5), 0), ((3, 0), 0), ((3, 0), 1), ((0,), 0), ((2, 0, 4), 1)])
def test_empty_tensors(shape, axis):
    """Empty in, empty out (a fuzzer once found a division by zero here)."""
    x = torch.empty(shape)
    C = shape[axis]
    for noise in ("none", "uniform"):
        out = ops.quantize(x, torch.ones(C) if C else 1.0, 4, signed=True, axis=axis, noise=noise, seed=1)
        assert out.shape == x.shape

