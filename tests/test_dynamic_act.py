"""Per-token dynamic activation scales: ops.quantize_pack(dynamic="token") equals the torch
codes of soniq._dynamic_act (which QLinear trains with) exactly, on every ISA path, for odd
shapes, non-contiguous input, zero rows, infinities and NaN rows; mpgemm applies the row
scales; the fake-quantized and packed models agree (integer accumulators equal) and save."""
import numpy as np
import pytest
import torch

import soniq
from soniq import KLayout, ops
from soniq.ops._quantize import level_bounds
from soniq.qat import QATConfig
from soniq._dynamic_act import DynRoundQuant, dynamic_codes, token_scale

SHAPES = [(1, 1), (1, 130), (5, 63), (3, 64), (7, 200)]


def torch_side(x, scale, bits, signed):
    """(integer codes int64, a_r) as the fake quantizer computes them."""
    K = x.shape[1]
    sv = torch.as_tensor(np.broadcast_to(np.asarray(scale, np.float32), (K,)).copy())
    bv = torch.as_tensor(np.broadcast_to(np.asarray(bits), (K,)).astype(np.float32).copy())
    lo, hi, alpha = level_bounds(bv, signed)
    v, _, a = dynamic_codes(x.contiguous(), sv, lo, hi, alpha)
    return v.to(torch.int64), a, sv, bv.to(torch.int64)


def check(x, scale, bits, signed, k_layout=None):
    v, a, sv, bv = torch_side(x, scale, bits, signed)
    p = ops.quantize_pack(x, sv, bv, signed=signed, k_layout=k_layout, dynamic="token")
    q = ops.pack(v, bv, signed=signed, axis=1, scale=sv, k_layout=k_layout)
    for k in ("data", "sums", "k_perm", "ksegs"):
        assert torch.equal(getattr(p, k), getattr(q, k)), k
    assert torch.equal(p.token_scale, a) and p.row_scale is p.token_scale
    assert torch.equal(torch.as_tensor(ops.unpack(p)), v)
    return p, v, a


def rows(rng, M, K):
    """Rows of very different ranges (what per-token scales are for), with exact ties."""
    x = rng.standard_normal((M, K)) * 10.0 ** rng.uniform(-3, 3, size=(M, 1))
    return torch.from_numpy(x.astype(np.float32))


