"""ops.quantize_pack (fused activation quantize + pack) equals the two-step path exactly:
ops.pack(ops.quantize(x, ..., values_only=True).to(int64), ..., axis=1) -- planes, sums,
permutation, unpacked values and mpgemm results -- on every ISA path and thread count."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import soniq
from soniq import KLayout, ops
from soniq._native import _C
from soniq._packed_nn import PackedLinear
from conftest import edge_values

BUFFERS = ("data", "desc", "sums", "row_perm", "k_perm", "ksegs", "bits", "scale")


@pytest.fixture(params=[1, 2])
def threads(request):
    n = soniq.get_num_threads()
    soniq.set_num_threads(request.param)
    yield request.param
    soniq.set_num_threads(n)


def unfused(x, scale, bits, signed, k_layout=None):
    xt = torch.as_tensor(x)
    sv = torch.as_tensor(np.broadcast_to(np.asarray(scale, np.float32), (xt.shape[1],)).copy())
    bv = torch.as_tensor(np.broadcast_to(np.asarray(bits), (xt.shape[1],)).astype(np.int64))
    v = ops.quantize(xt.contiguous(), sv, bv.double(), signed=signed, axis=1, values_only=True).to(torch.int64)
    vin = v.numpy() if isinstance(x, np.ndarray) else v  # numpy in, numpy PackedTensor
    return ops.pack(vin, bv, signed=signed, axis=1, scale=sv, k_layout=k_layout), v


def assert_same(p, q, v=None):
    assert (p.shape, p.axis, p.signed, p.dtype, p.kind) == (q.shape, q.axis, q.signed, q.dtype, q.kind)
    for k in BUFFERS:
        a, b = getattr(p, k), getattr(q, k)
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert torch.equal(p.seg_scale, q.seg_scale)
    if v is not None:
        assert torch.equal(torch.as_tensor(ops.unpack(p)), v)


def tier_scales(bits, rng):
    """One power-of-two scale per bit width (constant within a K segment; exact ties)."""
    per = {int(b): float(2.0 ** rng.integers(-6, 3)) for b in np.unique(bits)}
    return np.array([per[int(b)] for b in np.broadcast_to(bits, np.shape(bits))], np.float32)


def activations(rng, M, K, scale, bits, signed):
    """Floats hitting every level, exact half-way ties, values that clamp and +-inf."""
    b = np.broadcast_to(np.asarray(bits), (K,))
    lo = np.where(signed, -(2.0 ** (b - 1)), 0.0)
    hi = np.where(signed & (b == 1), 1.0, np.where(signed, 2.0 ** (b - 1) - 1, 2.0 ** b - 1))
    t = rng.uniform(lo - 3, hi + 3, size=(M, K))
    ties = rng.random((M, K)) < 0.3
    t = np.where(ties, np.floor(t) + 0.5, t)
    x = (t * np.broadcast_to(scale, (K,))).astype(np.float32)
    if M * K >= 8:
        x.flat[rng.choice(M * K, 3, replace=False)] = [np.inf, -np.inf, 1e30]
    return x


SHAPES = [(1, 1), (1, 130), (5, 63), (3, 64), (2, 200)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_every_width_every_isa(isa, bits, signed, threads):
    rng = np.random.default_rng(bits * 2 + signed)
    for M, K in SHAPES:
        scale = float(2.0 ** rng.integers(-4, 2))
        x = torch.from_numpy(activations(rng, M, K, scale, bits, signed))
        q, v = unfused(x, scale, bits, signed)
        assert_same(ops.quantize_pack(x, scale, bits, signed=signed), q, v)


@pytest.mark.parametrize("palette", [(2, 8), (1, 4), (1, 2, 3, 4, 5, 6, 7, 8)])
@pytest.mark.parametrize("signed", [False, True])
def test_multi_tier_layouts(isa, palette, signed, threads):
    rng = np.random.default_rng(len(palette) + signed)
    for M, K in [(1, 300), (4, 77), (40, 1000)]:  # the last one spans several thread-pool tasks
        bits = rng.choice(palette, size=K)
        scale = tier_scales(bits, rng)
        x = torch.from_numpy(activations(rng, M, K, scale, bits, signed))
        q, v = unfused(x, scale, bits, signed)
        assert_same(ops.quantize_pack(x, scale, bits, signed=signed), q, v)


def test_layout_shared_with_weights_and_mpgemm(isa, threads):
    rng = np.random.default_rng(7)
    M, N, K = 3, 6, 150
    a_bits, w_bits_k = rng.choice([2, 8], size=K), rng.choice([1, 4], size=K)
    kl = KLayout.from_bits(a_bits, w_bits_k)
    a_scale = tier_scales(a_bits, rng)
    # per-K-column weight bits: the weights are packed along K as well (axis=1)
    w = np.stack([rng.integers(-(2 ** (w_bits_k - 1)), 2 ** (w_bits_k - 1)) for _ in range(N)])
    w = np.where(w_bits_k == 1, np.where(w < 0, -1, 1), w)
    pw = ops.pack(torch.from_numpy(w), w_bits_k, signed=True, axis=1, k_layout=kl)
    for signed in (False, True):
        x = torch.from_numpy(activations(rng, M, K, a_scale, a_bits, signed))
        q, v = unfused(x, a_scale, a_bits, signed, k_layout=kl)
        p = ops.quantize_pack(x, a_scale, a_bits, signed=signed, k_layout=kl)
        assert_same(p, q, v)
        assert len(p.ksegs) == 4 and p.k_layout.same_as(pw.k_layout)
        exact = ops.mpgemm(p.with_scale(None), pw, out_dtype=torch.int64)
        assert torch.equal(exact, v @ torch.from_numpy(w).T)
        assert torch.equal(ops.mpgemm(p, pw), ops.mpgemm(q, pw))


def test_k_layout_from_packed_tensor_and_row_weights(isa):
    rng = np.random.default_rng(8)
    K = 90
    a_bits = rng.choice([4, 8], size=K)
    a_scale = tier_scales(a_bits, rng)
    w_bits = np.array([1, 2, 4, 8, 3])
    w = np.stack([rng.integers(0, 2 ** b, size=K) for b in w_bits])
    pw = ops.pack(w, w_bits, signed=False, k_layout=KLayout.from_bits(a_bits), scale=np.linspace(0.5, 1, 5))
    x = activations(rng, 1, K, a_scale, a_bits, False)
    p = ops.quantize_pack(x, a_scale, a_bits, signed=False, k_layout=pw)
    q, v = unfused(x, a_scale, a_bits, False, k_layout=pw)
    assert_same(p, q, v)
    assert np.array_equal(ops.mpgemm(p, pw), ops.mpgemm(q, pw))  # numpy in, numpy out


def test_non_contiguous_inputs(isa):
    rng = np.random.default_rng(9)
    K = 70
    bits = rng.choice([2, 8], size=K)
    scale = tier_scales(bits, rng)
    wide = torch.from_numpy(activations(rng, 6, 3 * K, np.tile(scale, 3), np.tile(bits, 3), True))
    views = {"column stride 2": wide[:, ::3][:, :K], "row stride > K": wide[:, K:2 * K],
             "transposed": wide[:, :K].t().contiguous().t(), "rows broadcast": wide[:1, :K].expand(4, K),
             "every other row": wide[::2, :K]}
    for name, x in views.items():
        q, v = unfused(x.contiguous(), scale, bits, True)
        assert_same(ops.quantize_pack(x, scale, bits, signed=True), q, v), name
    xn = wide.numpy()[::-1, 2 * K:][:, ::-1]  # negative strides: copied
    q, v = unfused(np.ascontiguousarray(xn), scale, bits, True)
    assert_same(ops.quantize_pack(xn, scale, bits, signed=True), q, v)


def test_clamping_and_signed_one_bit():
    x = torch.tensor([[-np.inf, -1e30, -3.0, -1.0, -0.0, 0.0, 0.5, 1.0, 1.5, 2.5, 1e30, np.inf]], dtype=torch.float32)
    p = ops.quantize_pack(x, 1.0, 1, signed=True)
    assert ops.unpack(p).tolist() == [[-1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1]]
    for bits in (1, 3, 8):
        for signed in (False, True):
            q, v = unfused(x, 0.5, bits, signed)
            assert_same(ops.quantize_pack(x, 0.5, bits, signed=signed), q, v)


def test_nan_raises_naming_position(isa):
    x = torch.zeros(3, 100)
    x[2, 41] = float("nan")
    with pytest.raises(ValueError, match=r"x\[2, 41\] is NaN"):
        ops.quantize_pack(x, 0.1, np.where(np.arange(100) % 2 == 0, 2, 8), signed=False)


# ---- noise mode: stochastic rounding with ops.quantize's Philox draws ----------------------
def noisy_unfused(x, scale, bits, signed, seed, k_layout=None):
    """ops.quantize(noise="uniform")'s noisy values, rounded by the exact quantizer at scale 1,
    packed: what quantize_pack(noise="uniform", seed=seed) must equal."""
    xt = torch.as_tensor(x).contiguous()
    sv = torch.as_tensor(np.broadcast_to(np.asarray(scale, np.float32), (xt.shape[1],)).copy())
    bv = torch.as_tensor(np.broadcast_to(np.asarray(bits), (xt.shape[1],)).astype(np.int64))
    noisy = ops.quantize(xt, sv, bv.double(), signed=signed, noise="uniform", seed=seed, axis=1, values_only=True)
    v = ops.quantize(noisy, 1.0, bv.double(), signed=signed, axis=1, values_only=True).to(torch.int64)
    return ops.pack(v, bv, signed=signed, axis=1, scale=sv, k_layout=k_layout), v


@pytest.mark.parametrize("signed", [False, True])
def test_noise_equals_rounded_noisy_quantize(isa, signed, threads):
    rng = np.random.default_rng(20 + signed)
    for palette in [(1,), (2, 8), (1, 2, 3, 4, 5, 6, 7, 8)]:
        for M, K in [(1, 1), (1, 130), (5, 63), (40, 500)]:
            bits = rng.choice(palette, size=K)
            scale = tier_scales(bits, rng)
            x = torch.from_numpy(activations(rng, M, K, scale, bits, signed))
            seed = int(rng.integers(0, 2**63))
            kl = KLayout.from_bits(bits, rng.choice([1, 4], size=K))  # gathered segments
            q, v = noisy_unfused(x, scale, bits, signed, seed, k_layout=kl)
            p = ops.quantize_pack(x, scale, bits, signed=signed, k_layout=kl, noise="uniform", seed=seed)
            assert_same(p, q, v)


def test_noise_strided_rows_use_the_flat_index_of_x():
    """The draw of x[r, k] is the one ops.quantize takes for flat index r * K + k, whatever
    x's strides (a strided view gives what its contiguous copy gives)."""
    wide = torch.randn(8, 300)
    x = wide[::2, 7:207]
    p = ops.quantize_pack(x, 0.2, 3, signed=True, noise="uniform", seed=5)
    q, v = noisy_unfused(x.contiguous(), 0.2, 3, True, 5)
    assert_same(p, q, v)


