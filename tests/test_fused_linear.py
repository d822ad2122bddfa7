"""The packed Linear layer's fused CPU forward (cpp/linear.h) and the float epilogue the
layout GEMM kernel applies at its store (kernels.h LayoutEpilogue): bit-identical to the
driver's epilogue formula and to the unfused path (quantize_pack + mpgemm + bias), on every
ISA path with layout kernels, odd shapes, permuted rows and columns, non-contiguous input."""
import numpy as np
import pytest
import torch

import soniq
from soniq import KLayout, ops
from soniq._packed_nn import PackedLinear
from conftest import TEST_ISAS, edge_values, random_values, ref_matmul

LAYOUT_ISAS = TEST_ISAS  # every ISA has layout kernels


@pytest.fixture(params=LAYOUT_ISAS)
def layout_isa(request):
    with soniq.use_isa(request.param):
        yield request.param


def epilogue_ref(acc, segscale, a_row=None, b_row=None, bias=None):
    """The driver's float epilogue in numpy (IEEE double steps in its order, then float32)."""
    v = 0.0 + acc.astype(np.float64) * np.float64(segscale)
    if a_row is not None:
        v = v * a_row.astype(np.float64)[:, None]
    if b_row is not None:
        v = v * b_row.astype(np.float64)[None, :]
    out = v.astype(np.float32)
    return out if bias is None else out + bias.astype(np.float32)[None, :]


@pytest.mark.parametrize("M,N,K", [(5, 1, 1), (7, 17, 65), (13, 70, 300), (130, 130, 129)])
@pytest.mark.parametrize("signed", [(False, True), (True, False), (True, True)])
def test_kernel_epilogue_exact(layout_isa, M, N, K, signed):
    """Both operands in two row tiers (permuted rows and output columns, scattered stores),
    row scales on both sides and a K scale: the float output equals the formula bit for bit."""
    rng = np.random.default_rng(M * 1000 + N + K)
    a_bits = rng.choice([3, 8], M)
    b_bits = rng.choice([4, 8], N)
    a = random_values(rng, (M, K), a_bits, signed[0])
    b = random_values(rng, (N, K), b_bits, signed[1])
    sa = rng.uniform(0.01, 2, M).astype(np.float32)
    sb = rng.uniform(0.01, 2, N).astype(np.float32)
    pa, pb = ops.pack(a, a_bits, signed=signed[0], scale=sa), ops.pack(b, b_bits, signed=signed[1], scale=sb)
    out = ops.mpgemm(pa, pb)
    np.testing.assert_array_equal(out, epilogue_ref(ref_matmul(a, b), 1.0, sa, sb))
    # a scale along K (one tier): the segment scale, with a row scale of b only
    ka = np.full(K, 0.0625, np.float32)
    av = random_values(rng, (M, K), 8, signed[0])
    pa1 = ops.pack(av, 8, signed=signed[0], axis=1, scale=ka)
    pb1 = ops.pack(b, b_bits, signed=signed[1], scale=sb, k_layout=pa1)
    np.testing.assert_array_equal(ops.mpgemm(pa1, pb1), epilogue_ref(ref_matmul(av, b), np.float32(0.0625), None, sb))


def check_scaled_product_on_threads(seed, M, N, K, tiers, threads, b_bits=None):
    """8-bit A x weights drawn per row from `tiers` (or with the given b_bits), row scales on
    both sides, on `threads` threads: the float output against the formula, bit for bit."""
    rng = np.random.default_rng(seed)
    a = random_values(rng, (M, K), 8, True)
    b_bits = rng.choice(tiers, N) if b_bits is None else np.asarray(b_bits)
    b = random_values(rng, (N, K), b_bits, True)
    sa = rng.uniform(0.01, 2, M).astype(np.float32)
    sb = rng.uniform(0.01, 2, N).astype(np.float32)
    before = soniq.get_num_threads()
    soniq.set_num_threads(threads)
    try:
        out = ops.mpgemm(ops.pack(a, 8, signed=True, scale=sa), ops.pack(b, b_bits, signed=True, scale=sb))
    finally:
        soniq.set_num_threads(before)
    np.testing.assert_array_equal(out, epilogue_ref(ref_matmul(a, b), 1.0, sa, sb))


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_epilogue_large_m(layout_isa, threads):
    """Many rows: the driver gives a task up to 512 of them when that leaves 4 tasks per
    thread (600 rows, 3 column blocks: 512 + 88 on 1 thread, 256-row tasks on 2)."""
    check_scaled_product_on_threads(threads, 600, 130, 129, [4, 8], threads)


