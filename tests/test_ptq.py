"""soniq.ptq: mixed-precision post-training quantization. The tier budget holds (and no further
channel would fit), GPTQ rounding beats round-to-nearest on the layer output, measured layer
gains steer the tiers, and the converted packed model computes exactly the fake-quantized
model's integer accumulators, for Linear and Conv2d."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import soniq
from soniq._gptq import gptq_codes, grid, h_error, round_codes
from soniq.nn import PackedConv2d, PackedLinear, QConv2d, QLinear
from soniq.ptq import PTQConfig, quantize
from conftest import TEST_ISAS


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 80), nn.GELU(), nn.Linear(80, 12))


def _data(seed=1, n=384, k=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.3)  # correlated inputs
    return x, list(x.split(64))


def _convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(24 * 4 * 4, 10))


def _weight_bits(model):
    tot = n = 0
    bits = []
    for m in model.modules():
        if isinstance(m, (QLinear, QConv2d)):
            b = m.w_quant.bits().detach()
            bits.append((b, m.w_quant.per_channel))
            tot += float((b * m.w_quant.per_channel).sum())
            n += b.numel() * m.w_quant.per_channel
    return tot / n, bits, n


@pytest.mark.parametrize("palette,target", [((2, 4), 3.0), ((4, 8), 4.5), ((1, 4), 2.2)])
@pytest.mark.parametrize("allocation", ["measured", "hessian", "uniform"])
def test_tier_budget_is_met_and_no_further_channel_fits(palette, target, allocation):
    _, batches = _data()
    m = quantize(_mlp(), batches, PTQConfig(w_palette=palette, w_bits_target=target, allocation=allocation,
                                            rounding="rtn"))
    avg, bits, n = _weight_bits(m)
    assert avg <= target + 1e-9
    for b, _ in bits:
        assert set(b.unique().tolist()) <= set(map(float, palette))
    # maximal: the room left is smaller than any low channel's upgrade
    lo, hi = palette
    left = [per for b, per in bits if bool((b == lo).any())]
    assert not left or (target - avg) * n < (hi - lo) * min(left)
    if allocation == "uniform":  # each layer near the budget on its own
        for b, per in bits:
            assert abs(float(b.mean()) - target) <= (hi - lo) * len(bits) / b.numel() + 1e-9


@pytest.mark.parametrize("allocation", ["measured", "hessian", "uniform"])
def test_tier_groups_share_a_tier_and_meet_the_budget(allocation):
    """tier_group=g: each run of g consecutive output channels has one tier (a layer's last run
    what is left: the 12-wide last layer is runs of 8 + 4 with g = 8, one run of 12 with 16),
    the budget holds and no further group fits."""
    _, batches = _data()
    lo, hi, target = 2, 4, 3.0
    for g in (8, 16):
        m = quantize(_mlp(), batches, PTQConfig(w_palette=(lo, hi), w_bits_target=target, allocation=allocation,
                                                rounding="rtn", tier_group=g))
        avg, bits, n = _weight_bits(m)
        assert avg <= target + 1e-9
        low_costs = []
        for b, per in bits:
            for run in b.split(g):
                assert bool((run == run[0]).all())
                if run[0] == lo:
                    low_costs.append(per * run.numel())
        assert not low_costs or (target - avg) * n < (hi - lo) * min(low_costs)  # maximal


def test_tier_groups_of_8_pack_without_a_column_merge():
    """With tiers per group of 8 every run of 8 packed outputs of a tier is 8 consecutive
    outputs (what lets the kernels write in place, cpp/mpgemm.cpp prepare_checked), where per
    channel tiers interleave; fake == packed either way."""
    x, batches = _data()
    for g, runs_whole in ((1, False), (8, True)):
        cfg = PTQConfig(w_palette=(4, 8), w_bits_target=5.0, rounding="rtn", allocation="uniform", tier_group=g)
        fake = quantize(_mlp(), batches, cfg)
        packed = soniq.convert(fake)
        whole = []
        for name in ("0", "2"):
            w = packed.get_submodule(name).w
            perm = w.row_perm.cpu()
            tiers = w.bits.cpu()[perm]  # each row's bits in packed order: one run per tier
            assert len(set(tiers.tolist())) == 2  # both tiers in use
            edges = [0] + [i for i in range(1, len(tiers)) if tiers[i] != tiers[i - 1]] + [len(tiers)]
            whole.append(all(bool((perm[j: min(j + 8, e)] == perm[j] + torch.arange(min(8, e - j))).all())
                             for s_, e in zip(edges[:-1], edges[1:]) for j in range(s_, e, 8)))
        assert all(whole) == runs_whole
        _check_fake_equals_packed(fake, packed, x[:37])


def test_uniform_palettes_put_every_channel_at_one_width():
    _, batches = _data()
    for w in (3, 6):
        m = quantize(_mlp(), batches, PTQConfig(w_palette=(w, w), w_bits_target=float(w), a_palette=(8, 8)))
        avg, bits, _ = _weight_bits(m)
        assert avg == w and all(bool((b == w).all()) for b, _ in bits)
        assert all(bool((q.a_quant.bits() == 8).all()) for q in m.modules() if isinstance(q, QLinear))


def test_gptq_lowers_the_layer_output_error_vs_round_to_nearest():
    g = torch.Generator().manual_seed(3)
    n, k = 40, 96
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = torch.randn(2000, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    h = x.T @ x / x.shape[0]
    bits = torch.tensor([2.0, 4.0]).repeat(n // 2)           # mixed tiers: each row on its own grid
    step = w.abs().amax(1) / 2 ** (bits - 1)
    lo, hi, al = grid(bits)
    rtn = round_codes(w, step, lo, hi, al)
    for act_order in (False, True):
        codes = gptq_codes(w, h, step, bits, damp=0.01, block_size=32, act_order=act_order)
        assert torch.equal(codes, torch.round(codes))
        assert bool(((codes >= lo[:, None]) & (codes <= hi[:, None])).all())
        e_g = h_error(w, codes * step[:, None], h).sum()
        e_r = h_error(w, rtn * step[:, None], h).sum()
        assert e_g < 0.7 * e_r, (float(e_g), float(e_r))


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """H diagonal: no error feedback crosses columns, so the codes are the nearest ones."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 33, generator=g, dtype=torch.float64)
    bits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    step = w.abs().amax(1) / 2 ** (bits - 1) * 0.9
    h = torch.diag(torch.rand(33, generator=g, dtype=torch.float64) + 0.5)
    h[5, 5] = 0.0  # a dead input column gets the code of 0 (1-bit rows: -1)
    lo, hi, al = grid(bits)
    want = round_codes(w, step, lo, hi, al)
    want[:, 5] = round_codes(torch.zeros(8, dtype=torch.float64), step, lo, hi, al)
    assert want[0, 5] == -1 and bool((want[1:, 5] == 0).all())
    assert torch.equal(gptq_codes(w, h, step, bits, damp=1e-6, block_size=7), want)


