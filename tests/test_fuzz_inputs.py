"""Malformed input (issue 7.2, property-based half; .ci/fuzz_ops.py is the native fuzzer).

Every case ends in a Python exception naming the problem or in a correct result: never a
crash, hang or out-of-bounds access (the sanitizer build in .ci/reliability.sh runs this
file too). Covered: shapes, strides, dtypes, bit arrays, scales (0, negative, NaN, inf),
huge dimensions, out_dtype, mismatched operands, corrupted PackedTensor state dicts, and
(once merged) the quantizer and corrupted saved files.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import soniq
from soniq import _op_kernels, ops

CLEAN = (TypeError, ValueError, OverflowError, MemoryError)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def value_range(bits, signed):
    if not signed:
        return 0, 2**bits - 1
    return (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def valid_matrix(rng, R, K, bits, signed, axis=0):
    """A matrix whose channels fit `bits` (int, or per-channel along `axis`)."""
    per = np.broadcast_to(np.asarray(bits), ((R, K)[axis],))
    lo, hi = np.vectorize(lambda b: value_range(int(b), signed)[0])(per), \
        np.vectorize(lambda b: value_range(int(b), signed)[1])(per)
    shape = (-1, 1) if axis == 0 else (1, -1)
    v = rng.integers(lo.reshape(shape), hi.reshape(shape) + 1, size=(R, K))
    if signed:  # signed 1-bit holds {-1, +1}
        one = (per == 1).reshape(shape) & (v == 0)
        v = np.where(one, 1, v)
    return v


def exact(a, b):
    return np.asarray(a, dtype=np.int64) @ np.asarray(b, dtype=np.int64).T


# ---- arbitrary values / bits / scales / axis -------------------------------------------------
weird_arrays = st.one_of(
    st.builds(lambda s, d: np.zeros(s, dtype=d),
              st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple),
              st.sampled_from(["int8", "uint8", "int32", "int64", "uint64", "float32", "float64",
                               "bool", "complex64", "U3", "object"])),
    st.builds(lambda s: torch.zeros(s, dtype=torch.float16), st.lists(st.integers(0, 3), max_size=3).map(tuple)),
    st.builds(lambda s: torch.ones(s, dtype=torch.bool), st.lists(st.integers(0, 3), max_size=3).map(tuple)),
    st.just(np.array(5)), st.just([[1, 2], [3, 4]]), st.just(None), st.just("values"), st.just(3.5),
    st.just(np.full((2, 3), 2**63 + 5, dtype=np.uint64)),
)
weird_bits = st.one_of(
    st.integers(-3, 12), st.just(True), st.floats(allow_nan=True), st.just(None), st.just("4"),
    st.lists(st.integers(-2, 10), max_size=6), st.just(np.zeros((2, 2), dtype=np.int64)),
    st.just(np.array([2.0, 4.0])), st.just(torch.tensor([1, 9])), st.just(np.array([2**40, 2], dtype=np.uint64)),
)
weird_scales = st.one_of(
    st.none(), st.sampled_from([0.0, -0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-45, 1e38, 3e38,
                                1e300, 5e-324, 2**200]),
    st.just(np.array([1e300, 1.0])), st.just(torch.tensor([1e300], dtype=torch.float64)),
    st.just(np.array([1.0, float("nan")])), st.just(torch.tensor([[1.0]])), st.just("1.0"), st.just(True),
    st.just(torch.tensor(float("inf"))), st.just(np.array([], dtype=np.float32)),
)


@FUZZ
@given(values=weird_arrays, bits=weird_bits, scale=weird_scales,
       signed=st.sampled_from([True, False, 1, None]), axis=st.sampled_from([0, 1, 2, -1, True]))
def test_pack_rejects_malformed_arguments_cleanly(values, bits, scale, signed, axis):
    try:
        p = ops.pack(values, bits, signed=signed, axis=axis, scale=scale)
    except CLEAN:
        return
    # accepted: it must have been a valid call, and the round trip is exact
    np.testing.assert_array_equal(np.asarray(ops.unpack(p)), np.asarray(values))


@FUZZ
@given(data=st.data(), R=st.integers(1, 9), K=st.integers(1, 150), signed=st.booleans(),
       axis=st.sampled_from([0, 1]))
def test_pack_any_strides_round_trip(data, R, K, signed, axis):
    """Transposed, sliced, negative-stride and broadcast inputs pack like their copies."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    bits = data.draw(st.one_of(st.integers(1, 8), st.lists(st.integers(1, 8), min_size=(R, K)[axis],
                                                            max_size=(R, K)[axis]).map(np.array)))
    v = valid_matrix(rng, R, K, bits, signed, axis)
    view = data.draw(st.sampled_from(["T", "step", "neg", "bcast", "torch_T", "fortran"]))
    if view == "T":
        x = np.ascontiguousarray(v.T).T
    elif view == "step":
        x = np.repeat(v, 3, axis=1)[:, ::3]
    elif view == "neg":
        x = v[::-1, ::-1].copy()[::-1, ::-1]
    elif view == "bcast":
        x = np.broadcast_to(v[:1], v.shape) if axis == 1 or np.ndim(bits) == 0 else v
        v = np.array(x)
    elif view == "torch_T":
        x = torch.from_numpy(v.T.copy()).t()
    else:
        x = np.asfortranarray(v).astype(np.int16)
    p = ops.pack(x, bits, signed=signed, axis=axis)
    np.testing.assert_array_equal(np.asarray(ops.unpack(p)), v)


