"""PTQConfig(row_weighting=...): calibration rows weighted by their effect on the output."""
import pytest
import torch
from torch import nn

import soniq
from soniq import _row_weights, ptq
from soniq.ptq import PTQConfig, quantize
from soniq.nn import QLinear
from test_ptq import _check_fake_equals_packed


class _Tokens(nn.Module):
    """Per-token layers on [B, T, dims[0]]; the output keeps the first `live` tokens, scaled per
    token, so the rest never reach it (as padding under a mean-pooling mask)."""

    def __init__(self, live=3, seed=0, dims=(6, 5, 4)):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(dims[0], dims[1]), nn.Linear(dims[1], dims[2])
        self.live = live
        self.register_buffer("scale", torch.linspace(0.5, 2.0, live))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))[:, :self.live] * self.scale[:, None]


def _batches(seed=1, n=4, b=8, t=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, 6, generator=g) for _ in range(n)]


def _expected(model, x, power):
    """E_z |d(z . y / rms(y)) / d o_t|^2 per row, in closed form (z ~ N(0, I)): layer b's
    output at a live token t gets scale_t^2 * 4 / ms(y); layer a's output gets the tanh
    derivative and b's columns on top of that; rows past `live` get 0."""
    with torch.no_grad():
        y = model(x)
        ms = float(y.pow(2).mean())
        bsz, t = x.shape[:2]
        sc = torch.zeros(bsz, t)
        sc[:, :model.live] = model.scale ** 2
        wb = (sc * 4 / ms).reshape(-1)
        d = 1 - torch.tanh(model.a(x)).pow(2)  # [B, T, 5]
        col = model.b.weight.pow(2).sum(0)  # |b's column k|^2
        wa = (sc[..., None] * d.pow(2) * col / ms).sum(-1).reshape(-1)
    return {"a": wa, "b": wb}


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_row_weights_are_the_expected_output_change_and_zero_for_dead_rows(power):
    model = _Tokens()
    batches = _batches()
    layers = {"a": model.a, "b": model.b}
    got = _row_weights.measure(model, layers, batches, lambda m, x: m(x), None, power, draws=3000)
    exp = {n: [] for n in layers}
    for x in batches:
        for n, w in _expected(model, x, power).items():
            exp[n].append(w)
    for n in layers:
        e = torch.cat(exp[n])
        e = e.pow(power) / e[e > 0].pow(power).mean()
        g = torch.cat(got[n])
        assert g.shape == e.shape
        assert bool((g[e == 0] == 0).all()), "rows that never reach the output must weigh 0"
        torch.testing.assert_close(g[e > 0], e[e > 0], rtol=0.12 * power, atol=0.0)
        assert float(g[e > 0].mean()) == pytest.approx(1.0, rel=1e-5)
    assert not any(p.grad is not None for p in model.parameters()), "measuring must not leave gradients"


def test_row_weights_work_on_frozen_parameters_and_an_output_selection():
    model = _Tokens()
    for p in model.parameters():
        p.requires_grad_(False)
    batches = _batches(n=2)

    def fwd(m, x):
        return {"kept": m(x), "ids": torch.zeros(3, dtype=torch.long), "other": x.sum()}

    got = _row_weights.measure(model, {"a": model.a, "b": model.b}, batches, fwd, lambda o: o["kept"], 1.0, 2)
    w = torch.cat(got["b"]).reshape(-1, 7)
    assert bool((w[:, 3:] == 0).all()) and bool((w[:, :3] > 0).all())
    with pytest.raises(ValueError, match="row_weighting: the model's output .* holds no float tensor"):
        _row_weights.measure(model, {"a": model.a}, batches, fwd, lambda o: o["ids"], 1.0, 1)


def _capture_h(monkeypatch):
    seen = {}
    real = ptq._round_layer

    def spy(q, w2, h, cfg):
        seen.setdefault(id(q), h.clone())
        return real(q, w2, h, cfg)

    monkeypatch.setattr(ptq, "_round_layer", spy)
    return seen


@pytest.mark.parametrize("asym", [False, True])
def test_gptq_sees_the_weighted_moment_of_the_quantized_inputs(monkeypatch, asym):
    """The first layer's H is sum_t w_t r_t r_t^T / T over the rows r its activation quantizer
    makes of the calibration inputs, w the measured row weights."""
    batches = _batches()
    weights = {}
    real = _row_weights.measure

    def keep(*a, **k):
        weights.update(real(*a, **k))
        return weights

    monkeypatch.setattr(_row_weights, "measure", keep)
    seen = _capture_h(monkeypatch)
    cfg = PTQConfig(w_palette=(4, 4), w_bits_target=4.0, row_weighting=0.5, asymmetric=asym)
    m = quantize(_Tokens(), batches, cfg, forward=lambda m, x: m(x))
    q = m.a
    assert isinstance(q, QLinear)
    with torch.no_grad():
        rows = [q.a_quant(q.quantizer_input(x)).reshape(-1, 6).double() for x in batches]
    w = torch.cat(weights["a"]).double()
    r = torch.cat(rows)
    exp = (r * w[:, None]).T @ r / r.shape[0]
    torch.testing.assert_close(seen[id(q)].double(), exp, rtol=1e-5, atol=1e-6)