def test_noise_is_seeded_and_unbiased():
    x = torch.full((64, 1000), 0.3)  # t = 0.3 / 0.5 = 0.6 steps: codes 0 or 1, mean 0.6
    run = lambda seed: ops.unpack(ops.quantize_pack(x, 0.5, 4, signed=False, noise="uniform", seed=seed))  # noqa: E731
    a, b = run(1), run(2)
    assert torch.equal(a, run(1)) and not torch.equal(a, b)
    assert set(a.unique().tolist()) == {0, 1}
    assert abs(a.double().mean().item() - 0.6) < 0.01  # 64000 draws: sd 0.002
    assert torch.equal(ops.unpack(ops.quantize_pack(x, 0.5, 4, signed=False)), torch.ones_like(a))  # nearest
    torch.manual_seed(3)
    c = ops.unpack(ops.quantize_pack(x, 0.5, 4, signed=False, noise="uniform"))
    torch.manual_seed(3)
    assert torch.equal(c, ops.unpack(ops.quantize_pack(x, 0.5, 4, signed=False, noise="uniform")))


def test_noise_nan_still_raises(isa):
    x = torch.zeros(2, 70)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"x\[1, 3\] is NaN"):
        ops.quantize_pack(x, 0.1, 2, signed=False, noise="uniform", seed=0)