def _check_fake_equals_packed(fake, packed, x):
    """Every layer fed the same input: the packed layer's exact accumulators are the fake
    layer's integer operands multiplied, and the outputs agree to float32 rounding."""
    names = [n for n, m in fake.named_modules() if isinstance(m, (QLinear, QConv2d))]
    inputs = {}
    hooks = [fake.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: inputs.__setitem__(n, a[0].detach())) for n in names]
    with torch.no_grad():
        fake(x)
    for h in hooks:
        h.remove()
    for n in names:
        f, p, xi = fake.get_submodule(n), packed.get_submodule(n), inputs[n]
        va, vw = f.integer_operands(xi)
        if isinstance(f, QLinear):
            assert isinstance(p, PackedLinear)
            want = va.reshape(-1, va.shape[-1]) @ vw.T
        else:
            assert isinstance(p, PackedConv2d)
            want = torch.nn.functional.conv2d(va.double(), vw.double(), None, f.stride, f.padding,
                                              f.dilation).round().to(torch.int64)  # NCHW, as accumulators()
        acc = p.accumulators(xi)
        assert acc.shape == want.shape and torch.equal(acc, want), n
        with torch.no_grad():
            want_out = f(xi)
            if getattr(p, "activation", None) == "gelu":  # the GELU after it, fused (soniq.fuse_activations)
                want_out = torch.nn.functional.gelu(want_out)
            torch.testing.assert_close(p(xi), want_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rounding", ["gptq", "rtn"])
def test_linear_model_fake_equals_packed_and_weights_sit_on_the_grid(rounding):
    x, batches = _data()
    m = quantize(_mlp(), batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0, a_palette=(4, 8),
                                            a_bits_target=7.0, rounding=rounding))
    for q in m.modules():
        if isinstance(q, QLinear) and rounding == "gptq":
            step = q.w_quant.step().detach()
            assert torch.equal(q.weight, torch.round(q.weight / step[:, None]) * step[:, None])
    _check_fake_equals_packed(m, soniq.convert(m), x[:37])


def test_per_token_dynamic_activations_fake_equals_packed():
    """With QATConfig(a_dynamic="token") the GPTQ inputs are quantized per token, as packed."""
    x, batches = _data()
    m = quantize(_mlp(), batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0,
                                            qat_options=(("a_dynamic", "token"),)))
    _check_fake_equals_packed(m, soniq.convert(m), x[:37])


def _outlier_data(n=384, k=48):
    """Correlated inputs with a few outlier columns (what smoothing is for)."""
    x, _ = _data(n=n, k=k)
    x[:, [3, 17, 40]] *= 25.0
    return x, list(x.split(64))


