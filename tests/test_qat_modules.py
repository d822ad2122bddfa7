"""QATConfig / prepare / bit_penalty / freeze_precision / precision_report and bad input."""
import pytest
import torch
from torch import nn

import soniq
from soniq.nn import QConv2d, QLinear
from soniq.qat import QATConfig


def _net():
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def _prepared(cfg=None):
    torch.manual_seed(0)
    m = soniq.qat.prepare(_net(), cfg or QATConfig(w_palette=(1, 4), a_palette=(2, 8)))
    m(torch.randn(8, 1, 8, 8))  # calibrates the activation quantizers
    return m


def test_prepare_swaps_and_excludes():
    m = soniq.qat.prepare(_net(), QATConfig(exclude=("first", "last")))
    assert type(m[0]) is nn.Conv2d and isinstance(m[2], QConv2d) and type(m[5]) is nn.Linear
    m = soniq.qat.prepare(_net(), QATConfig())
    assert isinstance(m[0], QConv2d) and isinstance(m[5], QLinear)
    with pytest.raises(ValueError, match="not Linear/Conv2d layers"):
        soniq.qat.prepare(_net(), QATConfig(exclude=("nope",)))
    with pytest.raises(ValueError, match="'0'.*groups=1"):
        soniq.qat.prepare(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), QATConfig())