def test_packed_linear_matches_unfused_path():
    rng = np.random.default_rng(11)
    K, N = 200, 7
    a_bits = torch.from_numpy(rng.choice([2, 8], size=K))
    a_scale = torch.from_numpy(tier_scales(a_bits.numpy(), rng))
    w = rng.integers(-8, 8, size=(N, K))
    pw = ops.pack(w, np.full(N, 4), signed=True, scale=rng.uniform(0.5, 1, N),
                  k_layout=KLayout.from_bits(a_bits))
    pw.kind = "torch"
    lin = PackedLinear(pw, a_bits, a_scale, True, torch.zeros(N), "lin")
    for M in (1, 33):
        x = torch.from_numpy(activations(rng, M, K, a_scale.numpy(), a_bits.numpy(), True))
        q, v = unfused(x, a_scale, a_bits, True)
        assert torch.equal(lin(x), ops.mpgemm(q, pw))
        assert torch.equal(lin.accumulators(x), v @ torch.from_numpy(w).T)
    with torch.no_grad():
        lin.a_scale.mul_(2)  # in-place change (as load_state_dict does): the cached layout follows
    x = torch.randn(2, K)
    q, _ = unfused(x, lin.a_scale, a_bits, True)
    assert torch.equal(lin(x), ops.mpgemm(q, pw))


