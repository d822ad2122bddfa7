"""The exact GELU packed layers fuse (soniq.ops.gelu_, cpp/gelu.h): the same bits on every ISA
path this CPU has and the AMX emulation as the portable reference; within float rounding of
the float64 GELU and of torch's; PackedLinear's fused native forward (GELU applied to each
output row inside the call, on the merge path, the direct path and GEMV) equals its general
path (torch ops, then soniq.ops.gelu_) bit for bit."""
import numpy as np
import pytest
import torch

import soniq
from conftest import TEST_ISAS
from soniq._native import _C
from test_fused_linear import make_linear


def awkward_values(rng, n):
    """Every scale, both erf branches and their boundary, signed zeros, subnormals, infinities, NaN."""
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-12, 8, n))).astype(np.float32)
    split = np.float32(0.927734375) / np.float32(0.70710678)
    special = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-41, -1e-41, 1e-38, -1e-38, 3.4e38, -3.4e38, 5.0, -5.0,
               10.0, -10.0, 87.0, -87.0, 200.0, -200.0]
    special += [np.nextafter(split, s * np.inf) * s for s in (1, -1)]
    special += [split, -split, np.nextafter(split, np.float32(0)), -np.nextafter(split, np.float32(0))]
    x[: len(special)] = np.array(special, dtype=np.float32)
    return torch.from_numpy(x)


def native(x, isa):
    y = x.clone()
    with soniq.use_isa(isa):
        _C.gelu_(y.data_ptr(), y.numel())
    return y


@pytest.mark.parametrize("isa", TEST_ISAS)
def test_every_isa_gives_the_reference_bits(isa):
    rng = np.random.default_rng(7)
    for n in list(range(1, 40)) + [1000, 4099]:  # every tail length of 8- and 16-lane vectors
        x = awkward_values(rng, max(n, 40))[:n]
        got, want = native(x, isa), native(x, "scalar")
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (isa, n)


def test_close_to_the_float64_gelu_and_to_torch():
    rng = np.random.default_rng(8)
    x = awkward_values(rng, 200000)
    y = native(x, soniq.get_isa()).double()
    xd = x.double()
    ref = 0.5 * xd * (1 + torch.erf(xd / 2 ** 0.5))
    finite = torch.isfinite(xd)
    scale = xd.abs().clamp(min=1)[finite]
    # faithfully rounded erf: a few float32 ulps of max(1, |x|)
    assert ((y - ref).abs()[finite] / scale).max() < 1.5e-7
    tg = torch.nn.functional.gelu(x).double()  # torch's erf is off by up to 1.5e-7
    usual = xd.abs() < 1e30  # (torch's gelu overflows to inf near the float32 maximum)
    assert ((y - tg).abs()[usual] / xd.abs().clamp(min=1)[usual]).max() < 6e-7
    assert y[xd == 3.4e38].eq(xd[xd == 3.4e38]).all()
    assert torch.isnan(y[torch.isnan(xd)]).all()
    assert y[xd == np.inf].eq(np.inf).all() and y[(xd < -20) & finite].eq(0).all()


def test_op_takes_any_float_cpu_tensor():
    rng = np.random.default_rng(9)
    x = awkward_values(rng, 300)[20:].reshape(20, 14)  # finite values
    want = native(x, soniq.get_isa())
    t = x.T.contiguous().T  # non-contiguous view
    soniq.ops.gelu_(t)
    assert torch.equal(t, want)
    d = x.double()
    soniq.ops.gelu_(d)  # float64 keeps float64 accuracy: torch's gelu (the native one is float32)
    assert d.dtype == torch.float64 and torch.equal(d, torch.nn.functional.gelu(x.double()))
    h = x.half()
    soniq.ops.gelu_(h)  # narrower floats: the native GELU in float32, rounded back
    assert torch.equal(h, native(x.half().float(), soniq.get_isa()).half())
    y = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="requires grad.*no backward"):
        soniq.ops.gelu_(y * 2)  # no silent identity gradient
    with torch.no_grad():
        z = y * 2
        soniq.ops.gelu_(z)
    with pytest.raises(TypeError, match="floating-point"):
        soniq.ops.gelu_(torch.ones(3, dtype=torch.int32))


@pytest.mark.parametrize("w_tiers", [(4, 8), (4,), (2, 6)])
def test_fused_gelu_forward_equals_the_general_path(isa, w_tiers):
    """Interleaved tiers take the column merge (GELU after each merged row tile, or after the
    merge pass for few rows), one tier the kernel's direct store (GELU in a pass over rows)."""
    rng = np.random.default_rng(sum(w_tiers))
    for K, N, dynamic in ((64, 17, None), (384, 200, "token"), (70, 1536, None)):
        lin = make_linear(rng, K, N, (8,), w_tiers, dynamic=dynamic)
        lin.activation = "gelu"
        assert lin._fused_plan() is not None
        for M in (1, 4, 5, 131, 300):
            x = torch.randn(M, K) * 3
            with torch.inference_mode():
                got = lin(x)
            want = lin._run(x, integer=False, gelu=True)  # ops.quantize_pack + ops.mpgemm + bias, then ops.gelu_
            assert torch.equal(got, want), (isa, w_tiers, K, N, M)
            lin.activation = None
            pre = lin(x)
            lin.activation = "gelu"
            assert torch.equal(got, native(pre, isa))


def test_registered_op_traces_and_compiles():
    torch.library.opcheck(soniq.ops.gelu_, (torch.randn(5, 3),))
    rng = np.random.default_rng(10)
    lin = make_linear(rng, 64, 40, (8,), (4, 8))
    lin.activation = "gelu"
    x = torch.randn(7, 64)
    want = lin(x)
    assert torch.equal(torch.compile(lin, fullgraph=True)(x), want)  # the traced path: ops, then gelu_
