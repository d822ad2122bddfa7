"""Block Hadamard rotation of Linear inputs (QATConfig(hadamard_block=...), soniq._hadamard):
the torch butterflies are the Walsh-Hadamard product; every ISA's native row rotation
(cpp/hadamard.h) gives their bits; QLinear computes the float layer's product; the packed
layer (fused native forward and general path) equals the fake-quantized layer exactly, on
every ISA path this CPU has and the AMX emulation; state_dict, save / load and PTQ keep it."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import soniq
from soniq import _hadamard
from soniq._native import _C
from soniq._packed_nn import PackedLinear
from soniq.qat import QATConfig
from test_fused_linear import make_linear


def sylvester(b):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h


@pytest.mark.parametrize("block", [2, 4, 8, 16, 32, 128, 512])
def test_rotate_is_the_walsh_hadamard_product(block):
    x = torch.randn(3, 5, 2 * block, dtype=torch.float64)
    want = (x.reshape(3, 5, 2, block) @ sylvester(block)).reshape(x.shape)
    assert torch.allclose(_hadamard.rotate(x, block), want, atol=1e-12)
    w = torch.randn(7, 2 * block, dtype=torch.float64)
    assert torch.allclose(_hadamard.rotate(x, block) @ _hadamard.rotate_weight(w, block).T, x @ w.T, atol=1e-10)
    assert torch.allclose(_hadamard.unrotate_weight(_hadamard.rotate_weight(w, block), block), w, atol=1e-12)
    h = x.reshape(-1, 2 * block).T @ x.reshape(-1, 2 * block)
    xr = _hadamard.rotate(x, block).reshape(-1, 2 * block)
    assert torch.allclose(_hadamard.rotate_moment(h, block), xr.T @ xr, atol=1e-9)


def awkward_rows(rng, M, K):
    """Values of every scale, with ties, signed zeros, subnormals, infinities and a NaN."""
    x = (rng.standard_normal((M, K)) * np.exp2(rng.integers(-30, 30, (M, K)))).astype(np.float32)
    x[0, : K // 2] = np.float32(0.5)  # exact sums
    x[1, ::3] = -0.0
    x[2, ::5] = np.float32(1e-41)
    if M > 4:
        x[3, 1] = np.inf
        x[4, K - 1] = np.nan
    return torch.from_numpy(x)


@pytest.mark.parametrize("block", [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048])
def test_native_rotation_matches_torch_bits(isa, block):
    rng = np.random.default_rng(block)
    for K in sorted({block, 2 * block, 3 * block, 384 if 384 % block == 0 else block}):
        x = awkward_rows(rng, 6, K)
        out = torch.empty_like(x)
        _C.hadamard_rows(x.data_ptr(), 6, K, block, out.data_ptr())
        want = _hadamard.rotate(x, block)
        assert torch.equal(out.view(torch.int32), want.view(torch.int32)) or \
            torch.equal(torch.nan_to_num(out, 7.0), torch.nan_to_num(want, 7.0)), (block, K)


def test_native_rotation_refuses_bad_blocks():
    x = torch.zeros(1, 12)
    for block in (0, 1, 3, 8, 24):
        with pytest.raises(ValueError, match="power of two"):
            _C.hadamard_rows(x.data_ptr(), 1, 12, block, x.data_ptr())


def test_qlinear_rotation_keeps_the_float_product():
    torch.manual_seed(0)
    lin = nn.Linear(200, 30).double()
    q = soniq.nn.QLinear.from_float(lin, w_palette=(4, 8), a_palette=(4, 8), w_bits=6.0, a_bits=6.0,
                                    hadamard_block=128)
    assert q.hadamard_block == 8  # the largest power of two <= 128 dividing 200
    x = torch.randn(4, 200, dtype=torch.float64)
    assert torch.allclose(q.quantizer_input(x) @ q.weight.T, x @ lin.weight.T, atol=1e-10)
    assert "hadamard_block=8" in repr(q)
    odd = soniq.nn.QLinear.from_float(nn.Linear(75, 3), w_palette=(4, 8), a_palette=(4, 8), w_bits=6.0,
                                      a_bits=6.0, hadamard_block=64)
    assert odd.hadamard_block == 0 and torch.equal(odd.quantizer_input(x[:, :75]), x[:, :75])


@pytest.mark.parametrize("bad", [1, 3, 96, -2, 2.0, True])
def test_config_refuses_bad_blocks(bad):
    with pytest.raises(ValueError, match="hadamard_block"):
        QATConfig(hadamard_block=bad)


def test_rotation_and_smoothing_refused_together():
    with pytest.raises(ValueError, match="hadamard_block and smooth_alpha"):
        QATConfig(hadamard_block=64, smooth_alpha=0.5)
    with pytest.raises(ValueError, match="hadamard_block and smooth_alpha"):
        soniq.ptq.PTQConfig(qat_options=(("hadamard_block", 64), ("smooth_alpha", 0.5)))
    with pytest.raises(ValueError, match="qat_options hadamard_block"):
        soniq.ptq.PTQConfig(qat_options=(("hadamard_block", 48),))


def frozen_model(w_palette, a_palette, dynamic, block, seed=0, widths=(384, 200, 96), a_target=None):
    """A small MLP prepared with rotation, run once (calibration), frozen: phase 2."""
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.GELU()]
    m = nn.Sequential(*layers[:-1])
    cfg = QATConfig(w_palette=w_palette, a_palette=a_palette, w_bits_target=sum(w_palette) / 2,
                    a_bits_target=a_target or sum(a_palette) / 2, a_dynamic=dynamic, hadamard_block=block)
    q = soniq.qat.prepare(m, cfg)
    q(torch.randn(64, widths[0]) * 2)
    soniq.qat.freeze_precision(q)
    return q.eval()


@pytest.mark.parametrize("w_palette,a_palette,a_target", [((4, 8), (4, 8), 6.0), ((2, 4), (4, 8), 8.0),
                                                           ((1, 4), (4, 6), 5.0)])
@pytest.mark.parametrize("dynamic", [None, "token"])
def test_packed_rotated_layers_equal_fake_quant(isa, w_palette, a_palette, a_target, dynamic):
    q = frozen_model(w_palette, a_palette, dynamic, 128, seed=sum(w_palette) + sum(a_palette), a_target=a_target)
    p = soniq.convert(q, fuse=False)
    assert [m.hadamard_block for m in p if isinstance(m, PackedLinear)] == [128, 8]
    base = torch.randn(2, 70, 2 * 384 + 1) * 3
    for x in (torch.randn(1, 384), torch.randn(3, 384) * 5, torch.randn(131, 384), base[:, :, ::2][:, :, :384]):
        with torch.no_grad():
            for i in (0, 2):
                qi, pi = q[i], p[i]
                va, vw = qi.integer_operands(x)
                rows = va.reshape(-1, va.shape[-1])
                assert torch.equal(pi.accumulators(x).reshape(rows.shape[0], -1), rows @ vw.T)
                fused, general = pi(x), pi._run(x, integer=False)
                assert torch.equal(fused, general)  # native rotation == torch rotation, bit for bit
                assert torch.allclose(fused, qi(x), rtol=1e-5, atol=1e-5)
                x = torch.nn.functional.gelu(fused)


def test_rotated_packed_state_dict_round_trip():
    q = frozen_model((4, 8), (4, 8), "token", 64, a_target=8.0)
    p = soniq.convert(q, fuse=False)  # (a fused activation is not state)
    lin = p[0]
    sd = lin.state_dict()
    assert int(sd["hadamard_block"]) == 64
    x = torch.randn(9, 384)
    back = PackedLinear.from_state_dict(sd)
    assert back.hadamard_block == 64 and torch.equal(back(x), lin(x))
    plain = copy.deepcopy(lin)
    plain.hadamard_block = 0
    plain._weights_changed()
    assert not torch.equal(plain(x), lin(x))
    plain.load_state_dict(sd)  # the rotation comes with the state
    assert plain.hadamard_block == 64 and torch.equal(plain(x), lin(x))
    old = {k: v for k, v in sd.items() if k != "hadamard_block"}  # a state dict from before the field
    plain.load_state_dict(old)
    assert plain.hadamard_block == 0
    bad = dict(sd, hadamard_block=torch.tensor(48))
    with pytest.raises(RuntimeError, match="hadamard_block"):
        plain.load_state_dict(bad)
    assert plain.hadamard_block == 0  # a failed load changes nothing
    with pytest.raises(ValueError, match="must divide in_features"):
        PackedLinear.from_state_dict(dict(sd, hadamard_block=torch.tensor(256)))


def test_rotated_model_saves_as_version_4_and_loads(tmp_path):
    import json

    from safetensors import safe_open

    q = frozen_model((4, 8), (4, 8), "token", 128, a_target=8.0)
    p = soniq.convert(q)
    f = tmp_path / "m.safetensors"
    soniq.save(p, f)
    with safe_open(str(f), framework="pt") as h:
        meta = json.loads(h.metadata()["soniq"])
    assert meta["version"] == 4 and meta["packed"]["0"]["hadamard_block"] == 128
    back = soniq.load(f)
    x = torch.randn(5, 384)
    assert back[0].hadamard_block == 128 and torch.equal(back(x), p(x))
    plain = soniq.convert(frozen_model((4, 8), (4, 8), "token", 0, a_target=8.0))
    soniq.save(plain, f)
    with safe_open(str(f), framework="pt") as h:
        assert json.loads(h.metadata()["soniq"])["version"] == 3  # readable by soniq before version 4


def test_ptq_with_rotation_is_exact_and_keeps_codes():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64))
    batches = [torch.randn(32, 256) * torch.linspace(0.1, 8, 256) for _ in range(4)]
    cfg = soniq.ptq.PTQConfig(w_palette=(4, 8), w_bits_target=6.0, a_palette=(8, 8), a_bits_target=8.0,
                              qat_options=(("a_dynamic", "token"), ("hadamard_block", 64)), gain_batches=1,
                              bias_correction=True)
    fake = soniq.ptq.quantize(copy.deepcopy(m), batches, cfg)
    assert [fake[i].hadamard_block for i in (0, 2)] == [64, 64]
    packed = soniq.convert(fake)
    x = torch.randn(7, 256)
    with torch.no_grad():
        va, vw = fake[0].integer_operands(x)
        assert torch.equal(packed[0].accumulators(x), va @ vw.T)
        assert torch.allclose(packed[:2](x), torch.nn.functional.gelu(fake[0](x)), rtol=1e-5, atol=1e-5)
        assert torch.allclose(packed[0](x), fake[0](x), rtol=1e-5, atol=1e-5)  # on its own: no fused GELU
        # the rotated basis is the float layer's: a wrong rotation (or none on one side) would
        # leave an error of the output's own size (measured: 0.017; 0.006 without rotation on
        # these random weights, which have no outliers for the rotation to spread)
        rel = float((fake(x) - m(x)).pow(2).mean() / m(x).pow(2).mean())
    assert rel < 0.05, rel


@pytest.mark.parametrize("bad,match", [(48, "must be 0 .off. or a power of two"), (256, "must divide in_features=200"),
                                       ("64", "hadamard_block must be an integer")])
def test_bad_saved_rotation_refused(tmp_path, bad, match):
    from test_save_format import rewrite

    p = soniq.convert(frozen_model((4, 8), (4, 8), "token", 8, a_target=8.0))
    f = tmp_path / "m.safetensors"
    soniq.save(p, f)
    rewrite(f, lambda meta, t: meta["packed"]["2"].__setitem__("hadamard_block", bad))
    with pytest.raises(ValueError, match=f"layer '2': .*{match}"):
        soniq.load(f)


def test_block_reconstruction_keeps_rotated_layers_exact():
    """_recon writes codes x step into the (rotated) weight, which is the basis the layer's
    quantizer rounds: the packed model still has the fake model's accumulators."""
    torch.manual_seed(5)
    m = nn.Sequential(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)))
    batches = [torch.randn(16, 64) for _ in range(3)]
    cfg = soniq.ptq.PTQConfig(w_palette=(2, 4), w_bits_target=3.0, a_palette=(8, 8), a_bits_target=8.0,
                              qat_options=(("a_dynamic", "token"), ("hadamard_block", 16)), gain_batches=1,
                              reconstruct_blocks=("0",), reconstruct_steps=4)
    fake = soniq.ptq.quantize(copy.deepcopy(m), batches, cfg)
    packed = soniq.convert(fake, fuse=False)
    x = torch.randn(5, 64)
    with torch.no_grad():
        for i, xi in ((0, x), (2, torch.nn.functional.gelu(fake[0][0](x)))):
            q, p = fake[0][i], packed[0][i]
            assert q.hadamard_block == 16 and p.hadamard_block == 16
            va, vw = q.integer_operands(xi)
            assert torch.equal(p.accumulators(xi), va @ vw.T)


def test_rotation_changes_only_with_the_weight():
    lin = soniq.convert(frozen_model((4, 8), (4, 8), "token", 64, a_target=8.0), fuse=False)[0]
    with pytest.raises(RuntimeError, match=r"hadamard_block changes only with the packed weight"):
        lin.load_state_dict({"hadamard_block": torch.tensor(32)}, strict=False)
    assert lin.hadamard_block == 64
    with pytest.raises(ValueError, match="lin: hadamard_block must be 0 .off. or a power of two"):
        PackedLinear.from_state_dict(dict(lin.state_dict(), hadamard_block=torch.tensor(3)), name="lin")
    with pytest.raises(ValueError, match="qat_options hadamard_block"):
        soniq.ptq.PTQConfig(qat_options=(("hadamard_block", None),))