@settings(max_examples=30, deadline=None)
@given(M=st.integers(1, 9), K=st.integers(1, 300), palette=st.sampled_from([(8,), (1, 8), (2, 4), (1, 2, 3, 5, 7)]),
       signed=st.booleans(), isa=st.sampled_from(soniq.supported_isas()), seed=st.integers(0, 2**32 - 1))
def test_property_equals_unfused(M, K, palette, signed, isa, seed):
    rng = np.random.default_rng(seed)
    bits = rng.choice(palette, size=K)
    scale = np.array([0.1, 0.37, 1.0, 3.0, 0.015])[np.searchsorted(sorted(set(palette)), bits)].astype(np.float32)
    x = (activations(rng, M, K, scale, bits, signed) * rng.uniform(0.9, 1.1, (M, K))).astype(np.float32)
    q, v = unfused(x, scale, bits, signed)
    with soniq.use_isa(isa):
        assert_same(ops.quantize_pack(x, scale, bits, signed=signed), q, torch.from_numpy(ops.unpack(q)))


# ---- torch.library ---------------------------------------------------------------------------
def _raw_args(M=3, K=100):
    p = ops.quantize_pack(torch.randn(M, K), 0.25, np.where(np.arange(K) % 3 == 0, 2, 8), signed=True)
    from soniq.ops._quantize_pack import make_plan
    plan = make_plan(p.bits, 0.25, K, signed=True)
    return plan, (torch.randn(M, K), plan.k_perm, plan.segs, plan.seg_scale, True, plan.row_words)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_rounding_edges_equal_scalar_path(isa, bits, signed):
    """Ties, the clamp bounds and one ulp around them, +-inf, +-0, huge and subnormal values:
    planes, sums and values equal the scalar path's and the two-step path's; with a NaN (raw
    op, NaN rows marked) every buffer, the NaN row's included, equals the scalar path's."""
    from soniq.ops._quantize_pack import make_plan
    t = edge_values(bits, signed)
    for scale in (0.25, 2.0, 0.3):  # powers of two: x / scale is t exactly; 0.3: inv rounded
        with np.errstate(over="ignore"):  # 3.4e38 * 2: inf
            x = torch.from_numpy(np.stack([t, t[::-1]]) * np.float32(scale))
        got = ops.quantize_pack(x, scale, bits, signed=signed)
        with soniq.use_isa("scalar"):
            want = ops.quantize_pack(x, scale, bits, signed=signed)
        assert_same(got, want)
        assert_same(got, *unfused(x, scale, bits, signed))
        xn = torch.cat([x, x[:1]])
        xn[2, 5] = float("nan")
        plan = make_plan(bits, scale, x.shape[1], signed=signed)
        got = plan(xn, nan_rows=True)
        with soniq.use_isa("scalar"):
            want = plan(xn, nan_rows=True)
        assert_same(got, want)
        assert got._nan_rows.tolist() == want._nan_rows.tolist() == [False, False, True]