def test_init_keeps_the_float_model_close():
    torch.manual_seed(0)
    f = _net()
    x = torch.rand(16, 1, 8, 8)
    ref = f(x)
    import copy
    m = soniq.qat.prepare(copy.deepcopy(f), QATConfig(w_palette=(4, 8), a_palette=(4, 8), w_bits_target=8, a_bits_target=8, init_w_bits=8, init_a_bits=8))
    soniq.qat.set_uniform_precision(m, 8, 8)
    assert (m(x) - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("kw, match", [
    (dict(w_palette=(5, 8)), "low tier must be in 1..4"),
    (dict(a_palette=(2, 9)), "high tier"),
    (dict(w_palette=(2.0, 4)), "two integer bit widths"),
    (dict(w_bits_target=1.5), "budget cannot be met"),
    (dict(penalty_weight=-1.0), "penalty_weight"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        QATConfig(**kw)


def test_penalty_and_freeze_respect_budget():
    cfg = QATConfig(w_palette=(1, 4), a_palette=(2, 8), w_bits_target=2.0, a_bits_target=4.0, penalty_weight=3.0)
    m = _prepared(cfg)
    rep = soniq.qat.precision_report(m)
    assert rep["avg_w_bits"] > 2.0  # starts mid-palette, over budget
    pen = soniq.qat.bit_penalty(m)
    assert float(pen.detach()) > 0
    pen.backward()
    assert all(float(q.bits_logit.grad.min()) >= 0 and float(q.bits_logit.grad.max()) > 0
               for l in soniq.qat.quant_layers(m).values() for q in (l.w_quant, l.a_quant))
    soniq.qat.freeze_precision(m)
    rep = soniq.qat.precision_report(m)
    assert rep["avg_w_bits"] <= 2.0 + 1e-6 and rep["avg_a_bits"] <= 4.0 + 1e-6
    assert rep["avg_w_bits"] > 1.5  # the budget is used, not wasted
    for name, layer in rep["layers"].items():
        assert set(layer["w_bits"]["hist"]) <= {1, 4} and set(layer["a_bits"]["hist"]) <= {2, 8}
        assert layer["phase"] == 2
    assert float(soniq.qat.bit_penalty(m)) == 0.0
    m(torch.randn(2, 1, 8, 8)).sum().backward()  # phase 2 trains


def test_precision_report_of_a_layer():
    m = _prepared()
    p = m[0].precision()
    assert p["type"] == "QConv2d" and p["phase"] == 1 and p["w_bits"]["channels"] == 6
    assert not p["a_signed"] or p["a_signed"]  # decided by calibration


def test_nan_scale_names_the_module():
    m = _prepared()
    with torch.no_grad():
        m[2].w_quant.clip[0] = float("nan")
    with pytest.raises(ValueError, match=r"2\.weight: quantization scale"):
        m(torch.randn(2, 1, 8, 8))


def test_freeze_needs_calibration_and_a_prepared_model():
    m = soniq.qat.prepare(_net(), QATConfig())
    with pytest.raises(ValueError, match="seen no data"):
        soniq.qat.freeze_precision(m)
    with pytest.raises(ValueError, match="not prepared"):
        soniq.qat.freeze_precision(_net())
    with pytest.raises(ValueError, match="outside the palette"):
        m[0].w_quant.freeze(torch.full((6,), 3.0))


def test_size_budget_in_bytes():
    m = _prepared(QATConfig(w_palette=(1, 4), a_palette=(2, 8), size_bytes_target=1000.0, w_bits_target=4.0))
    n_w = sum(l.weight.numel() for l in soniq.qat.quant_layers(m).values())
    soniq.qat.freeze_precision(m)
    assert soniq.qat.precision_report(m)["w_bytes"] <= 1000.0
    m = _prepared(QATConfig(w_palette=(2, 4), a_palette=(2, 8), size_bytes_target=n_w / 8))
    with pytest.raises(ValueError, match="budget cannot be met: size_bytes_target"):
        soniq.qat.freeze_precision(m)


def test_direct_construction_and_cli_wiring():
    lin = QLinear(6, 3, w_palette=(2, 4), a_palette=(4, 8))
    y = lin(torch.randn(2, 5, 6))  # any leading dims; channels on the last axis
    assert y.shape == (2, 5, 3) and lin.precision()["a_bits"]["channels"] == 6
    conv = QConv2d(3, 4, 3, padding=1)
    assert conv(torch.rand(1, 3, 5, 5)).shape == (1, 4, 5, 5)
    with pytest.raises(ValueError, match="groups=1"):
        QConv2d(4, 4, 3, groups=4)
    from soniq.cli import build_parser
    args = build_parser().parse_args(["demo", "digits", "--quick", "--seeds", "2", "--out", "/tmp/x"])
    assert args.quick and args.seeds == 2 and args.out == "/tmp/x"


def test_smoothing_keeps_the_float_product_and_shrinks_outlier_channels():
    import soniq
    from soniq.qat import QATConfig

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(64, 16)
    x[:, 3] *= 50.0  # an outlier input channel
    m = soniq.qat.prepare(torch.nn.Sequential(lin), QATConfig(smooth_alpha=0.5))
    q = m[0]
    q(x)
    assert float(q.a_smooth[3]) > 5 * float(q.a_smooth.median())
    xs, ws = q.quantizer_input(x), q.effective_weight()
    torch.testing.assert_close(xs @ ws.T, x @ lin.weight.T, rtol=1e-4, atol=1e-4)
    assert float(xs.abs().amax(0).max() / xs.abs().amax(0).median()) < float(x.abs().amax(0).max() /
                                                                              x.abs().amax(0).median())


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "half", float("nan")])
def test_smoothing_alpha_is_checked(alpha):
    from soniq.qat import QATConfig

    with pytest.raises(ValueError, match="smooth_alpha"):
        QATConfig(smooth_alpha=alpha)


@pytest.mark.parametrize("dynamic", [None, "token"])
def test_calibration_skips_non_finite_values_and_refuses_none(dynamic):
    """The first batch sets the activation clips from its finite values only (a NaN or inf
    there used to make a clip NaN for good); a batch with none (empty, all NaN) is refused and
    leaves the layer uncalibrated, so a later batch still calibrates it."""
    cfg = QATConfig(w_palette=(2, 4), a_palette=(4, 8), a_dynamic=dynamic)
    torch.manual_seed(0)
    x = torch.randn(8, 32)
    clean = soniq.qat.prepare(nn.Sequential(nn.Linear(32, 16)), cfg)
    clean(x)
    bad = x.clone()
    bad[0, 0], bad[1, 1], bad[2, 2] = float("nan"), float("inf"), -float("inf")
    m = soniq.qat.prepare(nn.Sequential(nn.Linear(32, 16)), cfg)
    m[0].load_state_dict(clean[0].state_dict())
    m[0].a_quant.calibrated.fill_(False)
    m(bad)
    clip = float(m[0].a_quant.clip.detach())
    assert 0 < clip < float("inf") and bool(m[0].a_quant.calibrated)
    assert torch.isfinite(m(x)).all()
    for none in (torch.empty(0, 32), torch.full((4, 32), float("nan"))):
        u = soniq.qat.prepare(nn.Sequential(nn.Linear(32, 16)), cfg)
        with pytest.raises(ValueError, match="0.input: cannot calibrate .* no finite values"):
            u(none)
        assert not bool(u[0].a_quant.calibrated)
        u(x)
        assert torch.equal(u[0].a_quant.clip.detach(), clean[0].a_quant.clip.detach())


def test_half_precision_inputs_fake_quantize_in_float32():
    """float16 / bfloat16 inputs (torch.autocast, model.half()) are quantized in float32 and
    handed back in their dtype: the float32 result rounded to it; training under autocast runs."""
    for dynamic in (None, "token"):
        m = soniq.qat.prepare(nn.Sequential(nn.Linear(32, 16)), QATConfig(w_palette=(2, 4), a_palette=(4, 8),
                                                                          a_dynamic=dynamic))
        layer = m[0]
        x = torch.randn(8, 32)
        layer(x)  # calibrated
        soniq.qat.freeze_precision(m)
        for dt in (torch.float16, torch.bfloat16):
            xh = x.to(dt)
            got = layer.a_quant(xh)
            assert got.dtype == dt and torch.equal(got, layer.a_quant(xh.float()).to(dt))
    m = _prepared()
    x = torch.rand(4, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and m[5].weight.grad is not None and torch.isfinite(m[5].weight.grad).all()


def test_a_layer_used_at_several_places_is_refused():
    """One module object at two places would be swapped at its first only (a float copy left at
    the other): refused before anything changes, unless excluded (then float at both)."""
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.raises(ValueError, match="'0' is one layer used at several places \\(\\['0', '2'\\]\\)"):
        soniq.qat.prepare(model, QATConfig())
    assert model[0] is lin and model[2] is lin
    soniq.qat.prepare(model, QATConfig(exclude=("0",)))
    assert model[0] is lin and model[2] is lin