@pytest.mark.parametrize("dynamic", [None, "token"])
@pytest.mark.parametrize("sequential", [True, False])
def test_smoothing_fake_equals_packed_and_factors_come_from_the_calibration(dynamic, sequential):
    """smooth_alpha: every Linear gets s from the largest |x| per column over all calibration
    batches (not only the first); the packed layers apply the same 1/s, so the integer
    accumulators stay equal, also for GPTQ's error-fed codes."""
    from soniq.nn import smooth_factors

    x, batches = _outlier_data()
    float_model = _mlp()
    opts = (("smooth_alpha", 0.5),) + ((("a_dynamic", dynamic),) if dynamic else ())
    m = quantize(copy.deepcopy(float_model), batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0,
                                                                 qat_options=opts, sequential=sequential))
    with torch.no_grad():
        want = smooth_factors(x.abs().amax(0), float_model[0].weight, 0.5)
        first = smooth_factors(batches[0].abs().amax(0), float_model[0].weight, 0.5)
    q0 = m[0]
    assert q0.smooth_alpha == 0.5 and torch.equal(q0.a_smooth, want) and not torch.equal(want, first)
    assert torch.equal(q0.a_inv_smooth, torch.ones_like(want) / want)
    assert all(not torch.equal(q.a_smooth, torch.ones_like(q.a_smooth)) for q in m.modules() if isinstance(q, QLinear))
    packed = soniq.convert(m)
    _check_fake_equals_packed(m, packed, x[:37])
    _check_native_smoothing(packed, x[:37])


def _check_native_smoothing(packed, x):
    """Each smoothed packed Linear's forward (the native plan multiplies by a_inv_smooth in its
    quantize pass where the ISA has layout kernels) equals, bit for bit, x * a_inv_smooth in
    torch fed to the same layer without smoothing, on every ISA path this CPU has."""
    inputs = {}
    layers = {n: p for n, p in packed.named_modules() if isinstance(p, PackedLinear)}
    hooks = [p.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, p in layers.items()]
    with torch.no_grad():
        packed(x)
    for h in hooks:
        h.remove()
    for n, p in layers.items():
        assert p.a_inv_smooth is not None, n
        twin = copy.deepcopy(p)
        twin.a_inv_smooth = None
        for isa in TEST_ISAS:
            with soniq.use_isa(isa), torch.no_grad():
                assert p._fused_plan()[0].smoothed, (n, isa)
                assert torch.equal(p(inputs[n]), twin(inputs[n] * p.a_inv_smooth)), (n, isa)


def test_smoothing_gptq_rounds_the_smoothed_weight():
    """With smoothing GPTQ's codes are those of W * s: the quantizer's rounding of the
    effective weight gives back codes x step, and the layer error on the calibration inputs
    is below round-to-nearest of the same smoothed tiers."""
    x, batches = _outlier_data()
    cfg = dict(w_palette=(2, 4), w_bits_target=3.0, qat_options=(("smooth_alpha", 0.5),), allocation="hessian")
    g = quantize(_mlp(), batches, PTQConfig(**cfg))
    r = quantize(_mlp(), batches, PTQConfig(**cfg, rounding="rtn"))
    q, qr = g[0], r[0]
    assert torch.equal(q.w_quant.bits(), qr.w_quant.bits())
    step = q.w_quant.step().detach()[:, None]
    w = q.effective_weight().detach()
    assert torch.allclose(w, torch.round(w / step) * step, rtol=1e-6, atol=0)
    with torch.no_grad():
        ref = x @ _mlp()[0].weight.T
        err = [float((qq.quantizer_input(x) @ qq.quantized_weight().T - ref).pow(2).mean()) for qq in (q, qr)]
    assert err[0] < err[1]


def test_conv_model_gptq_fake_equals_packed():
    torch.manual_seed(5)
    x = torch.randn(96, 3, 8, 8)
    m = quantize(_convnet(), list(x.split(32)), PTQConfig(w_palette=(2, 4), w_bits_target=3.0))
    assert sum(isinstance(q, QConv2d) for q in m.modules()) == 2
    _check_fake_equals_packed(m, soniq.convert(m), x[:5])


def test_gptq_beats_rtn_on_the_model_output_mixed_and_uniform():
    x, batches = _data()
    ref = _mlp()(x).detach()

    def err(**kw):
        m = quantize(_mlp(), batches, PTQConfig(a_palette=(8, 8), **kw))
        with torch.no_grad():
            return float(((m(x) - ref) ** 2).mean())

    for pal, tgt in (((2, 4), 3.0), ((3, 3), 3.0)):
        assert err(w_palette=pal, w_bits_target=tgt, rounding="gptq") < err(w_palette=pal, w_bits_target=tgt,
                                                                             rounding="rtn"), pal


def test_float_target_undoes_a_linear_input_distortion():
    """Inputs the quantized model feeds a layer that are a linear map A of the float inputs
    (f = r A) are undone by W' = W A^T; undistorted inputs leave W as it is."""
    from soniq.ptq import _float_target

    g = torch.Generator().manual_seed(3)
    r = torch.randn(500, 24, generator=g, dtype=torch.float64)
    a = torch.eye(24, dtype=torch.float64) + 0.2 * torch.randn(24, 24, generator=g, dtype=torch.float64)
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    h = r.T @ r / 500
    torch.testing.assert_close(_float_target(w, h, h, 0.01), w)
    torch.testing.assert_close(_float_target(w, h, h @ a, 1e-12), w @ a.T)
    lam = _float_target(w, h, h @ a, 0.5)  # a large damping pulls the target back toward W
    assert float((lam - w).norm()) < float((w @ a.T - w).norm())