@pytest.mark.parametrize("make", [
    lambda: np.broadcast_to(np.int8(1), (1, 2**47)),
    lambda: np.broadcast_to(np.uint64(1), (2**20, 2**27)),
    lambda: torch.zeros(1, 1, dtype=torch.int8).expand(1, 2**47),
    lambda: torch.zeros(1, 1, dtype=torch.int64).expand(2**40, 2**7),
])
def test_huge_dimensions_fail_fast_with_memory_error(make):
    with pytest.raises(MemoryError):
        ops.pack(make(), 1, signed=False)


def test_output_allocation_failure_is_memory_error(monkeypatch):
    """An [M, N] output too big for memory is a MemoryError (simulated: a real one could
    succeed lazily under overcommit and get the test process OOM-killed)."""
    def fail(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(torch.ops.soniq, "mpgemm_packed", fail)
    # the eager path calls the CPU kernel from the op's kernel table, skipping the dispatcher
    monkeypatch.setitem(_op_kernels._TABLE[ops._library.mpgemm_packed], "cpu", fail)
    p = ops.pack(np.ones((3, 5), dtype=np.int8), 1, signed=False)
    with pytest.raises(MemoryError, match="mpgemm"):
        ops.mpgemm(p, p)


def test_zero_and_empty_dimensions_rejected():
    for shape in [(0, 5), (5, 0), (0, 0)]:
        with pytest.raises(ValueError, match="non-empty"):
            ops.pack(np.zeros(shape, dtype=np.int64), 2, signed=False)


@FUZZ
@given(scale=weird_scales, R=st.integers(1, 4), K=st.integers(1, 70), axis=st.sampled_from([0, 1]))
def test_bad_scales_are_rejected(scale, R, K, axis):
    v = np.zeros((R, K), dtype=np.int64)
    try:
        p = ops.pack(v, 2, signed=False, axis=axis, scale=scale)
    except CLEAN as e:
        assert "scale" in str(e)
        return
    assert p.scale is None or bool((p.scale > 0).all() and torch.isfinite(p.scale).all())


# ---- mpgemm with mismatched or malformed operands --------------------------------------------
@FUZZ
@given(data=st.data())
def test_mpgemm_mismatches_raise_or_are_exact(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    M, N = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    Ka, Kb = data.draw(st.integers(1, 130)), data.draw(st.integers(1, 130))
    sa, sb = data.draw(st.booleans()), data.draw(st.booleans())
    ba = data.draw(st.one_of(st.integers(1, 8), st.lists(st.integers(1, 8), min_size=Ka, max_size=Ka).map(np.array)))
    bb = data.draw(st.integers(1, 8))
    a = valid_matrix(rng, M, Ka, ba, sa, axis=1)
    b = valid_matrix(rng, N, Kb, bb, sb, axis=0)
    pa = ops.pack(a, ba, signed=sa, axis=1)
    share = data.draw(st.booleans()) and Ka == Kb
    pb = ops.pack(b, bb, signed=sb, k_layout=pa if share else None)
    out_dtype = data.draw(st.sampled_from([None, torch.int32, torch.int64, torch.float32, torch.int16,
                                           torch.float64, "int32", np.int64]))
    try:
        out = ops.mpgemm(pa, pb, out_dtype=out_dtype)
    except CLEAN:
        return
    np.testing.assert_array_equal(np.asarray(out, dtype=np.int64), exact(a, b))


@pytest.mark.parametrize("bad", [None, np.zeros((2, 2)), torch.zeros(2, 2, dtype=torch.int64), "packed", 3])
def test_mpgemm_non_packed_operands(bad):
    p = ops.pack(np.ones((2, 2), dtype=np.int64), 1, signed=False)
    for args in ((bad, p), (p, bad)):
        with pytest.raises(TypeError, match="PackedTensor"):
            ops.mpgemm(*args)


def test_unpack_non_packed():
    with pytest.raises(TypeError):
        ops.unpack(np.zeros((2, 2)))


# ---- corrupted PackedTensor state (what a damaged file gives from_state_dict) -----------------
def _fresh(seed, axis):
    rng = np.random.default_rng(seed)
    R, K = int(rng.integers(1, 9)), int(rng.integers(1, 200))
    bits = rng.choice([1, 2, 4, 8], size=(R, K)[axis])
    signed = bool(rng.integers(0, 2))
    v = valid_matrix(rng, R, K, bits, signed, axis)
    scale = None
    if rng.integers(0, 2):
        per = {int(b): float(rng.uniform(0.1, 2)) for b in np.unique(bits)}
        scale = np.array([per[int(b)] for b in bits], dtype=np.float32)
    return ops.pack(v, bits, signed=signed, axis=axis, scale=scale)


def _corrupt(draw, p):
    sd = {k: v.clone() for k, v in p.state_dict().items()}
    meta = dict(p.metadata())
    what = draw(st.sampled_from(["value", "bitflip", "dtype", "shape", "drop", "extra", "meta",
                                 "noncontig", "swap"]))
    keys = sorted(sd)
    key = draw(st.sampled_from(keys))
    t = sd[key]
    if what == "value" and t.numel():
        i = draw(st.integers(0, t.numel() - 1))
        val = draw(st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([0, 1, -1, 8, 9, 64, 2**31]),
                             st.floats(allow_nan=True, allow_infinity=True, width=32)))
        try:
            t.view(-1)[i] = val
        except (RuntimeError, OverflowError, TypeError):
            pass
    elif what == "bitflip" and t.numel() and t.dtype == torch.int64:
        i, b = draw(st.integers(0, t.numel() - 1)), draw(st.integers(0, 63))
        t.view(-1)[i] ^= torch.tensor(1, dtype=torch.int64) << b
    elif what == "dtype":
        sd[key] = t.to(draw(st.sampled_from([torch.int32, torch.float64, torch.uint8, torch.float32, torch.int64])))
    elif what == "shape":
        n = draw(st.integers(-3, 3))
        flat = t.reshape(-1)
        sd[key] = flat[:max(0, flat.numel() + n)] if n < 0 else torch.cat([flat, flat[:n]])
        if draw(st.booleans()) and sd[key].numel():
            sd[key] = sd[key].reshape(1, -1)
    elif what == "drop":
        del sd[key]
    elif what == "extra":
        sd["scale"] = torch.rand(draw(st.integers(0, 10)))
    elif what == "meta":
        field = draw(st.sampled_from(["shape", "axis", "signed", "dtype", "layout"]))
        meta[field] = draw(st.sampled_from([None, -1, 0, 1, 2, [1], [0, 5], [2**40, 2**40], "int64",
                                            "float32", "load", "bitplanes-v0", True, 1.5]))
    elif what == "noncontig" and t.numel():
        sd[key] = torch.stack([t.reshape(-1), t.reshape(-1)], 1)[:, 0].reshape(t.shape) if t.dim() <= 1 else t.t()
    elif what == "swap" and t.dim() == 1 and t.numel() >= 2:
        i, j = draw(st.integers(0, t.numel() - 1)), draw(st.integers(0, t.numel() - 1))
        t[i], t[j] = t[j].clone(), t[i].clone()
    return sd, meta


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 2**32 - 1), axis=st.sampled_from([0, 1]))
def test_corrupted_state_dict_is_rejected_or_consistent(data, seed, axis):
    p = _fresh(seed, axis)
    sd, meta = _corrupt(data.draw, p)
    try:
        q = soniq.PackedTensor.from_state_dict(sd, meta)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    # accepted: a different but self-consistent tensor (e.g. two equal-width rows swapped);
    # every op on it agrees with its own unpacked values, exactly
    v = np.asarray(ops.unpack(q))
    assert v.shape == q.shape
    other = ops.pack(np.ones((2, q.shape[1]), dtype=np.int64), 1, signed=False, k_layout=q)
    out = ops.mpgemm(q, other, out_dtype=torch.int64) if q.scale is None else ops.mpgemm(q, other)
    if q.scale is None:
        np.testing.assert_array_equal(np.asarray(out), exact(v, np.ones((2, q.shape[1]))))


