"""Packed modules as ordinary torch modules: state_dict / load_state_dict round trips (and
refusals), copy.deepcopy, torch.save(model), model.to()."""
import copy
import io

import pytest
import torch
from torch import nn

import soniq
from soniq.qat import QATConfig

CFG = QATConfig(w_palette=(1, 4), a_palette=(2, 8), w_bits_target=2.0, a_bits_target=4.0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 5 * 5, 7)
        self.head = nn.Linear(7, 3, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def _prepared(seed, x):
    torch.manual_seed(seed)
    m = soniq.qat.prepare(Net(), CFG)
    m(x)
    soniq.qat.freeze_precision(m)
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    m(x).square().mean().backward()
    opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def models():
    x = torch.randn(4, 3, 5, 5)
    a, b = soniq.convert(_prepared(0, x)), soniq.convert(_prepared(1, x))
    return a, b, x


def _same(m1, m2, x):
    with torch.no_grad():
        assert torch.equal(m1(x), m2(x))
        for n1, l1 in m1.named_modules():
            if hasattr(l1, "accumulators"):
                assert torch.equal(l1.accumulators(_inp(m1, n1, x)), dict(m2.named_modules())[n1].accumulators(_inp(m2, n1, x)))


def _inp(m, name, x):
    got = {}
    h = dict(m.named_modules())[name].register_forward_pre_hook(lambda mod, a: got.setdefault("x", a[0]))
    with torch.no_grad():
        m(x)
    h.remove()
    return got["x"]


def test_state_dict_holds_packed_weights(models):
    a, _, _ = models
    sd = a.state_dict()
    for layer in ("conv", "fc", "head"):
        for part in ("data", "desc", "sums", "row_perm", "k_perm", "ksegs", "bits", "scale", "meta"):
            assert f"{layer}.w.{part}" in sd
        assert f"{layer}.a_signed" in sd
    assert torch.equal(sd["fc.w.data"], a.fc.w.data)


def test_load_state_dict_round_trip_exact(models):
    a, b, x = models
    assert not torch.equal(a(x), b(x))  # different seeds: different weights and tiers
    c = copy.deepcopy(b)
    res = c.load_state_dict(a.state_dict())
    assert not res.missing_keys and not res.unexpected_keys
    _same(a, c, x)
    # the loaded model owns its tensors (copies, as load_state_dict copies into buffers)
    for k in ("fc.w.data", "conv.w.sums"):
        assert c.state_dict()[k].data_ptr() != a.state_dict()[k].data_ptr()


def test_state_dict_through_torch_save_and_safetensors(models, tmp_path):
    a, b, x = models
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c = copy.deepcopy(b)
    c.load_state_dict(torch.load(buf, weights_only=True))
    _same(a, c, x)
    from safetensors.torch import load_file, save_file
    save_file(a.state_dict(), tmp_path / "m.safetensors")
    d = copy.deepcopy(b)
    d.load_state_dict(load_file(tmp_path / "m.safetensors"))
    _same(a, d, x)


def test_layer_from_state_dict_constructor(models):
    a, _, x = models
    fc = soniq.nn.PackedLinear.from_state_dict(a.fc.state_dict(), "fc")
    conv = soniq.nn.PackedConv2d.from_state_dict(a.conv.state_dict(), "conv", **a.conv.conv_args())
    h = _inp(a, "fc", x)
    with torch.no_grad():
        assert torch.equal(fc.accumulators(h), a.fc.accumulators(h))
        assert torch.equal(conv(x), a.conv(x))
    with pytest.raises(ValueError, match="missing"):
        soniq.nn.PackedLinear.from_state_dict({k: v for k, v in a.fc.state_dict().items() if k != "w.meta"})


def test_missing_packed_weights_refused(models):
    a, b, x = models
    sd = {k: v for k, v in a.state_dict().items() if not k.startswith("fc.w.") and k != "fc.a_signed"}
    c = copy.deepcopy(b)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*fc\.w\.data"):
        c.load_state_dict(sd)
    # strict=False with the layer's other state given (a_bits, a_scale, bias): an error, and the
    # layer keeps its own weight and state (never a's scales with b's weight)
    c = copy.deepcopy(b)
    with pytest.raises(RuntimeError, match=r"packed weight of 'fc\.' is missing while its \[.*'a_scale'"):
        c.load_state_dict(sd, strict=False)
    assert torch.equal(c.fc.w.data, b.fc.w.data)
    for k, t in b.fc.state_dict().items():
        assert torch.equal(c.fc.state_dict()[k], t), k
    # strict=False without any of the layer's keys: listed as missing, the layer kept whole
    c = copy.deepcopy(b)
    res = c.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=False)
    assert "fc.w.data" in res.missing_keys and "fc.w.meta" in res.missing_keys and "fc.a_scale" in res.missing_keys
    for k, t in b.fc.state_dict().items():
        assert torch.equal(c.fc.state_dict()[k], t), k