def test_opcheck_quantize_pack_raw():
    _, args = _raw_args()
    torch.library.opcheck(torch.ops.soniq.quantize_pack_raw.default, args)
    torch.library.opcheck(torch.ops.soniq.quantize_pack_raw.default, args + (1, 12345))  # noise, seed
    torch.library.opcheck(torch.ops.soniq.quantize_pack_raw.default, args + (0, 0, False, True))  # per-token scales


def test_torch_compile_fullgraph_quantize_pack_then_mpgemm():
    plan, (x, perm, segs, seg_scale, signed, words) = _raw_args(M=2, K=100)
    w = torch.randint(-2, 2, (5, 100))
    pw = ops.pack(w, 2, signed=True, k_layout=KLayout(plan.k_perm, tuple(plan.ksegs[:, 0].tolist())))
    desc = torch.tensor([[0, 2] + plan.seg_bits])

    def f(x):
        data, sums, _, _ = torch.ops.soniq.quantize_pack_raw(x, perm, segs, seg_scale, signed, words)
        out = torch.ops.soniq.mpgemm_packed(data, desc, sums, torch.arange(2), True, pw.data, pw.desc, pw.sums,
                                            pw.row_perm, True, plan.ksegs, None, None, None, None, 1)
        return out * 2

    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    v = ops.quantize(x, 0.25, plan.bits.double(), signed=True, axis=1, values_only=True).to(torch.int64)
    assert torch.equal(got, 2 * (v @ w.T))


# ---- errors name the argument ----------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=torch.zeros(2, 4, dtype=torch.float64)), TypeError, "x must be float32, got torch.float64"),
    (dict(x=np.zeros((2, 4))), TypeError, "x must be float32, got numpy float64"),
    (dict(x=torch.zeros(2, 4, dtype=torch.int32)), TypeError, "x must be float32"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor or numpy.ndarray"),
    (dict(x=torch.zeros(4)), ValueError, "x must be 2-D"),
    (dict(x=torch.zeros(0, 4)), ValueError, "x must be non-empty"),
    (dict(bits=0), ValueError, "bits must be in 1..8, got 0"),
    (dict(bits=9), ValueError, "bits must be in 1..8, got 9"),
    (dict(bits=[2, 2, 8]), ValueError, "bits must be 1-D with 4 entries"),
    (dict(bits=np.array([2, 2, 8, 9])), ValueError, r"bits\[3\] = 9"),
    (dict(bits=2.5), TypeError, "bits must be an int"),
    (dict(scale=None), TypeError, "scale must be a positive float"),
    (dict(scale=-1.0), ValueError, "scale = -1.0"),
    (dict(scale=float("nan")), ValueError, "scale = nan"),
    (dict(scale=[0.5, 0.5, 0.0, 0.5]), ValueError, r"scale\[2\] = 0.0"),
    (dict(scale=np.ones(3)), ValueError, "scale must be a scalar or 1-D with 4 entries"),
    (dict(scale=1e-45), ValueError, "too small: its float32 inverse overflows"),
    (dict(bits=[2, 8, 2, 8], scale=[0.5, 0.1, 0.25, 0.1]), ValueError, "scale along K must be constant within each K segment"),
    (dict(signed=1), TypeError, "signed must be a bool"),
    (dict(k_layout="x"), TypeError, "k_layout must be a soniq.KLayout"),
    (dict(k_layout=KLayout(torch.arange(3), (3,))), ValueError, "k_layout.perm must have K=4 entries"),
    (dict(k_layout=KLayout(torch.tensor([0, 0, 1, 2]), (4,))), ValueError, "must be a permutation"),
    (dict(k_layout=KLayout(torch.arange(4), (2, 3))), ValueError, "seg_lens must be positive and sum to K=4"),
    (dict(bits=[2, 8, 2, 8], k_layout=KLayout(torch.arange(4), (4,))), ValueError, "k_layout does not match bits"),
    (dict(noise="gaussian"), ValueError, "noise must be one of"),
    (dict(noise="uniform", seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*63\), got -1"),
    (dict(noise="uniform", seed=1.5), ValueError, "seed must be an int"),
])
def test_errors(kwargs, exc, match):
    args = dict(x=torch.zeros(2, 4), scale=0.5, bits=4, signed=True, k_layout=None)  # noise, seed: defaults
    args.update(kwargs)
    x = args.pop("x")
    with pytest.raises(exc, match=match):
        ops.quantize_pack(x, args.pop("scale"), args.pop("bits"), **args)