@pytest.mark.parametrize("net,shape", [(_mlp, (384, 48)), (_convnet, (96, 3, 8, 8))])
def test_asymmetric_gptq_fits_the_float_output_and_fake_equals_packed(net, shape):
    """Each layer fitted to the float layer's output on the float inputs compensates the
    earlier layers' rounding: the model's output is closer to the float model's than with
    GPTQ on the quantized inputs alone, and the packed model is still exactly the fake one."""
    torch.manual_seed(7)
    x = torch.randn(*shape) if net is _convnet else _data()[0]
    batches = list(x.split(32))
    ref = net()(x).detach()

    def run(asym):
        m = quantize(net(), batches, PTQConfig(w_palette=(2, 4), w_bits_target=2.5, asymmetric=asym))
        with torch.no_grad():
            return m, float(((m(x) - ref) ** 2).mean())

    m, err_asym = run(True)
    _, err_sym = run(False)
    assert err_asym < 0.9 * err_sym
    _check_fake_equals_packed(m, soniq.convert(m), x[:5])


def test_target_damp_defaults_to_damp_and_is_used():
    x, batches = _data()

    def codes(**kw):
        m = quantize(_mlp(), batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0, asymmetric=True, **kw))
        return [q.weight.detach().clone() for q in m.modules() if isinstance(q, QLinear)]

    same, explicit, far = codes(), codes(target_damp=0.01), codes(target_damp=10.0)
    assert all(torch.equal(a, b) for a, b in zip(same, explicit))
    assert not all(torch.equal(a, b) for a, b in zip(same, far))


def test_asymmetric_names_a_model_that_cannot_be_copied():
    import threading

    m = _mlp()
    m.lock = threading.Lock()  # deepcopy cannot copy a lock
    with pytest.raises(TypeError, match=r"asymmetric=True\) runs a float copy of the model"):
        quantize(m, _data()[1], PTQConfig(w_palette=(2, 4), w_bits_target=3.0, asymmetric=True))


def test_clip_search_keeps_per_channel_the_factor_with_the_least_output_error():
    """Each output channel keeps the clip factor whose GPTQ rounding changes its output least
    on H: never more than the fitted clip's rounding (factor 1 is among those tried), less
    where another factor wins, and the layer's clip is scaled to the factor kept."""
    from soniq.ptq import _round_layer

    x, batches = _data()
    base = quantize(_mlp(), batches, PTQConfig(w_palette=(3, 3), w_bits_target=3.0))
    q = base[2]
    g = torch.Generator().manual_seed(5)
    w2 = torch.randn(*q.weight.shape, generator=g, dtype=torch.float64) * q.w_quant.step().detach().double()[:, None] * 2
    r = torch.randn(500, w2.shape[1], generator=g, dtype=torch.float64) @ torch.randn(w2.shape[1], w2.shape[1],
                                                                                      generator=g, dtype=torch.float64)
    h = r.T @ r / 500
    w2[0] = 0.0  # every factor rounds a row of zeros exactly: the tie keeps the fitted clip
    step0 = q.w_quant.step().detach().double().clone()
    plain = _round_layer(copy.deepcopy(q), w2, h, PTQConfig(w_palette=(3, 3), w_bits_target=3.0))
    factors = (0.7, 0.85, 1.15, 1.3)  # 1.0 joins them
    qs = copy.deepcopy(q)
    found = _round_layer(qs, w2, h, PTQConfig(w_palette=(3, 3), w_bits_target=3.0, clip_search=factors))
    pick = (qs.w_quant.step().detach().double() / step0)
    near = torch.stack([torch.isclose(pick, torch.full_like(pick, f), rtol=1e-6) for f in factors + (1.0,)]).any(0)
    assert bool(near.all()), pick
    assert float(pick[0]) == 1.0
    e_plain = h_error(w2, plain * step0[:, None], h)
    e_found = h_error(w2, found * (step0 * pick)[:, None], h)
    assert bool((e_found <= e_plain * (1 + 1e-6)).all())
    assert float(e_found.sum()) < 0.97 * float(e_plain.sum())
    assert int((pick.sub(1).abs() > 1e-6).sum()) > 0


