"""QATConfig is a value: immutable, and one config prepares, calibrates, freezes and converts
any number of models (the phase and the calibration live on each model)."""
import dataclasses

import pytest
import torch
from torch import nn

import soniq
from soniq.qat import QATConfig


def _mlp():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


def _run(model, cfg, x):
    soniq.qat.prepare(model, cfg)
    torch.manual_seed(1)  # phase-1 noise of the calibration pass (the 2nd layer calibrates on noisy input)
    model(x)
    soniq.qat.freeze_precision(model)
    return soniq.convert(model.eval())


def test_config_is_frozen():
    cfg = QATConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.w_bits_target = 3.0
    assert QATConfig(exclude=["first"]).exclude == ("first",)
    assert QATConfig(w_palette=[1, 4]).w_palette == (1, 4)
    with pytest.raises(ValueError, match="seed"):
        QATConfig(seed=-1)


def test_one_config_prepares_two_models_exactly():
    cfg = QATConfig(w_palette=(1, 4), a_palette=(2, 8), w_bits_target=2.0, a_bits_target=4.0)
    before = dataclasses.asdict(cfg)
    torch.manual_seed(0)
    base = _mlp()
    x = torch.randn(32, 12)
    m1, m2 = _mlp(), _mlp()
    m1.load_state_dict(base.state_dict())
    m2.load_state_dict(base.state_dict())
    p1 = _run(m1, cfg, x)
    assert dataclasses.asdict(cfg) == before  # nothing was written into the config
    # the second model starts in phase 1 with uncalibrated quantizers, as the first did
    soniq.qat.prepare(m2, cfg)
    assert all(q.phase == 1 and not bool(q.a_quant.calibrated) for q in soniq.qat.quant_layers(m2).values())
    torch.manual_seed(1)
    m2(x)
    soniq.qat.freeze_precision(m2)
    p2 = soniq.convert(m2.eval())
    with torch.no_grad():
        assert torch.equal(p1(x), p2(x))
    for k, v in p1.state_dict().items():
        assert torch.equal(v, p2.state_dict()[k]), k
    # the first model is untouched by preparing the second: still phase 2, still exact
    assert all(q.phase == 2 for q in soniq.qat.quant_layers(m1).values())


@pytest.mark.parametrize("kw,msg", [
    (dict(exclude="first"), r"exclude must be a tuple of module names.*for one name write \('first',\)"),
    (dict(exclude=None), "exclude must be a tuple"),
    (dict(penalty_weight="1"), "penalty_weight must be a finite number"),
    (dict(penalty_weight=float("inf")), "penalty_weight must be a finite number"),
    (dict(penalty_weight=True), "penalty_weight must be a finite number"),
    (dict(w_bits_target=True), "w_bits_target must be a finite number"),
    (dict(size_bytes_target=0), "size_bytes_target must be a positive number"),
    (dict(size_bytes_target="big"), "size_bytes_target must be a finite number"),
    (dict(init_w_bits=100), r"init_w_bits must lie in the palette \(2, 4\)"),
    (dict(init_w_bits=0), r"init_w_bits must lie in the palette \(2, 4\)"),
    (dict(init_a_bits="3"), "init_a_bits must be a finite number"),
    (dict(w_palette=(True, 4)), "w_palette must be two integer bit widths"),
    (dict(tier_group=0), "tier_group must be 1 .per channel. or a multiple of 8"),
    (dict(tier_group=4), "tier_group must be 1 .per channel. or a multiple of 8"),
    (dict(tier_group=2.5), "tier_group must be 1 .per channel. or a multiple of 8"),
])
def test_config_refuses_bad_values_naming_them(kw, msg):
    with pytest.raises(ValueError, match=msg):
        QATConfig(**kw)


def test_config_takes_numpy_integers():
    np = pytest.importorskip("numpy")
    assert QATConfig(w_palette=(np.int64(2), np.int32(4))).w_palette == (2, 4)


def test_prepare_refuses_what_it_cannot_do_right():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        soniq.qat.prepare("net", QATConfig())
    m = soniq.qat.prepare(_mlp(), QATConfig())
    with pytest.raises(ValueError, match="already prepared by soniq.qat.prepare"):
        soniq.qat.prepare(m, QATConfig())
    with pytest.raises(ValueError, match="all zeros"):  # a clip of ~0 would saturate every later input
        m(torch.zeros(3, 12))
    m(torch.randn(3, 12))  # nothing was calibrated by the refused batch: real data still can
    soniq.qat.freeze_precision(m)
    with pytest.raises(ValueError, match="already in phase 2"):  # would refit the clips phase 2 learned
        soniq.qat.freeze_precision(m)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        soniq.qat.precision_report([m])
    with pytest.raises(ValueError, match="weight must be a finite number"):
        soniq.qat.bit_penalty(m, weight="a")
    with pytest.raises(ValueError, match="weight must be >= 0"):
        soniq.qat.bit_penalty(m, weight=-1)


