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