@pytest.mark.parametrize("stack", [1, 2, 3, 100])
def test_clip_search_rounds_factors_stacked_as_one_at_a_time(monkeypatch, stack):
    """The clip search rounds its factors' copies of the weight as rows of one GPTQ call (in
    chunks of `stack` factors here): the codes and clips are those of one call per factor."""
    import soniq.ptq as sp
    from soniq._gptq import gptq_codes

    x, batches = _data()
    q = quantize(_mlp(), batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0))[0]
    g = torch.Generator().manual_seed(11)
    w2 = torch.randn(*q.weight.shape, generator=g, dtype=torch.float64) * q.w_quant.step().detach().double()[:, None] * 3
    r = torch.randn(300, w2.shape[1], generator=g, dtype=torch.float64)
    h = r.T @ r / 300
    cfg = PTQConfig(w_palette=(2, 4), w_bits_target=3.0, clip_search=(0.7, 0.9, 1.1, 1.3))
    step, bits = q.w_quant.step().detach(), q.w_quant.bits().detach()
    one = {f: gptq_codes(w2, h, step * f, bits) for f in cfg.clip_search}
    e = {f: h_error(w2, c * (step.double() * f)[:, None], h) for f, c in one.items()}
    errs = torch.stack([e[f] for f in cfg.clip_search])
    monkeypatch.setattr(sp, "_STACK_ELEMS", stack * w2.numel())
    qs = copy.deepcopy(q)
    found = sp._round_layer(qs, w2, h, cfg)
    pick = (qs.w_quant.step().detach().double() / step.double())
    for row in range(w2.shape[0]):  # the factor of least error (the first of equal ones: 1.0 is tried first)
        f = min(cfg.clip_search, key=lambda f: (float(errs[cfg.clip_search.index(f), row]), f != 1.0))
        assert torch.equal(found[row], one[f][row]), (row, f)
        assert abs(float(pick[row]) - f) < 1e-6, (row, f, float(pick[row]))


@pytest.mark.parametrize("net,shape", [(_mlp, (384, 48)), (_convnet, (96, 3, 8, 8))])
def test_clip_search_fake_equals_packed_and_moves_clips(net, shape):
    torch.manual_seed(7)
    x = torch.randn(*shape) if net is _convnet else _data()[0]
    batches = list(x.split(32))
    cfg = dict(w_palette=(2, 4), w_bits_target=3.0, asymmetric=True, qat_options=(("a_dynamic", "token"),)
               if net is _mlp else ())
    plain = quantize(net(), batches, PTQConfig(**cfg))
    m = quantize(net(), batches, PTQConfig(clip_search=(0.8, 0.9, 1.0, 1.1, 1.2), **cfg))
    qs = [q for q in m.modules() if isinstance(q, (QLinear, QConv2d))]
    ps = [q for q in plain.modules() if isinstance(q, (QLinear, QConv2d))]
    moved = sum(int((a.w_quant.clip != b.w_quant.clip).sum()) for a, b in zip(qs, ps))
    assert moved > 0
    for q in qs:  # the kept codes survive the quantizer's rounding at the moved clips
        step = q.w_quant.step().detach()
        w = q.effective_weight().detach().reshape(step.shape[0], -1)
        assert torch.equal(w, torch.round(w / step[:, None]) * step[:, None])
    _check_fake_equals_packed(m, soniq.convert(m), x[:5])


