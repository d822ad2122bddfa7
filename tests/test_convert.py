"""Fake equals real: packed modules give the fake-quantized model's integer accumulators
and its float outputs within float32 rounding; save/load is bit-exact and rejects damage."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import soniq
from soniq.qat import QATConfig


def _frozen(model, x, cfg):
    torch.manual_seed(0)
    soniq.qat.prepare(model, cfg)
    model(x)
    soniq.qat.freeze_precision(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # a phase-2 step moves the scales
    model(x).square().mean().backward()
    opt.step()
    return model.eval()


def _tol(xq, wq, K):
    # |fake - real| <= K * eps32 * sum_k |xq_k * wq_nk|  (float32 accumulation in the fake model)
    return K * 2.0 ** -23 * (xq.abs() @ wq.abs().T) + 1e-6


CFGS = [QATConfig(w_palette=(1, 4), a_palette=(2, 8), w_bits_target=2.0, a_bits_target=4.0),
        QATConfig(w_palette=(2, 4), a_palette=(4, 8), w_bits_target=3.0, a_bits_target=6.0),
        # SmoothQuant-style input smoothing on the Linear layers (convs ignore it)
        QATConfig(w_palette=(2, 4), a_palette=(4, 8), w_bits_target=3.0, a_bits_target=6.0, smooth_alpha=0.5)]


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("shift", [0.0, -0.5])  # unsigned and signed activations
@pytest.mark.parametrize("K, N, M", [(70, 5, 1), (130, 1, 3), (9, 17, 4)])
def test_linear_fake_equals_real(cfg, shift, K, N, M):
    torch.manual_seed(K + N)
    x = torch.rand(M, 2, K) + shift
    lin = nn.Sequential(nn.Linear(K, N))
    m = _frozen(lin, x, copy.deepcopy(cfg))
    q = soniq.convert(m)
    va, vw = m[0].integer_operands(x)
    acc = q[0].accumulators(x)
    assert torch.equal(acc, va @ vw.T)
    fake, real = m(x).detach(), q(x)
    xq = m[0].a_quant(x).detach().reshape(-1, K)
    wq = m[0].w_quant(m[0].weight).detach()
    assert bool(((fake - real).abs().reshape(-1, N) <= _tol(xq, wq, K)).all())


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("conv_kw", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), stride=2, dilation=(1, 2)),
                                     dict(kernel_size=1, bias=False)])
def test_conv_fake_equals_real(cfg, conv_kw):
    torch.manual_seed(1)
    x = torch.rand(2, 5, 9, 7) - 0.2
    m = _frozen(nn.Sequential(nn.Conv2d(5, 6, **conv_kw)), x, copy.deepcopy(cfg))
    q = soniq.convert(m)
    c = m[0]
    va, vw = c.integer_operands(x)
    ref_acc = F.conv2d(va.double(), vw.double(), None, c.stride, c.padding, c.dilation).round().to(torch.int64)
    assert torch.equal(q[0].accumulators(x), ref_acc)
    fake, real = m(x).detach(), q(x)
    xq = c.a_quant(x).detach()
    cols = F.unfold(xq, c.kernel_size, c.dilation, c.padding, c.stride).transpose(1, 2).reshape(-1, 5 * c.kernel_size[0] * c.kernel_size[1])
    tol = _tol(cols, c.w_quant(c.weight).detach().reshape(6, -1), cols.shape[1])
    diff = (fake - real).abs().permute(0, 2, 3, 1).reshape(-1, 6)
    assert bool((diff <= tol).all())


def _small_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 16, 10))


@pytest.mark.parametrize("cfg", [CFGS[0], CFGS[2]], ids=["plain", "smoothed"])
def test_save_load_round_trip_and_damage(tmp_path, cfg):
    x = torch.rand(3, 1, 8, 8)
    m = _frozen(_small_model(), x, copy.deepcopy(cfg))
    q = soniq.convert(m)
    p = tmp_path / "m.safetensors"
    soniq.save(q, p)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".soniq-")]  # temp file replaced
    q2 = soniq.load(p)
    assert torch.equal(q2(x), q(x))
    assert torch.equal(q2[-1].accumulators(q[-1].a_scale.new_ones(3, 64)), q[-1].accumulators(torch.ones(3, 64)))
    if cfg.smooth_alpha is not None:
        assert torch.equal(q2[-1].a_inv_smooth, m[-1].a_inv_smooth)
    q3 = soniq.load(p, model=_small_model())  # architecture given explicitly
    assert torch.equal(q3(x), q(x))
    raw = p.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[: len(raw) - 40])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        soniq.load(tmp_path / "t.safetensors")
    bad = bytearray(raw)
    bad[-5] ^= 0x55
    (tmp_path / "x.safetensors").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="checksum mismatch"):
        soniq.load(tmp_path / "x.safetensors")
    # metadata edited, tensors intact (e.g. a layer's signedness flipped): caught as well
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(p), framework="pt") as f:
        meta = json.loads(f.metadata()["soniq"])
    name = next(iter(meta["packed"]))
    meta["packed"][name]["a_signed"] = not meta["packed"][name]["a_signed"]
    save_file(load_file(str(p)), str(tmp_path / "m2.safetensors"), metadata={"soniq": json.dumps(meta)})
    with pytest.raises(ValueError, match="checksum mismatch"):
        soniq.load(tmp_path / "m2.safetensors")


def test_custom_module_needs_architecture(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(x).relu()

    x = torch.rand(4, 8)
    q = soniq.convert(_frozen(Net(), x, copy.deepcopy(CFGS[1])))
    soniq.save(q, tmp_path / "n.safetensors")
    with pytest.raises(ValueError, match="pass its architecture"):
        soniq.load(tmp_path / "n.safetensors")
    assert torch.equal(soniq.load(tmp_path / "n.safetensors", model=Net())(x), q(x))


def test_convert_errors():
    m = soniq.qat.prepare(nn.Sequential(nn.Linear(4, 2)), QATConfig())
    m(torch.rand(2, 4))
    with pytest.raises(ValueError, match="'0' \\(QLinear\\) is still in phase 1"):
        soniq.convert(m)
    with pytest.raises(ValueError, match="no soniq QLinear/QConv2d"):
        soniq.convert(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="call soniq.convert"):
        soniq.save(nn.Linear(2, 2), "/tmp/never.safetensors")
    cfg = QATConfig(a_palette=(1, 8), a_bits_target=1.0)
    c = _frozen(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1)), torch.rand(1, 2, 5, 5) - 0.5, cfg)
    with pytest.raises(ValueError, match="'0' \\(QConv2d\\): signed 1-bit activations"):
        soniq.convert(c)


def converted_conv_net():
    """A small converted conv + linear model and an input (also used by tests/test_cuda.py)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    x = torch.rand(4, 3, 6, 6) - 0.3
    q = soniq.convert(_frozen(model, x, QATConfig(w_palette=(2, 4), a_palette=(4, 8), w_bits_target=3.0,
                                                  a_bits_target=6.0)))
    return q, x


