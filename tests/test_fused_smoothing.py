"""SmoothQuant smoothing inside the packed Linear layer's fused CPU forward (cpp/linear.h): the
plan multiplies x by a_inv_smooth in its quantize pass. Its output equals, bit for bit, the
path smoothed layers took before (x * a_inv_smooth in torch, then the unsmoothed plan) and
the general path, for static and per-token scales, on every ISA path this CPU has and the
AMX emulation, odd shapes, 3-D,
non-contiguous and float64 input."""
import copy

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import soniq
from soniq._packed_nn import PackedLinear
from conftest import edge_values, random_values
from test_fused_linear import make_linear


def smoothed_linear(rng, K, N, a_tiers, w_tiers, **kw):
    """make_linear's layer (kept as its layout only where the ISA has layout kernels) with
    wide-ranging factors 2^[-4, 4] (so the product's rounding shows in the codes)."""
    lin = make_linear(rng, K, N, a_tiers, w_tiers, smooth=True, layout_only=True, **kw)
    return smoothed(lin, rng)


def smoothed(lin, rng):
    """lin with wide-ranging factors 2^[-4, 4] (so the product's rounding shows in the codes)."""
    K = lin.a_bits.numel()
    with torch.no_grad():
        lin.a_inv_smooth.copy_(torch.from_numpy(np.exp2(rng.uniform(-4, 4, K)).astype(np.float32) * 1.01))
    return lin


def old_path(lin, x):
    """What a smoothed layer computed before: x * a_inv_smooth in torch (float32), then the
    same layer without smoothing."""
    twin = copy.deepcopy(lin)
    inv = twin.a_inv_smooth.clone()
    twin.a_inv_smooth = None
    return twin(x.reshape(-1, inv.numel()).float().mul(inv).reshape(x.shape))


def check(lin, x):
    got = lin(x)
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], lin.w.shape[0])
    assert torch.equal(got, old_path(lin, x))
    assert torch.equal(got, lin._run(x, integer=False))  # the general path (torch multiply)
    return got


@pytest.mark.parametrize("a_tiers,w_tiers", [((8,), (4, 8)), ((2, 5), (3, 7)), ((6, 8), (4, 6))])
@pytest.mark.parametrize("dynamic", [None, "token"])
def test_smoothed_forward_equals_torch_multiply(isa, a_tiers, w_tiers, dynamic):
    rng = np.random.default_rng(len(a_tiers) * 100 + sum(w_tiers) + (dynamic is None))
    for K, N in ((1, 3), (65, 17), (129, 37), (300, 130)):
        lin = smoothed_linear(rng, K, N, a_tiers, w_tiers, signed=K != 65, dynamic=dynamic)
        fused = lin._fused_plan()  # built here
        assert fused is not None and fused[0].smoothed
        inv = lin.a_inv_smooth
        for M in (1, 3, 130):
            x = torch.randn(M, K) * 3
            x[:, rng.integers(0, K, 2)] *= 40  # outlier columns (what smoothing is for)
            if M == 130:
                big = int(inv.argmax())
                x[1] = 0.0                                 # a zero row (dynamic: scale 1)
                x[2, 0] = float("inf")                     # clamps; skipped by the row max
                x[3, big] = 3.0e38 if inv[big] > 1 else 1e30  # x * inv overflows to inf (or not)
                x[4, big] = -x[3, big]
                x[5] *= 1e-39                              # subnormal products
                x[6, K // 2] = float("nan")                # a NaN row
            got = lin(x)
            want = old_path(lin, x)
            nan = torch.isnan(x).any(1)
            assert torch.isnan(got[nan]).all() and torch.isnan(want[nan]).all()
            assert torch.equal(got[~nan], want[~nan]), (K, N, M)
            assert torch.equal(got[~nan], lin._run(x[~nan], integer=False)), (K, N, M)
        base = torch.randn(2, 5, 2 * K + 3) * 3
        check(lin, base[:, :, :K].contiguous())          # 3-D, read in place
        check(lin, base[:, :, ::2][:, :, :K])            # 3-D, non-contiguous last dim
        check(lin, base[:, :, :K].transpose(0, 1))       # 3-D, strided rows
        check(lin, base[1, :, :K].double())              # float64: converted in torch, smoothed natively
        check(lin, base[0, 1, :K].contiguous())          # one vector


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_smoothed_forward_rounding_edges(isa, bits, signed):
    """Inputs whose products x * inv land on the quantizer's rounding edges (ties, the clamp
    bounds, one ulp around them, +-inf, subnormals): the codes of the rounded product, as
    the torch multiply gave."""
    rng = np.random.default_rng(bits * 2 + signed)
    t = edge_values(bits, signed)
    K, N = t.size, 29
    w_bits = rng.choice([4, 8], N)
    pw = soniq.ops.pack(random_values(rng, (N, K), w_bits, True), w_bits, signed=True,
                        scale=rng.uniform(0.01, 1, N).astype(np.float32))
    pw.kind = "torch"
    inv = np.exp2(rng.integers(-3, 4, K)).astype(np.float32) * np.float32(1.1)
    for scale, dyn in ((0.25, None), (0.3, None), (0.3, "token")):
        lin = PackedLinear(pw, torch.full((K,), bits), torch.full((K,), scale), signed, torch.randn(N), "lin",
                           a_inv_smooth=torch.from_numpy(inv), a_dynamic=dyn)
        if lin.w.planes_resident:
            lin.w.release_planes()
            lin._weights_changed()
        with np.errstate(over="ignore"):
            x = torch.from_numpy(np.stack([t * np.float32(scale) / inv, t[::-1] * np.float32(scale) / inv[::-1]]))
        check(lin, x)


def test_smoothed_forward_runs_no_torch_op(isa):
    """A contiguous float32 input goes straight to the plan: no multiply, copy or reshape in
    torch (the output's allocation is the only op)."""
    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    rng = np.random.default_rng(11)
    for dynamic in (None, "token"):
        lin = smoothed_linear(rng, 96, 40, (8,), (4, 8), dynamic=dynamic)
        x = torch.randn(4, 7, 96)
        want = old_path(lin, x)
        lin(x)  # the plan is built at the first call
        seen = []
        with Ops():
            got = lin(x)
        assert torch.equal(got, want)
        assert seen == ["new_empty"], seen


def test_smoothed_plan_follows_factor_changes(isa):
    rng = np.random.default_rng(12)
    lin = smoothed_linear(rng, 70, 20, (8,), (4,))
    x = torch.randn(6, 70)
    check(lin, x)
    with torch.no_grad():
        lin.a_inv_smooth.mul_(3.0)  # in place (as load_state_dict copies)
    check(lin, x)
    lin.a_inv_smooth = torch.rand(70) + 0.25  # replaced
    check(lin, x)
    lin.a_inv_smooth = None  # dropped: the plan has no factors any more
    got = lin(x)
    assert torch.equal(got, lin._run(x, integer=False))
    assert lin._fused_plan() is None or not lin._fused_plan()[0].smoothed