@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_any_single_bit_flip_in_data_is_detected(data, seed):
    """Bit flips inside K change a code sum, bit flips in the padding break the zero-padding
    rule: either way the corrupted tensor is refused."""
    p = _fresh(seed, data.draw(st.sampled_from([0, 1])))
    sd = {k: v.clone() for k, v in p.state_dict().items()}
    i, b = data.draw(st.integers(0, sd["data"].numel() - 1)), data.draw(st.integers(0, 63))
    sd["data"].view(-1)[i] ^= torch.tensor(1, dtype=torch.int64) << b
    with pytest.raises(ValueError, match="invalid packed tensor"):
        soniq.PackedTensor.from_state_dict(sd, p.metadata())


def test_valid_state_dict_round_trips():
    for seed in range(5):
        for axis in (0, 1):
            p = _fresh(seed, axis)
            q = soniq.PackedTensor.from_state_dict(p.state_dict(), p.metadata())
            np.testing.assert_array_equal(np.asarray(ops.unpack(q)), np.asarray(ops.unpack(p)))


# ---- quantizer (issue 8; runs once merged) -----------------------------------------------------
@FUZZ
@given(x=st.one_of(st.just(torch.tensor([[float("nan"), 1.0]])), st.just(torch.tensor([[float("inf"), -1e30]]))),
       scale=weird_scales, bits=weird_bits, signed=st.sampled_from([True, False, None]),
       noise=st.sampled_from(["none", "uniform", "gaussian", None, 3]),
       seed=st.sampled_from([None, 0, -1, 2**64, 1.5, "7"]))
