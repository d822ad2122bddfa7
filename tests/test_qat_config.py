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