def check_moved_model(q, x, device, tmp_path):
    """q moved to `device` with .to() gives the same bits, and saves from there."""
    want, want_acc = q(x), q[3].accumulators(q[:3](x))
    moved = copy.deepcopy(q).to(device)
    assert moved[0].w.device.type == torch.device(device).type and moved[3].a_scale.device.type == moved[0].w.device.type
    xd = x.to(device)
    assert torch.equal(moved(xd).cpu(), want)
    assert torch.equal(moved[3].accumulators(moved[:3](xd)).cpu(), want_acc)
    soniq.save(moved, tmp_path / "moved.safetensors")
    assert torch.equal(soniq.load(tmp_path / "moved.safetensors")(x), want)


def test_packed_model_moves_with_to(tmp_path):
    """model.to(device) moves the packed weights (not a buffer) with the buffers; a dtype
    conversion leaves them alone."""
    q, x = converted_conv_net()
    check_moved_model(q, x, "cpu", tmp_path)
    w = q[0].w
    q.to(torch.float32)
    assert q[0].w is w


def check_nan_rows_propagate(q, x, device="cpu"):
    """A NaN in the input gives NaN exactly where the float model's output is NaN (the
    packed layers mark the affected rows without a host sync, then fill them with NaN);
    every other output keeps its bits. The exact accumulators raise instead."""
    q = copy.deepcopy(q).to(device)
    x = x.to(device)
    clean = q(x)
    xn = x.clone()
    xn[1, 2, 3, 4] = float("nan")  # one pixel of sample 1: a 3x3 patch of conv rows, then all of sample 1
    if device == "cuda":  # after the warm-up above, a forward pass never waits for the GPU
        torch.cuda.set_sync_debug_mode("error")
    try:
        got = q(xn)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(torch.isnan(got).cpu(), torch.tensor([False, True, False, False])[:, None].expand(4, 10))
    keep = torch.tensor([0, 2, 3], device=device)
    assert torch.equal(got[keep], clean[keep])
    conv = q[0](xn)  # the conv layer alone: NaN at the 3x3 output positions around the pixel, all channels
    want = torch.zeros(4, 8, 6, 6, dtype=torch.bool)
    want[1, :, 2:5, 3:6] = True
    assert torch.equal(torch.isnan(conv).cpu(), want)
    with pytest.raises(ValueError, match="is NaN"):
        q[3].accumulators(torch.full((2, 8 * 36), float("nan"), device=device))


def test_packed_layers_propagate_nan_rows(isa):
    q, x = converted_conv_net()
    check_nan_rows_propagate(q, x)