class _Amplified(nn.Module):
    """Two identical-looking branches; the model output scales the first by 100."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        return torch.cat([100 * self.a(x), self.b(x)], 1)


def test_measured_gains_give_the_amplified_layer_the_high_tier():
    _, batches = _data(k=32)
    hess = quantize(_Amplified(), batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0, allocation="hessian",
                                                     rounding="rtn"))
    meas = quantize(_Amplified(), batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0, rounding="rtn"))
    assert abs(float(hess.a.w_quant.bits().mean()) - float(hess.b.w_quant.bits().mean())) <= 0.2
    assert float(meas.a.w_quant.bits().mean()) == 4.0 and float(meas.b.w_quant.bits().mean()) == 2.0
    g = meas._soniq_ptq["layer_gains"]
    assert g["a"] > 1000 * g["b"]


@pytest.mark.parametrize("kw,match", [
    (dict(w_palette=(4,)), "w_palette must be two"),
    (dict(w_palette=(5, 8)), "low tier in 1..4"),
    (dict(w_palette=(2, 3)), "low tier in 1..4"),
    (dict(w_palette=(2, 4), w_bits_target=1.5), "budget cannot be met: w_bits_target"),
    (dict(a_bits_target=float("nan")), "a_bits_target must be a finite number"),
    (dict(rounding="awq"), "rounding must be"),
    (dict(allocation="random"), "allocation must be"),
    (dict(damp=0.0), "damp must be in"),
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(gain_batches=1.5), "gain_batches must be a positive integer"),
    (dict(sequential="yes"), "sequential must be True or False"),
    (dict(asymmetric=1), "asymmetric must be True or False"),
    (dict(asymmetric=True, rounding="rtn"), "asymmetric=True needs rounding='gptq' and sequential=True"),
    (dict(asymmetric=True, sequential=False), "asymmetric=True needs rounding='gptq' and sequential=True"),
    (dict(exclude="fc1"), "exclude must be a tuple"),
    (dict(asymmetric=True, target_damp=0.0), "target_damp must be None"),
    (dict(asymmetric=True, target_damp="0.1"), "target_damp must be None"),
    (dict(target_damp=0.1), "target_damp is the damping of asymmetric GPTQ's target: it needs asymmetric=True"),
    (dict(clip_search="0.9"), r"clip_search must be a tuple of factors of the fitted clip in \[0.1, 10\]"),
    (dict(clip_search=(0.9, 0.0)), "clip_search must be a tuple of factors"),
    (dict(clip_search=(0.9, 1e-4)), "clip_search must be a tuple of factors"),
    (dict(clip_search=(True,)), "clip_search must be a tuple of factors"),
    (dict(clip_search=(float("inf"),)), "clip_search must be a tuple of factors"),
    (dict(clip_search=(float("nan"),)), "clip_search must be a tuple of factors"),
    (dict(clip_search=0.9), "clip_search must be a tuple of factors"),
    (dict(clip_search=(0.9, 1.0), rounding="rtn"), "clip_search needs rounding='gptq'"),
    (dict(qat_options=(("w_palette", (2, 4)),)), "qat_options cannot set"),
    (dict(qat_options=(("smooth_alpha", 1.5),)), "smooth_alpha must be a number in"),
    (dict(qat_options=(("smooth_alpha", "0.5"),)), "smooth_alpha must be a number in"),
    (dict(qat_options=(("smooth_alpha", 0.5),), reconstruct_blocks=("0",), reconstruct_steps=1),
     "smooth_alpha and reconstruct_steps"),
    (dict(reconstruct_steps=10), "needs reconstruct_blocks"),
    (dict(reconstruct_blocks="0"), "reconstruct_blocks must be a tuple"),
    (dict(reconstruct_blocks=("a", "a.b")), "non-nested"),
    (dict(reconstruct_blocks=("a",), reconstruct_steps=-1), "reconstruct_steps must be"),
    (dict(reconstruct_lr=float("inf")), "reconstruct_lr must be"),
    (dict(reconstruct_float_lr=-1.0), "reconstruct_float_lr must be"),
    (dict(bias_correction=1), "bias_correction must be True or False"),
    (dict(bias_correction_batches=-1), "bias_correction_batches must be an integer >= 0"),
    (dict(bias_correction_batches=2.0), "bias_correction_batches must be an integer >= 0"),
    (dict(w_palette=(True, 4)), "w_palette must be two integer bit widths"),
    (dict(qat_options=(("foo", 1),)), "qat_options: .*unexpected keyword argument 'foo'"),
    (dict(qat_options=(("a_dynamic", "row"),)), "a_dynamic must be None"),
    (dict(tier_group=0), "tier_group must be 1 .per channel. or a multiple of 8"),
    (dict(tier_group=12), "tier_group must be 1 .per channel. or a multiple of 8"),
    (dict(tier_group=8.0), "tier_group must be 1 .per channel. or a multiple of 8"),
    (dict(tier_group=True), "tier_group must be 1 .per channel. or a multiple of 8"),
    (dict(qat_options=(("tier_group", 8),)), r"qat_options cannot set \['tier_group'\]"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        PTQConfig(**kw)


def test_config_is_a_frozen_value():
    c = PTQConfig(w_palette=[2, 4], w_bits_target=3)
    assert c.w_palette == (2, 4) and c == PTQConfig(w_palette=(2, 4), w_bits_target=3)
    n = PTQConfig(w_palette=(np.int64(2), np.int32(4)), w_bits_target=np.float32(3.0))  # numpy numbers too
    assert n == c and type(n.w_palette[0]) is int and type(n.w_bits_target) is float
    with pytest.raises(Exception):
        c.rounding = "rtn"
    assert PTQConfig(clip_search=[1.1, 0.9, 1.1, np.float32(1.0)]).clip_search == (0.9, 1.0, 1.1)
    assert PTQConfig(clip_search=(f for f in (1.2, 0.8))).clip_search == (0.8, 1.0, 1.2)  # 1.0 always tried
    assert PTQConfig(clip_search=()).clip_search == ()


def test_quantize_errors():
    _, batches = _data()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        quantize("model", batches)
    with pytest.raises(TypeError, match="config must be a soniq.ptq.PTQConfig"):
        quantize(_mlp(), batches, soniq.qat.QATConfig())
    with pytest.raises(TypeError, match="calib_batches must be a list"):
        quantize(_mlp(), batches[0])
    with pytest.raises(ValueError, match="calib_batches is empty"):
        quantize(_mlp(), [])
    with pytest.raises(ValueError, match="no nn.Linear / nn.Conv2d layer"):
        quantize(nn.Sequential(nn.GELU()), batches)
    prepared = soniq.qat.prepare(_mlp(), soniq.qat.QATConfig())
    with pytest.raises(ValueError, match="already holds soniq"):
        quantize(prepared, batches)
    with pytest.raises(ValueError, match="never reach layers"):
        quantize(_mlp(), batches, forward=lambda m, b: m[0](b))
    with pytest.raises(ValueError, match="reconstruct_blocks: the model has no module 'blk'"):
        quantize(_mlp(), batches, PTQConfig(reconstruct_blocks=("blk",), reconstruct_steps=1))
    with pytest.raises(ValueError, match="groups=1 .*exclude it to keep it in float"):
        quantize(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), [torch.randn(2, 4, 6, 6)])
    bad = [b.clone() for b in batches[:2]]
    bad[1][3, 5] = float("nan")
    with pytest.raises(ValueError, match="calibration batch 1: the input of layer '0' holds NaN or inf"):
        quantize(_mlp(), bad)


def test_a_layer_ptq_cannot_pack_stays_float_when_excluded():
    """A grouped Conv2d is refused unless excluded; excluded, the model quantizes around it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(36, 2))
    q = quantize(m, [torch.randn(8, 4, 5, 5) for _ in range(2)], PTQConfig(exclude=("0",)))
    assert type(q[0]) is nn.Conv2d and isinstance(q[2], QLinear)