def test_raw_op_marks_nan_rows_instead_of_raising(isa):
    plan, (x, perm, segs, seg_scale, signed, words) = _raw_args(M=4)
    x[2, 50] = float("nan")
    with pytest.raises(ValueError, match=r"x\[2, 50\] is NaN"):
        torch.ops.soniq.quantize_pack_raw(x, perm, segs, seg_scale, signed, words)
    data, sums, rows, _ = torch.ops.soniq.quantize_pack_raw(x, perm, segs, seg_scale, signed, words, 0, 0, True)
    assert rows.tolist() == [False, False, True, False]
    assert torch.ops.soniq.quantize_pack_raw(x[[0, 1, 3]], perm, segs, seg_scale, signed, words)[2].numel() == 0
    p = plan(x, nan_rows=True)  # the other rows are packed as without the NaN row
    q = plan(x[[0, 1, 3]])
    keep = torch.tensor([0, 1, 3])
    assert torch.equal(ops.unpack(p)[keep], ops.unpack(q)) and p._nan_rows.tolist() == [False, False, True, False]
    # no NaN on the CPU: nothing for the layer to fill (it skips the elementwise pass)
    assert plan(x[[0, 1, 3]], nan_rows=True)._nan_rows is None
    torch.library.opcheck(torch.ops.soniq.quantize_pack_raw.default, (x, perm, segs, seg_scale, signed, words, 0, 0, True))


def test_raw_op_rejects_inconsistent_layout():
    plan, (x, perm, segs, seg_scale, signed, words) = _raw_args()
    with pytest.raises(ValueError, match="row_words does not match"):
        torch.ops.soniq.quantize_pack_raw(x, perm, segs, seg_scale, signed, words + 1)
    bad = perm.clone()
    bad[5] = 10**9
    with pytest.raises(ValueError, match=r"perm\[5\] = 1000000000 is outside"):
        torch.ops.soniq.quantize_pack_raw(x, bad, segs, seg_scale, signed, words)
    with pytest.raises(ValueError, match="k_perm, segs, seg_scale must be"):
        torch.ops.soniq.quantize_pack_raw(x, perm[:5], segs, seg_scale, signed, words)
    assert _C.quantize_pack  # the binding exists under its documented name


def test_torch_compile_plan_fullgraph_and_packed_linear():
    """The eager fast path skips op dispatch; under dynamo the registered op is traced."""
    from soniq.ops._quantize_pack import make_plan
    rng = np.random.default_rng(12)
    K, N = 100, 5
    bits = torch.from_numpy(rng.choice([4, 8], size=K))
    scale = torch.from_numpy(tier_scales(bits.numpy(), rng))
    pw = ops.pack(torch.from_numpy(rng.integers(-2, 2, size=(N, K))), 2, signed=True, scale=np.ones(N),
                  k_layout=KLayout.from_bits(bits))
    plan = make_plan(bits, scale, K, signed=True, k_layout=pw)
    x = torch.randn(3, K)
    f = torch.compile(lambda x: plan(x).sums * 2, fullgraph=True, backend="eager")
    assert torch.equal(f(x), plan(x).sums * 2)
    lin = PackedLinear(pw, bits, scale, True, None, "lin")
    assert torch.equal(torch.compile(lin, backend="eager")(x), lin(x))