def test_unit_row_weights_round_exactly_as_unweighted(monkeypatch):
    batches = _batches()
    fwd = lambda m, x: m(x)
    base = quantize(_Tokens(), batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0, asymmetric=True), forward=fwd)

    def ones(model, layers, batches, forward, output, power, draws, seed=0):
        return {n: [torch.ones(x.shape[0] * x.shape[1]) for x in batches] for n in layers}

    monkeypatch.setattr(_row_weights, "measure", ones)
    same = quantize(_Tokens(), batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0, asymmetric=True,
                                                  row_weighting=1.0), forward=fwd)
    for n in ("a", "b"):
        assert torch.equal(getattr(base, n).weight, getattr(same, n).weight)


def test_row_weighting_ignores_dead_rows_and_fake_equals_packed():
    """Rows that never reach the output (here every token past the third) stop steering the
    rounding: the weighted model's error on the output is lower than the unweighted one's when
    the dead rows are large and unlike the live ones; the packed model is the fake one."""
    g = torch.Generator().manual_seed(5)
    k, dims = 24, (24, 32, 16)
    mix_live, mix_dead = torch.randn(k, k, generator=g), torch.randn(k, k, generator=g) * 3
    batches = []
    for _ in range(6):  # dead rows: another, larger distribution (inputs of 0.50-0.64x the error, 4 seeds)
        x = torch.randn(16, 9, k, generator=g) @ mix_live
        x[:, 3:] = torch.randn(16, 6, k, generator=g) @ mix_dead
        batches.append(x)
    fwd = lambda m, x: m(x)
    xs = torch.cat(batches)
    ref = _Tokens(live=3, seed=2, dims=dims)(xs).detach()

    def err(rw):
        m = quantize(_Tokens(live=3, seed=2, dims=dims), batches,
                     PTQConfig(w_palette=(2, 4), w_bits_target=2.5, row_weighting=rw), forward=fwd)
        with torch.no_grad():
            return m, float((m(xs) - ref).pow(2).mean())

    m, e_w = err(1.0)
    _, e_u = err(0.0)
    assert e_w < 0.8 * e_u
    p = soniq.convert(m)
    with torch.no_grad():
        torch.testing.assert_close(p(xs[:4]), m(xs[:4]), rtol=1e-5, atol=1e-5)
    # per layer, exact accumulators: the per-token layers on the tokens as 2-D rows
    _check_fake_equals_packed(nn.Sequential(m.a, nn.Tanh(), m.b), nn.Sequential(p.a, nn.Tanh(), p.b),
                              xs[:4].reshape(-1, k))


@pytest.mark.parametrize("kw,match", [
    (dict(row_weighting=-0.5), r"row_weighting must be a number in \[0, 4\]"),
    (dict(row_weighting=float("nan")), r"row_weighting must be a number in \[0, 4\]"),
    (dict(row_weighting=True), r"row_weighting must be a number in \[0, 4\]"),
    (dict(row_weighting="1"), r"row_weighting must be a number in \[0, 4\]"),
    (dict(row_weighting=1.0, rounding="rtn"), "row_weighting > 0 needs rounding='gptq' and sequential=True"),
    (dict(row_weighting=1.0, sequential=False), "row_weighting > 0 needs rounding='gptq' and sequential=True"),
    (dict(row_weight_draws=0), "row_weight_draws must be a positive integer"),
    (dict(row_weight_draws=2.0), "row_weight_draws must be a positive integer"),
])
def test_row_weighting_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        PTQConfig(**kw)


def test_output_must_be_callable():
    with pytest.raises(TypeError, match="output must be a function of the model's output"):
        quantize(_Tokens(), _batches(), PTQConfig(row_weighting=1.0), forward=lambda m, x: m(x), output="kept")


def test_conv_rows_are_output_positions_and_fake_equals_packed():
    """Conv2d rows are (image, output position) patches: a model whose output reads only the
    top-left output positions gives the other patches weight 0, and the row-weighted model
    packs to the same outputs."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1))
    fwd = lambda m, x: m(x)[:, :, :2, :2]
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    got = _row_weights.measure(net, {"0": net[0], "2": net[2]}, batches, fwd, None, 1.0, 2)
    w2 = torch.cat(got["2"]).reshape(-1, 4, 4)  # the second conv's 4 x 4 output positions
    assert bool((w2[:, 2:, :] == 0).all()) and bool((w2[:, :, 2:] == 0).all()) and bool((w2[:, :2, :2] > 0).all())
    w0 = torch.cat(got["0"]).reshape(-1, 8, 8)  # the first conv: only what the kept outputs see
    assert bool((w0[:, 5:, :] == 0).all()) and bool((w0[:, :4, :4] > 0).any())
    m = quantize(net, batches, PTQConfig(w_palette=(2, 4), w_bits_target=3.0, row_weighting=0.5), forward=fwd)
    _check_fake_equals_packed(m, soniq.convert(m), torch.randn(2, 3, 8, 8))