def test_converted_conv_model_compiles_fullgraph():
    """No data-dependent Python in the packed layers' forward: the activation checks ran
    when the layer was built, so torch.compile(fullgraph=True) traces the whole model."""
    q, x = converted_conv_net()
    torch._dynamo.reset()
    assert torch.equal(torch.compile(q, fullgraph=True, backend="eager")(x), q(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_packed_layers_return_the_input_dtype(dtype):
    """As nn.Linear / nn.Conv2d: the output has the input's dtype (computed in float32, then
    converted), so a converted model moved to bfloat16 runs its next float layers."""
    q, x = converted_conv_net()
    conv, lin = q[0], q[3]
    xd = x.to(dtype)
    h = conv(xd)
    assert h.dtype == dtype and torch.equal(h, conv(xd.float()).to(dtype))
    f = q[:3](xd)
    assert f.dtype == dtype and torch.equal(lin(f), lin(f.float()).to(dtype))
    assert lin(f[:0]).dtype == dtype and conv(xd[:0]).dtype == dtype
    assert lin.accumulators(f).dtype == torch.int64
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 8))
    xs = torch.randn(6, 24)
    packed = soniq.convert(_frozen(model, xs, QATConfig(w_palette=(4, 8), a_palette=(4, 8), w_bits_target=6.0,
                                                        a_bits_target=8.0)))
    low = copy.deepcopy(packed).to(dtype)  # LayerNorm in dtype: a float32 output would be refused
    out = low(xs.to(dtype))
    assert out.dtype == dtype
    want = low[3](low[2](low[1](low[0](xs.to(dtype).float()).to(dtype))))
    assert torch.equal(out, want)


def test_packed_layers_take_empty_batches_and_refuse_scalars():
    """As nn.Conv2d / nn.Linear: a batch of 0 gives an empty output of the right shape (float
    forward, int64 accumulators); a 0-d input is a ValueError naming the layer."""
    q, x = converted_conv_net()
    conv, lin = q[0], q[3]
    assert (conv.in_channels, conv.out_channels) == (3, 8) and "kernel_size=(3, 3)" in repr(conv)
    for layer, empty, want in ((conv, x[:0], (0, 8, 6, 6)), (lin, torch.rand(0, 8 * 36), (0, 10))):
        out, acc = layer(empty), layer.accumulators(empty)
        assert out.shape == want and out.dtype == torch.float32
        assert acc.shape == want and acc.dtype == torch.int64
    with pytest.raises(ValueError, match="'?3'?: expected 288 input features, got input of shape \\(\\)"):
        lin(torch.tensor(1.0))
    with pytest.raises(ValueError, match="expected input \\[B, 3, H, W\\]"):
        conv(torch.tensor(1.0))


def test_model_with_batchnorm_saves_and_loads(tmp_path):
    """Float state beside the packed layers, BatchNorm's 0-d num_batches_tracked included, is
    checksummed, saved and restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 10))
    x = torch.rand(4, 3, 6, 6) - 0.3
    model.train()(x)  # running statistics and num_batches_tracked move off their defaults
    q = soniq.convert(_frozen(model, x, QATConfig(w_palette=(2, 4), a_palette=(4, 8), w_bits_target=3.0,
                                                  a_bits_target=6.0)))
    soniq.save(q, tmp_path / "bn.safetensors")
    back = soniq.load(tmp_path / "bn.safetensors")
    assert torch.equal(back(x), q(x))
    assert int(back[1].num_batches_tracked) == int(q[1].num_batches_tracked) == 3
    assert torch.equal(back[1].running_var, q[1].running_var)


def test_packed_layers_refuse_integer_and_numpy_inputs():
    """As nn.Linear / nn.Conv2d: an integer tensor is a TypeError (not silently converted),
    a numpy array too (not an AttributeError from inside)."""
    q, x = converted_conv_net()
    h = q[:3](x)
    for layer, inp in ((q[0], x), (q[3], h)):
        for bad in (inp.to(torch.int64), inp > 0, inp.numpy()):
            with pytest.raises(TypeError, match="expected a floating-point"):
                layer(bad)


def test_packed_conv_geometry_checked():
    """from_state_dict's geometry: ints as nn.Conv2d takes them, a stride of 0 or a kernel that
    does not match the weight's K refused at construction (not at the first forward)."""
    q, x = converted_conv_net()
    sd, args = q[0].state_dict(), q[0].conv_args()
    same = soniq.nn.PackedConv2d.from_state_dict(sd, "c", **dict(args, stride=1, padding=1, dilation=1))
    assert torch.equal(same(x), q[0](x))
    for bad, msg in ((dict(stride=(0, 1)), "stride must be an int or two ints >= 1"),
                     (dict(padding=-1), "padding must be an int or two ints >= 0"),
                     (dict(kernel_size=(3, 5)), r"kernel_size \(3, 5\) does not match the packed weight")):
        with pytest.raises(ValueError, match=msg):
            soniq.nn.PackedConv2d.from_state_dict(sd, "c", **dict(args, **bad))
