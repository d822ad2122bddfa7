"""A QAT model's state_dict carries each layer's quantization layout (palettes, activation mode,
Hadamard block, smoothing): a checkpoint loads back exactly into a model prepared the same way,
and is refused, naming what differs, by one prepared another way (its weights would mean other
numbers there). Checkpoints saved before the layout existed still load."""
import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import soniq
from soniq.qat import QATConfig

BASE = dict(w_palette=(2, 4), a_palette=(4, 8), w_bits_target=3.0, a_bits_target=6.0)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def _conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))


def _trained(cfg, make=_model, shape=(16, 64)):
    m = soniq.qat.prepare(make(), cfg)
    torch.manual_seed(1)
    m(torch.randn(*shape))
    soniq.qat.freeze_precision(m)
    return m.eval()


def _fresh(cfg, make=_model):
    return soniq.qat.prepare(make(), cfg).eval()


@pytest.mark.parametrize("extra", [{}, {"hadamard_block": 16, "a_dynamic": "token"}, {"smooth_alpha": 0.5}])
def test_round_trip_exact_and_through_safetensors(extra, tmp_path):
    cfg = QATConfig(**BASE, **extra)
    src = _trained(cfg)
    sd = src.state_dict()
    assert sd["0.qat_layout"].dtype == torch.int64
    path = tmp_path / "qat.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    dst = _fresh(cfg)
    dst.load_state_dict(load_file(str(path)))
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
        assert torch.equal(soniq.convert(copy.deepcopy(src))(x), soniq.convert(copy.deepcopy(dst))(x))


def _phase1(cfg, make=_model, shape=(16, 64)):
    m = soniq.qat.prepare(make(), cfg)
    torch.manual_seed(1)
    m(torch.randn(*shape))  # calibrated, bits still learned
    return m


@pytest.mark.parametrize("saved, loaded, field", [
    ({"hadamard_block": 16}, {}, "hadamard_block=16"),
    ({}, {"hadamard_block": 32}, "hadamard_block=0"),
    ({"a_dynamic": "token"}, {}, "a_dynamic='token'"),
    ({"smooth_alpha": 0.5}, {}, "smooth_alpha=set"),
    ({"w_palette": (1, 4)}, {}, "w_palette[0]=1"),  # phase 1: the bit logits mean other bits
    ({"a_palette": (4, 6)}, {}, "a_palette[1]=6"),
])
def test_other_layout_refused_and_layer_kept(saved, loaded, field):
    sd = _phase1(QATConfig(**{**BASE, **saved})).state_dict()
    dst = _fresh(QATConfig(**{**BASE, **loaded}))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"0: the checkpoint was saved with .*" + field.replace("[", r"\[")
                       .replace("]", r"\]").replace("(", r"\(")):
        dst.load_state_dict(sd)
    for k, v in dst.state_dict().items():  # the refused layers kept their own state
        if k.startswith(("0.", "2.")) and not k.endswith("qat_layout"):
            assert torch.equal(v, before[k]), k


def test_conv_layout_round_trip_and_refusal():
    src = _trained(QATConfig(**BASE), _conv, (2, 3, 8, 8))
    sd = src.state_dict()
    dst = _fresh(QATConfig(**BASE), _conv)
    dst.load_state_dict(sd)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    with pytest.raises(RuntimeError, match=r"saved with hadamard_block=0, this layer has hadamard_block=16"):
        _fresh(QATConfig(**BASE, hadamard_block=16), _model).load_state_dict(_trained(QATConfig(**BASE)).state_dict())
    p1 = _phase1(QATConfig(**BASE), _conv, (2, 3, 8, 8)).state_dict()
    with pytest.raises(RuntimeError, match=r"saved with w_palette\[0\]=2, this layer has w_palette\[0\]=1"):
        _fresh(QATConfig(**{**BASE, "w_palette": (1, 4)}), _conv).load_state_dict(p1)


def test_phase2_checkpoint_brings_its_palettes():
    """In phase 2 the frozen bits are what runs: a checkpoint whose palettes differ (trained
    with another palette, or widened by set_uniform_precision) loads and the layer takes them."""
    x = torch.randn(5, 64)
    for src in (_trained(QATConfig(**{**BASE, "w_palette": (1, 4), "a_palette": (4, 6)})),
                soniq.qat.set_uniform_precision(_phase1(QATConfig(**BASE)), 8, 8).eval()):
        dst = _fresh(QATConfig(**BASE))
        dst.load_state_dict(src.state_dict())
        for a, b in ((src[0], dst[0]), (src[2], dst[2])):
            assert (a.w_quant.palette, a.a_quant.palette) == (b.w_quant.palette, b.a_quant.palette)
        with torch.no_grad():
            assert torch.equal(src(x), dst(x))
            assert torch.equal(soniq.convert(copy.deepcopy(src))(x), soniq.convert(copy.deepcopy(dst))(x))


def test_checkpoint_without_layout_still_loads():
    cfg = QATConfig(**BASE)
    src = _trained(cfg)
    old = {k: v for k, v in src.state_dict().items() if not k.endswith("qat_layout")}
    dst = _fresh(cfg)
    dst.load_state_dict(old)  # strict: no missing key
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


@pytest.mark.parametrize("bad, what", [
    (torch.tensor([2, 2, 4, 4, 8, 0, 0, 0]), "layout version 2"),
    (torch.tensor([1, 2, 4]), "3 entries"),
    (torch.tensor(1), "expected an int64 vector"),
])
def test_malformed_layout_refused(bad, what):
    sd = _trained(QATConfig(**BASE)).state_dict()
    sd["0.qat_layout"] = bad
    with pytest.raises(RuntimeError, match=what):
        _fresh(QATConfig(**BASE)).load_state_dict(sd)