def test_exclude_keeps_layers_in_float_and_convert_packs_the_rest():
    x, batches = _data()
    m = quantize(_mlp(), batches, PTQConfig(w_palette=(4, 8), w_bits_target=4.5, exclude=("last",)))
    assert type(m[4]) is nn.Linear and isinstance(m[0], QLinear)
    p = soniq.convert(m)
    assert type(p[4]) is nn.Linear and isinstance(p[0], PackedLinear)
    with torch.no_grad():
        torch.testing.assert_close(p(x[:9]), m(x[:9]), rtol=1e-3, atol=1e-3)


def test_quantize_does_not_touch_a_copy_and_is_deterministic():
    x, batches = _data()
    a = quantize(_mlp(), batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0))
    b = quantize(copy.deepcopy(_mlp()), batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0))
    for qa, qb in zip(a.modules(), b.modules()):
        if isinstance(qa, QLinear):
            assert torch.equal(qa.weight, qb.weight) and torch.equal(qa.w_quant.bits(), qb.w_quant.bits())


def _blocks_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48)), nn.GELU(),
                         nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 12)))


@pytest.mark.parametrize("float_lr", [0.0, 1e-3])
def test_block_reconstruction_lowers_block_error_and_fake_equals_packed(float_lr):
    """Each block's calibration error against the float block output goes down (measured
    here independently of the report), the weights stay codes x step on the frozen tiers
    (with float_lr the biases move too), and the packed model computes the fake-quantized
    model's accumulators exactly."""
    torch.set_num_threads(1)
    x, batches = _data()
    ref_net = _blocks_net()
    kw = dict(w_palette=(2, 4), w_bits_target=3.0, qat_options=(("a_dynamic", "token"),))
    base = quantize(_blocks_net(), batches, PTQConfig(**kw))
    rec = quantize(_blocks_net(), batches, PTQConfig(**kw, reconstruct_blocks=("0", "2"), reconstruct_steps=60,
                                                  reconstruct_lr=5e-2, reconstruct_float_lr=float_lr))

    def block_err(m, i):  # block i on the model's own inputs vs the float block on the float inputs
        with torch.no_grad():
            xin_q = m[:i](x) if i else x
            xin_f = ref_net[:i](x) if i else x
            want = ref_net[i](xin_f)
            return float(((m[i](xin_q) - want) ** 2).mean() / (want ** 2).mean())

    for i in (0, 2):
        assert block_err(rec, i) < 0.9 * block_err(base, i), i
        for qb, qr in zip(base[i].modules(), rec[i].modules()):
            if isinstance(qr, QLinear):
                assert torch.equal(qb.w_quant.bits(), qr.w_quant.bits())  # tiers frozen
                step = qr.w_quant.step().detach()
                assert torch.equal(qr.weight, torch.round(qr.weight / step[:, None]) * step[:, None])
                assert torch.equal(qb.bias, qr.bias) == (float_lr == 0)
    before, after = rec._soniq_ptq["reconstruction"]["2"]
    assert after < before
    _check_fake_equals_packed(rec, soniq.convert(rec), x[:37])


def _mean_outputs(model, names, batches):
    got = {n: [] for n in names}
    hs = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: got[n].append(out.detach().double().transpose(0, 1).reshape(out.shape[1], -1)
                                             if out.dim() == 4 else out.detach().double().reshape(-1, out.shape[-1]).T))
        for n in names]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hs:
        h.remove()
    return {n: torch.cat(v, 1).mean(1) for n, v in got.items()}