@pytest.mark.parametrize("strict", [True, False])
def test_incomplete_or_corrupt_packed_weights_refused(models, strict):
    a, b, x = models
    c = copy.deepcopy(b)
    before = c.fc.w
    partial = {k: v for k, v in a.state_dict().items() if k != "fc.w.sums"}
    with pytest.raises(RuntimeError, match=r"fc\.'? is incomplete: missing \['w.sums'\]"):
        c.load_state_dict(partial, strict=strict)
    bad_cases = {
        "fc.w.data": lambda t: t[:-1].clone(),                       # truncated planes
        "fc.w.sums": lambda t: t + 1,                                # code sums disagree with planes
        "fc.w.k_perm": lambda t: torch.zeros_like(t),                # not a permutation
        "fc.w.meta": lambda t: torch.tensor([9, *t[1:].tolist()]),  # unknown layout version
        "fc.w.scale": lambda t: -t,                                  # non-positive scales
        "fc.w.bits": lambda t: t.to(torch.int32),                    # wrong dtype
    }
    for key, spoil in bad_cases.items():
        sd = dict(a.state_dict())
        sd[key] = spoil(sd[key])
        with pytest.raises(RuntimeError, match="packed weight of 'fc.'"):
            c.load_state_dict(sd, strict=strict)
        assert c.fc.w is before, key
    # a valid weight packed for other activation tiers (K layout) than the a_bits loaded with it
    sd = dict(a.state_dict())
    sd["fc.a_bits"] = sd["fc.a_bits"].roll(1)
    assert not torch.equal(sd["fc.a_bits"], a.fc.a_bits)
    with pytest.raises(RuntimeError, match="packed weight of 'fc.'.*k_layout"):
        c.load_state_dict(sd, strict=strict)
    assert c.fc.w is before
    # a weight of another layer's shape
    sd = dict(a.state_dict())
    for k in [k for k in sd if k.startswith("fc.w.")]:
        sd[k] = a.state_dict()[k.replace("fc.", "head.")]
    with pytest.raises(RuntimeError, match="do not match this layer"):
        c.load_state_dict(sd, strict=strict)


def test_deepcopy_torch_save_and_to(models):
    a, _, x = models
    with torch.no_grad():
        ref = a(x)
    d = copy.deepcopy(a)
    assert d.fc.w.data.data_ptr() != a.fc.w.data.data_ptr()
    assert torch.equal(d(x), ref)
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    e = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(e(x), ref)
    f = copy.deepcopy(a).to("cpu").to(torch.float64).float()  # dtype moves leave packed words alone
    with torch.no_grad():
        assert torch.equal(f(x), ref)


@pytest.mark.parametrize("assign", [False, True])
def test_failed_load_changes_nothing(models, assign):
    """A state dict whose packed weight is refused leaves the layer as it was: its activation
    bits and scales, bias and activation mode too (they were loaded before the weight was
    checked, so the old weight ran with the other model's activation scales)."""
    a, b, x = models
    c = copy.deepcopy(b)
    h = torch.randn(4, 6 * 5 * 5)
    with torch.no_grad():
        ref = c.fc(h)
    keep = {k: v.clone() for k, v in c.fc.state_dict().items()}
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    sd["fc.w.data"] = sd["fc.w.data"][:-1].clone()
    sd["fc.a_dynamic"] = torch.tensor(True)
    assert not torch.equal(sd["fc.a_scale"], keep["a_scale"])
    spoiled = sd["fc.a_scale"].clone()
    with pytest.raises(RuntimeError, match="packed weight of 'fc.'"):
        c.load_state_dict(sd, assign=assign)
    assert c.fc.a_dynamic is None
    for k, v in c.fc.state_dict().items():
        assert torch.equal(v, keep[k]), k
    assert torch.equal(sd["fc.a_scale"], spoiled)  # the caller's tensors are not written
    with torch.no_grad():
        assert torch.equal(c.fc(h), ref)  # (the other layers did load)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_conversion_keeps_activation_scales(models, dtype):
    """model.to(dtype) / .half() leave the packed layers' quantizer state in float32: the
    activation scales used to be rounded to the new dtype, a different quantization grid
    (other integer accumulators than the converted model's)."""
    a, _, x = models
    c = copy.deepcopy(a).to(dtype)
    h = torch.randn(4, 6 * 5 * 5) * 3
    for name in ("conv", "fc", "head"):
        assert getattr(c, name).a_scale.dtype == torch.float32, name
        assert torch.equal(getattr(c, name).a_scale, getattr(a, name).a_scale), name
    with torch.no_grad():
        assert torch.equal(c.fc.accumulators(h), a.fc.accumulators(h))
        assert torch.equal(c.conv.accumulators(x), a.conv.accumulators(x))