def test_prepare_a_single_layer_model():
    """The model is one Linear: its quantized copy is returned (no parent to swap it in)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    q = soniq.qat.prepare(lin, QATConfig())
    assert isinstance(q, soniq.nn.QLinear) and type(lin) is nn.Linear
    x = torch.randn(5, 16)
    q(x)
    soniq.qat.freeze_precision(q)
    assert soniq.qat.precision_report(q)["layers"].keys() == {""}
    p = soniq.convert(q)
    with torch.no_grad():
        torch.testing.assert_close(p(x), q(x), rtol=1e-5, atol=1e-5)


def test_unbatched_conv_input_as_nn_conv2d():
    """[C, H, W] is one sample, as nn.Conv2d takes it: channels stay on their axis (they used
    to be read as the batch, quantizing the wrong axis)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1))
    m = soniq.qat.prepare(net, QATConfig(a_palette=(2, 8), a_bits_target=5.0))
    x = torch.randn(4, 3, 3, 8)
    m(x)
    soniq.qat.freeze_precision(m)
    with torch.no_grad():
        assert torch.equal(m(x[1]), m(x[1:2])[0])
        p = soniq.convert(m)
        assert torch.equal(p(x[1]), p(x[1:2])[0])
    with pytest.raises(ValueError, match=r"expected input \[B, 3, H, W\] or \[3, H, W\]"):
        m(torch.randn(2, 4, 8))


def test_freeze_precision_refused_for_no_data_can_be_retried():
    """The calibration check runs before anything is frozen: after the forward pass the error
    asks for, freeze_precision works (it used to leave the weights in phase 2 and refuse)."""
    m = soniq.qat.prepare(_mlp(), QATConfig())
    with pytest.raises(ValueError, match="have seen no data"):
        soniq.qat.freeze_precision(m)
    assert all(q.phase == 1 for q in soniq.qat.quant_layers(m).values())
    m(torch.randn(3, 12))
    soniq.qat.freeze_precision(m)
    assert all(q.phase == 2 for q in soniq.qat.quant_layers(m).values())


def test_freeze_precision_by_tier_groups():
    """tier_group=8: freeze_precision gives every 8 consecutive output channels one tier (the
    5-wide layer is one group of 5), ranked by their mean learned bits, within the budget; the
    packed model equals the fake one."""
    torch.manual_seed(0)
    m = soniq.qat.prepare(_mlp(), QATConfig(w_palette=(2, 4), w_bits_target=3.0, tier_group=8))
    x = torch.randn(64, 12)
    m(x)
    q0 = soniq.qat.quant_layers(m)["0"].w_quant
    with torch.no_grad():  # group means 0.9 / 0.1 of the high tier's logits: the first group wins
        q0.bits_logit.copy_(torch.tensor([3.0] * 7 + [-30.0] + [-3.0] * 7 + [30.0]))
    soniq.qat.freeze_precision(m)
    b0 = q0.bits()
    assert torch.equal(b0, torch.tensor([4.0] * 8 + [2.0] * 8))
    rep = soniq.qat.precision_report(m)
    assert rep["avg_w_bits"] <= 3.0 + 1e-9
    b1 = soniq.qat.quant_layers(m)["2"].w_quant.bits()
    assert b1.numel() == 5 and bool((b1 == b1[0]).all())  # a last group of what is left
    packed = soniq.convert(m.eval())
    with torch.no_grad():
        torch.testing.assert_close(packed(x), m(x), rtol=1e-5, atol=1e-5)


def test_bit_penalty_takes_a_tensor_weight():
    m = soniq.qat.prepare(_mlp(), QATConfig())
    m(torch.randn(3, 12))
    assert torch.equal(soniq.qat.bit_penalty(m, weight=torch.tensor(0.5)), soniq.qat.bit_penalty(m, weight=0.5))


def test_ptq_refuses_a_single_layer_model_clearly():
    with pytest.raises(ValueError, match="model is a single Linear.*nn.Sequential"):
        soniq.ptq.quantize(nn.Linear(12, 4), [torch.randn(8, 12)])