@pytest.mark.parametrize("net,shape", [(_mlp, (384, 48)), (_convnet, (96, 3, 8, 8))])
@pytest.mark.parametrize("nb", [0, 2])
def test_bias_correction_gives_every_layer_the_float_mean_output(net, shape, nb):
    """After bias correction each quantized layer's mean output over the batches that measured
    it is the float layer's (the first layer's exactly, the later ones measured on the
    corrected layers before them), where plain GPTQ leaves a shift; only biases change, and
    fake == packed holds."""
    torch.manual_seed(3)
    x = torch.randn(*shape) + 0.5  # a mean input: rounding shifts the outputs' means
    batches = list(x.split(32))
    kw = dict(w_palette=(2, 4), w_bits_target=2.5)
    plain = quantize(net(), batches, PTQConfig(**kw))
    fixed = quantize(net(), batches, PTQConfig(**kw, bias_correction=True, bias_correction_batches=nb))
    names = [n for n, m in fixed.named_modules() if isinstance(m, (QLinear, QConv2d))]
    used = batches[:nb] if nb else batches
    ref = _mean_outputs(net(), names, used)
    got, before = _mean_outputs(fixed, names, used), _mean_outputs(plain, names, used)
    for n in names:
        scale = float(ref[n].abs().max())
        assert float((got[n] - ref[n]).abs().max()) <= 1e-5 * scale, n
        assert float((before[n] - ref[n]).abs().max()) > 1e-3 * scale, n
        qf, qp = fixed.get_submodule(n), plain.get_submodule(n)
        assert torch.equal(qf.weight, qp.weight) and not torch.equal(qf.bias, qp.bias)
    assert set(fixed._soniq_ptq["bias_shift"]) == set(names)
    _check_fake_equals_packed(fixed, soniq.convert(fixed), x[:5])


def test_bias_correction_skips_layers_without_a_bias():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 64, bias=False), nn.GELU(), nn.Linear(64, 12))
    x, batches = _data()
    m = quantize(net, batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0, bias_correction=True))
    assert list(m._soniq_ptq["bias_shift"]) == ["2"] and m[0].bias is None


def test_reconstruction_starts_from_the_rounded_codes_on_the_float_weights_side():
    """The two codes a weight chooses between are its rounded code and the grid neighbour on
    its float weight's side (1-bit codes: -1 and +1), both on the grid; the soft start rounds
    to the rounded code."""
    from soniq import _recon

    x, batches = _data()
    float_net = _mlp()
    m = quantize(_mlp(), batches, PTQConfig(w_palette=(1, 4), w_bits_target=2.2))
    seen = set()
    for name, q in m.named_modules():
        if not isinstance(q, QLinear):
            continue
        w = float_net.get_submodule(name).weight.detach()
        base, gap, v, step = _recon._soft_start(q, w)
        c = _recon._codes(q).float()
        bits = q.w_quant.bits().detach().float()[:, None].expand_as(c)
        seen |= set(bits.unique().tolist())
        assert torch.equal(base + gap * (v >= 0).float(), c)
        lo = torch.where(bits == 1, -1.0, -(2 ** (bits - 1)))
        hi = torch.where(bits == 1, 1.0, 2 ** (bits - 1) - 1)
        assert bool((base >= lo).all() and (base + gap <= hi).all())
        other = torch.where(v >= 0, base, base + gap)  # the code not taken at the start
        side = w / step - c
        inner = (c > lo) & (c < hi) & (side.abs() > 1e-3)
        assert bool(((other - c).sign() == side.sign())[inner].all())
    assert seen == {1.0, 4.0}


def test_reconstruction_leaves_the_weight_quantizers_as_they_were():
    from soniq import _recon

    _, batches = _data()
    m = quantize(_mlp(), batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0))
    qs = {n: q for n, q in m.named_modules() if isinstance(q, QLinear)}
    with pytest.raises(RuntimeError, match="inside"):
        with _recon._weights_as_given(qs):
            assert all(q.w_quant(torch.full((2, 2), 0.3)).eq(0.3).all() for q in qs.values())
            raise RuntimeError("inside")
    assert all("forward" not in vars(q.w_quant) for q in qs.values())


def test_conv_block_reconstruction_fake_equals_packed():
    torch.manual_seed(5)
    x = torch.randn(96, 3, 8, 8)
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    m = quantize(net, list(x.split(32)), PTQConfig(w_palette=(2, 4), w_bits_target=3.0, reconstruct_blocks=("0",),
                                                   reconstruct_steps=30, reconstruct_lr=5e-2))
    before, after = m._soniq_ptq["reconstruction"]["0"]
    assert after < before
    _check_fake_equals_packed(m, soniq.convert(m), x[:5])


class _KeywordModel(nn.Module):
    """A model called as model(input_ids=..., mask=...), like Hugging Face's."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.lin = nn.Linear(16, 8)

    def forward(self, input_ids, mask):
        return self.lin(self.emb(input_ids) * mask[..., None])


def test_dict_batches_need_forward_for_keyword_models():
    """A dict batch goes to model(batch) (SentenceTransformer's convention); a model taking
    keyword arguments then fails with a message saying to pass forward=, and works with it."""
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 20, (4, 6)), "mask": torch.ones(4, 6)} for _ in range(2)]
    model = _KeywordModel()
    with pytest.raises(TypeError, match=r"dict batch \(keys \['input_ids', 'mask'\]\).*forward=lambda m, b: m\(\*\*b\)"):
        soniq.ptq.calibrate(model, batches)
    cal = soniq.ptq.calibrate(model, batches, forward=lambda m, b: m(**b))
    assert cal.layer_names == ("lin",)