def test_quantize_malformed_arguments(x, scale, bits, signed, noise, seed):
    try:
        q = ops.quantize(x, scale, bits, signed=signed, noise=noise, seed=seed)
    except CLEAN:
        return
    for t in (q if isinstance(q, (tuple, list)) else (q,)):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            assert bool(torch.isfinite(t).all()), "quantize returned non-finite values"


# ---- corrupted saved files -----------------------------------------
def _small_saved_model(path):
    """Saves the smallest model the save/load API takes; returns it."""
    m = torch.nn.Sequential(torch.nn.Linear(16, 8))
    cfg = soniq.qat.QATConfig(w_palette=(2, 4), a_palette=(4, 8), w_bits_target=3.0, a_bits_target=6.0)
    m = soniq.qat.prepare(m, cfg)
    m(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))  # calibrate activations
    soniq.qat.freeze_precision(m)
    m = soniq.convert(m)
    soniq.save(m, path)
    return m


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_saved_file_is_rejected_or_loads(tmp_path, data):
    path = tmp_path / "m.safetensors"
    if not path.exists():
        _small_saved_model(path)
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "header", "zero", "append"]))
    if how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "header":  # the 8-byte little-endian header length of safetensors
        raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    elif how == "zero":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i:i + 64] = bytes(len(raw[i:i + 64]))
    else:
        raw += data.draw(st.binary(min_size=1, max_size=64))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    try:
        soniq.load(bad)
    except Exception as e:  # a clean Python exception (safetensors raises its own types)
        assert not isinstance(e, (SystemError, MemoryError)), repr(e)