@pytest.mark.parametrize("tiers", [(4, 8), (2, 4, 8)])
@pytest.mark.parametrize("M,N", [(70, 33), (130, 200), (1100, 2100)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_interleaved_tiers_merge_exact(layout_isa, tiers, M, N, threads):
    """Weight tiers interleaved in the output columns: the kernels write rows in packed column
    order and the driver merges them back (two tiers: one two-source permute per 16 columns,
    more: an expand per tier), by slabs of rows (1100 x 2100: several). With 64 rows or more
    per thread a unit of work is a row tile across all tiers, then its rows' merge (130 on 2
    threads: 64 + 64 + 2 rows; 1100 on 2 and 3 threads: slabs of whole tiles per thread);
    fewer (70 rows, 130 on 3 threads): column tasks, then a merge pass."""
    check_scaled_product_on_threads(len(tiers) * 10 + M + threads, M, N, 40, list(tiers), threads)


@pytest.mark.parametrize("sizes", [(37, 163), (307, 1229), (5, 64, 131)])
@pytest.mark.parametrize("M", [16, 128, 300])
@pytest.mark.parametrize("threads", [2, 3])
def test_tier_blocks_of_odd_sizes_exact(layout_isa, sizes, M, threads):
    """Each tier one block of output columns, of sizes that leave tail tasks (fewer than 64
    columns): tasks of unequal size, which the driver orders into contiguous runs of about
    equal work padded with empty tasks (balanced_runs); every output still written once."""
    b_bits = np.concatenate([np.full(n, b) for n, b in zip(sizes, (8, 4, 2))])
    check_scaled_product_on_threads(M + sum(sizes) + threads, M, len(b_bits), 70, None, threads, b_bits)


def tier_scales(bits, rng):
    s = {b: np.float32(rng.uniform(0.5, 2) / (1 << (b - 1))) for b in np.unique(bits)}
    return np.array([s[b] for b in bits], dtype=np.float32)


def make_linear(rng, K, N, a_tiers, w_tiers, *, signed=True, bias=True, dynamic=None, smooth=False, layout_only=True):
    a_bits = torch.from_numpy(rng.choice(a_tiers, K))
    a_scale = torch.from_numpy(tier_scales(a_bits.numpy(), rng))
    w_bits = rng.choice(w_tiers, N)
    w = random_values(rng, (N, K), w_bits, True)
    pw = ops.pack(w, w_bits, signed=True, scale=rng.uniform(0.01, 1, N).astype(np.float32),
                  k_layout=KLayout.from_bits(a_bits))
    pw.kind = "torch"
    lin = PackedLinear(pw, a_bits, a_scale, signed, torch.randn(N) if bias else None, "lin", a_dynamic=dynamic,
                       a_inv_smooth=torch.rand(K) + 0.5 if smooth else None)
    if layout_only and lin.w.planes_resident:  # the scalar ISA keeps planes for every pair: test its path too
        lin.w.release_planes()
        lin._weights_changed()
    return lin


def unfused(lin, x):
    """The general path (ops.quantize_pack + ops.mpgemm + the bias add in torch)."""
    return lin._run(x, integer=False)


@pytest.mark.parametrize("a_tiers,w_tiers", [((8,), (4, 8)), ((8,), (4,)), ((4, 8), (4, 8)), ((2, 5), (3, 7))])
@pytest.mark.parametrize("dynamic", [None, "token"])
def test_fused_forward_equals_unfused(layout_isa, a_tiers, w_tiers, dynamic):
    rng = np.random.default_rng(len(a_tiers) * 10 + sum(w_tiers))
    for K, N in ((1, 3), (70, 17), (384, 130)):
        for signed in (True, False):
            lin = make_linear(rng, K, N, a_tiers, w_tiers, signed=signed, dynamic=dynamic, smooth=K == 70)
            assert lin._fused_plan() is not None  # the weight is kept as its layout only
            for M in (1, 4, 5, 131):
                x = torch.randn(M, K) * 3
                if M > 4:
                    x[1] = 0.0                      # a zero row (dynamic: scale 1)
                    x[2, 0] = float("inf")          # clamps; skipped by the row max
                got = lin(x)
                assert torch.equal(got, unfused(lin, x)), (K, N, M, signed)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_fused_forward_rounding_edges(layout_isa, bits, signed):
    """The fused forward's activation codes at the rounding edges (ties, the clamp bounds and
    one ulp around them, +-inf, +-0, huge and subnormal values; a NaN row): its output equals
    the scalar path's and the unfused path's exactly."""
    rng = np.random.default_rng(bits * 2 + signed)
    t = edge_values(bits, signed)
    K, N = t.size, 37
    w_bits = rng.choice([2, 4, 8], N)
    pw = ops.pack(random_values(rng, (N, K), w_bits, True), w_bits, signed=True,
                  scale=rng.uniform(0.01, 1, N).astype(np.float32))
    pw.kind = "torch"
    for scale in (0.25, 0.3):  # a power of two: x / scale is t exactly; 0.3: inv rounded
        lin = PackedLinear(pw, torch.full((K,), bits), torch.full((K,), scale), signed, torch.randn(N), "lin")
        if lin.w.planes_resident:
            lin.w.release_planes()
            lin._weights_changed()
        assert lin._fused_plan() is not None
        x = torch.from_numpy(np.stack([t, t[::-1], t]) * np.float32(scale))
        x[2, 7] = float("nan")
        got = lin(x)
        with soniq.use_isa("scalar"):
            want = lin(x)
        assert torch.equal(got[:2], want[:2]) and torch.isnan(got[2]).all() and torch.isnan(want[2]).all()
        assert torch.equal(got[:2], unfused(lin, x[:2]))


def test_fused_forward_input_forms(layout_isa):
    rng = np.random.default_rng(5)
    lin = make_linear(rng, 96, 40, (8,), (4, 8), dynamic="token")
    big = torch.randn(3, 7, 200)
    for x in (big[:, :, ::2][:, :, :96],           # non-contiguous last dim
              big[:, :, :96],                       # strided rows
              big[:, :, :96].transpose(0, 1),       # 3-D, permuted batch
              torch.randn(96, 5).T,                 # column-major
              big[:, :, :96].double(),              # another dtype (converted as the float layer's input)
              big[:, :, :96].contiguous(),          # 3-D contiguous (read in place, no reshape)
              big[1, 2, :96].contiguous()):         # one vector
        got = lin(x)
        assert got.shape == (*x.shape[:-1], 40) and got.dtype == x.dtype and got.is_contiguous()
        assert torch.equal(got, unfused(lin, x))
    for empty in (torch.randn(0, 96), torch.randn(2, 0, 96)):  # no rows: an empty output, as nn.Linear
        got = lin(empty)
        assert got.shape == (*empty.shape[:-1], 40) and got.dtype == torch.float32
    want = lin(big[:, :, :96])
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the output is float32 whatever the default
    try:
        assert torch.equal(lin(big[:, :, :96].float()), want)
    finally:
        torch.set_default_dtype(old)


def test_fused_forward_nan_rows(layout_isa):
    rng = np.random.default_rng(6)
    lin = make_linear(rng, 100, 30, (8,), (4, 8), dynamic="token")
    x = torch.randn(9, 100)
    x[3, 50] = float("nan")
    got = lin(x)
    assert torch.isnan(got[3]).all() and not torch.isnan(got[[0, 1, 2, 4, 5, 6, 7, 8]]).any()
    assert torch.equal(got[[0, 1, 2, 4]], unfused(lin, x)[[0, 1, 2, 4]])


def test_fused_plan_follows_changes(layout_isa):
    rng = np.random.default_rng(7)
    lin = make_linear(rng, 64, 20, (8,), (4,))
    x = torch.randn(6, 64)
    first = lin._fused_plan()
    with torch.no_grad():
        lin.bias.add_(1.0)          # in place (as load_state_dict copies)
        lin.a_scale.mul_(2.0)
    assert lin._fused_plan() is not first
    assert torch.equal(lin(x), unfused(lin, x))
    lin.load_state_dict(make_linear(rng, 64, 20, (8,), (4,)).state_dict())
    assert torch.equal(lin(x), unfused(lin, x))
    lin.bias = None                 # replaced
    assert torch.equal(lin(x), unfused(lin, x))


def test_fused_plan_not_pickled(tmp_path):
    import copy
    rng = np.random.default_rng(10)
    lin = make_linear(rng, 64, 20, (8,), (4, 8))
    x = torch.randn(6, 64)
    want = lin(x)
    assert "_fused" in lin.__dict__
    twin = copy.deepcopy(lin)
    assert "_fused" not in twin.__dict__ and torch.equal(twin(x), want)
    torch.save(lin, tmp_path / "lin.pt")
    assert torch.equal(torch.load(tmp_path / "lin.pt", weights_only=False)(x), want)


def test_fused_plan_made_on_one_isa_runs_on_every_other():
    """The plan is made once (on the active ISA) and runs on whichever ISA is active at the call:
    the same floats on each."""
    rng = np.random.default_rng(8)
    lin = make_linear(rng, 64, 20, (8,), (4, 8))
    x = torch.randn(6, 64)
    want = lin(x)
    for isa in TEST_ISAS:
        with soniq.use_isa(isa):
            assert torch.equal(lin(x), want), isa
    assert torch.equal(lin(x), want)


@pytest.mark.parametrize("isa", TEST_ISAS)
def test_only_the_isas_smallest_pairs_keep_planes(isa):
    """A layer keeps its weight's planes (the general path) only while its smallest bit pair is
    at most the ISA's keep_planes_max_pairs (measured through PackedLinear: 1x1 on AVX2 and
    AVX-512, none on AMX, every pair on the scalar path); every other layer is its layout alone and runs the
    fused forward. Both give the same outputs."""
    from soniq._native import _C
    rng = np.random.default_rng(3)
    with soniq.use_isa(isa):
        limit = _C.keep_planes_max_pairs()
        if isa in ("avx2", "avx512"):
            assert limit == 1
        if isa in ("amx", "amx_emu"):  # the tiles outrun popcounts: every layer is its layout
            assert limit == 0
        for wb, ab in [(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (4, 1), (4, 8)]:
            lin = make_linear(rng, 64, 20, (ab,), (wb,), layout_only=False)
            keeps = wb * ab <= limit
            assert lin.w.planes_resident == keeps and (lin._fused_plan() is None) == keeps, (isa, wb, ab)
            x = torch.randn(6, 64)
            assert torch.equal(lin(x), unfused(lin, x)), (isa, wb, ab)


@pytest.mark.parametrize("isa", TEST_ISAS)
def test_packed_linear_keeping_planes_uses_general_path(isa):
    """Bit-serial pairs keep the planes (no layout-only weight): no fused plan, same results
    (on the ISAs where 1x1 keeps them: not AMX)."""
    from soniq._native import _C
    rng = np.random.default_rng(9)
    with soniq.use_isa(isa):
        if _C.keep_planes_max_pairs() < 1:
            pytest.skip(f"{isa}: no layer keeps its planes")
        lin = make_linear(rng, 64, 20, (1,), (1, 2), layout_only=False)
        assert lin.w.planes_resident and lin._fused_plan() is None
        x = torch.randn(6, 64)
        assert torch.equal(lin(x), unfused(lin, x))