@pytest.mark.parametrize("bits", [1, 2, 4, 5, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_codes_equal_torch_every_isa(isa, bits, signed):
    rng = np.random.default_rng(bits * 2 + signed)
    for M, K in SHAPES:
        x = rows(rng, M, K)
        if not signed:
            x = x.abs()
        scale = 1.0 / (2 ** bits - 1) if not signed else 1.0 / max(1, 2 ** (bits - 1) - 1)
        check(x, scale * 0.9, bits, signed)


def test_two_tiers_permuted_noncontiguous(isa):
    rng = np.random.default_rng(7)
    K = 150
    bits = np.where(rng.random(K) < 0.3, 4, 8)
    scale = np.where(bits == 4, 1 / 7, 1 / 127).astype(np.float32)
    wb = rng.integers(2, 5, size=9)
    w = ops.pack(torch.randint(-2, 2, (9, K)), torch.as_tensor(wb), signed=True, axis=0,
                 k_layout=KLayout.from_bits(torch.as_tensor(bits)))
    big = rows(rng, 11, 2 * K)
    x = big[:, ::2]  # non-contiguous columns
    assert not x.is_contiguous()
    check(x, scale, bits, True, k_layout=w)
    check(big[1:10, 3:3 + K], scale, bits, True, k_layout=w)  # row stride != K


def test_zero_inf_tiny_rows(isa):
    x = torch.randn(6, 70)
    x[0] = 0.0                      # all zeros: a = 1, codes 0
    x[1, 5] = float("inf")          # infinities are skipped by the row max and clamp
    x[2, 0] = -float("inf")
    x[3] = 1e-44                    # scale * a underflows: a = 1
    x[4] = -0.0
    p, v, a = check(x, 1 / 127, 8, True)
    assert a[0] == 1 and a[3] == 1 and a[4] == 1 and bool((v[0] == 0).all())
    assert a[1] == x[1].abs()[torch.isfinite(x[1])].max() and v[1, 5] == 127 and v[2, 0] == -128
    w = ops.pack(torch.randint(-8, 8, (5, 70)), 4, signed=True, axis=0, scale=torch.full((5,), 0.1))
    out = ops.mpgemm(p, w)
    assert bool(torch.isfinite(out).all()) and bool((out[0] == 0).all())


def test_nan_rows():
    x = torch.randn(4, 33)
    x[2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"x\[2, 7\] is NaN"):
        ops.quantize_pack(x, 1 / 127, 8, signed=True, dynamic="token")
    plan = soniq.ops._quantize_pack.make_plan(8, 1 / 127, 33, signed=True, dynamic=True)
    p = plan(x, nan_rows=True)
    assert p._nan_rows.tolist() == [False, False, True, False]
    keep = [0, 1, 3]  # the other rows' codes and scales are those of x without the NaN row
    q = ops.quantize_pack(x[keep], 1 / 127, 8, signed=True, dynamic="token")
    assert torch.equal(p.token_scale[keep], q.token_scale)
    assert torch.equal(torch.as_tensor(ops.unpack(p))[keep], torch.as_tensor(ops.unpack(q)))


def test_mpgemm_applies_row_scales(isa):
    rng = np.random.default_rng(3)
    x = rows(rng, 9, 96)
    sv = torch.full((96,), 1 / 127)
    p = ops.quantize_pack(x, sv, 8, signed=True, dynamic="token")
    wv = torch.randint(-8, 8, (13, 96))
    ws = torch.rand(13) + 0.1
    w = ops.pack(wv, 4, signed=True, axis=0, scale=ws)
    acc = ops.unpack(p).to(torch.float64) @ wv.T.to(torch.float64)
    want = (acc * float(sv[0]) * p.token_scale.double()[:, None] * ws.double()[None, :]).float()
    torch.testing.assert_close(ops.mpgemm(p, w), want, rtol=1e-6, atol=0)
    # b with two K segments: mpgemm re-lays out a (one segment) and keeps its row scales
    kb = torch.where(torch.arange(96) % 3 == 0, 2, 4)
    w2 = ops.pack(wv.clamp(-2, 1), 4, signed=True, axis=0, scale=ws, k_layout=KLayout.from_bits(kb))
    acc2 = ops.unpack(p).to(torch.float64) @ wv.clamp(-2, 1).T.to(torch.float64)
    want2 = (acc2 * float(sv[0]) * p.token_scale.double()[:, None] * ws.double()[None, :]).float()
    torch.testing.assert_close(ops.mpgemm(p, w2), want2, rtol=1e-6, atol=0)


def test_bad_mode():
    with pytest.raises(ValueError, match="dynamic"):
        ops.quantize_pack(torch.randn(2, 3), 0.1, 8, signed=True, dynamic="row")
    with pytest.raises(ValueError, match="a_dynamic"):
        QATConfig(a_dynamic="channel")


def test_lsq_gradient():
    """DynRoundQuant's gradients are those of the straight-through expression
    ((round(t) - t).detach() + t) * S with S = s * a_r (a_r constant), clamped."""
    torch.manual_seed(0)
    x = (torch.randn(6, 20) * 3).requires_grad_()
    s = torch.full((20,), 0.05, requires_grad=True)
    lo, hi, alpha = level_bounds(torch.full((20,), 4.0), True)
    out = DynRoundQuant.apply(x, s, lo, hi, alpha)
    g = torch.randn_like(out)
    gx, gs = torch.autograd.grad(out, (x, s), g)
    x2, s2 = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    a = token_scale(x2, s2)
    S = s2[None, :] * a[:, None]
    t = x2 / S
    r = torch.round(t)
    inside = (r >= lo) & (r <= hi)
    v = torch.where(inside, (r - t).detach() + t, torch.clamp(r, lo, hi).detach())
    ref = v * S
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    rx, rs = torch.autograd.grad(ref, (x2, s2), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gs, rs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("smooth", [None, 0.5])
def test_fake_equals_packed_and_saves(tmp_path, smooth, isa):
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Linear(100, 70), torch.nn.GELU(), torch.nn.Linear(70, 33))
    cfg = QATConfig(w_palette=(2, 4), a_palette=(4, 8), w_bits_target=3, a_bits_target=6, a_dynamic="token",
                    smooth_alpha=smooth)
    soniq.qat.prepare(m, cfg)
    x = torch.randn(37, 100) * torch.rand(37, 1) * 5
    x[3] = 0
    m(x)
    soniq.qat.freeze_precision(m)
    m.train()
    m(x).square().sum().backward()  # phase 2 trains through the dynamic quantizer
    assert all(p.grad is not None for n, p in m.named_parameters() if n.endswith("clip"))
    m.eval()
    with torch.no_grad():
        y = m(x)
        p = soniq.convert(m)
        yp = p(x)
        for q, pk, xin in ((m[0], p[0], x), (m[2], p[2], m[1](m[0](x)))):
            va, vw = q.integer_operands(xin)
            assert torch.equal(va @ vw.T, pk.accumulators(xin))
    torch.testing.assert_close(yp, y, rtol=1e-5, atol=1e-5)
    soniq.save(p, tmp_path / "m.safetensors")
    back = soniq.load(tmp_path / "m.safetensors")
    assert back[0].a_dynamic == "token" and torch.equal(back(x), yp)
    # the mode is module state: from_state_dict / load_state_dict keep it; absent = static
    sd = p[0].state_dict()
    assert bool(sd["a_dynamic"])
    rebuilt = soniq.nn.PackedLinear.from_state_dict(sd)
    assert torch.equal(rebuilt(x), p[0](x))  # on its own (a fused GELU applies in its block only)
    old = {k: v for k, v in sd.items() if k != "a_dynamic"}
    assert soniq.nn.PackedLinear.from_state_dict(old).a_dynamic is None
    back[0].load_state_dict(old)
    assert back[0].a_dynamic is None and not torch.equal(back[0](x), p[0](x))
    back[0].load_state_dict(sd)
    assert back[0].a_dynamic == "token" and torch.equal(back[0](x), p[0](x))
