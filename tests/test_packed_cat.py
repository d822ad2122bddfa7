"""PackedLinear.cat: layers that read one input with the same activation quantizer as one
layer, whose output is the layers' outputs concatenated, bit for bit, on every ISA path."""
import numpy as np
import pytest
import torch

from soniq import KLayout, ops
from soniq.nn import PackedLinear

from conftest import random_values

K = 384


def layer(rng, n, w_bits, a_bits, a_scale, *, dynamic=None, block=0, bias=True, smooth=None, name="l"):
    """A PackedLinear from random codes: weights per row from w_bits, activations per K column."""
    b, k = rng.choice(w_bits, size=n), a_bits.numel()
    bits, codes = torch.from_numpy(b).to(torch.int64), torch.from_numpy(random_values(rng, (n, k), b, True))
    scale = torch.from_numpy(rng.uniform(1e-3, 2e-2, size=n)).float()
    w = ops.pack(codes, bits, signed=True, axis=0, scale=scale, k_layout=KLayout.from_bits(a_bits))
    b = torch.from_numpy(rng.standard_normal(n)).float() if bias else None
    return PackedLinear(w, a_bits, a_scale, True, b, name, a_dynamic=dynamic, hadamard_block=block,
                        a_inv_smooth=smooth)


def a_quantizer(rng, mixed):
    bits = torch.from_numpy(rng.choice([4, 8], size=K) if mixed else np.full(K, 8)).to(torch.int64)
    scale = torch.where(bits == 8, 0.03, 0.4).float()  # one scale per activation tier
    return bits, scale


INPUTS = [torch.randn(1, K), torch.randn(3, 5, K) * 4, torch.randn(131, K), torch.randn(2, 40, 2 * K + 1)[:, :, 1::2][:, :, :K]]


@pytest.mark.parametrize("w_bits,mixed,dynamic,block", [([4, 6], False, "token", 32), ([2, 4], True, None, 0),
                                                        ([8], True, "token", 128), ([1, 4], False, None, 64),
                                                        ([4, 8], True, "token", 0)])
def test_cat_equals_the_layers_outputs_concatenated(isa, w_bits, mixed, dynamic, block):
    rng = np.random.default_rng(len(w_bits) * 7 + block + mixed)
    a_bits, a_scale = a_quantizer(rng, mixed)
    layers = [layer(rng, n, w_bits, a_bits, a_scale, dynamic=dynamic, block=block, name=f"l{i}")
              for i, n in enumerate((37, 64, 101))]
    fused = PackedLinear.cat(layers, "qkv")
    assert fused.w.shape == (202, K) and fused.hadamard_block == block and fused.a_dynamic == dynamic
    for x in INPUTS:
        with torch.no_grad():
            want = torch.cat([m(x) for m in layers], -1)
            got = fused(x)
            assert got.shape == (*x.shape[:-1], 202) and torch.equal(got, want)
            acc = torch.cat([m.accumulators(x) for m in layers], -1)
            assert torch.equal(fused.accumulators(x), acc)
    # the fused layer is an ordinary PackedLinear: its state dict rebuilds it
    again = PackedLinear.from_state_dict(fused.state_dict())
    assert torch.equal(again(INPUTS[2]), fused(INPUTS[2]))


def test_cat_keeps_smoothing_no_bias_and_a_fused_gelu():
    rng = np.random.default_rng(3)
    a_bits, a_scale = a_quantizer(rng, True)
    smooth = torch.from_numpy(rng.uniform(0.5, 2.0, size=K)).float()
    layers = [layer(rng, n, [4, 8], a_bits, a_scale, bias=False, smooth=smooth) for n in (16, 48)]
    for m in layers:
        m.activation = "gelu"
    fused = PackedLinear.cat(layers)
    assert fused.bias is None and fused.activation == "gelu"
    x = torch.randn(50, K) * 3
    with torch.no_grad():
        assert torch.equal(fused(x), torch.cat([m(x) for m in layers], -1))


def test_cat_under_inference_mode_gives_a_usable_layer():
    rng = np.random.default_rng(4)
    layers = [layer(rng, n, [4, 6], *a_quantizer(rng, False), dynamic="token", block=32) for n in (24, 40)]
    x = torch.randn(33, K)
    with torch.inference_mode():
        fused = PackedLinear.cat(layers)
        assert torch.equal(fused(x), torch.cat([m(x) for m in layers], -1))
    assert torch.equal(fused(x), torch.cat([m(x) for m in layers], -1))


def test_cat_of_one_layer_is_that_layer():
    rng = np.random.default_rng(5)
    m = layer(rng, 29, [2, 4], *a_quantizer(rng, True), dynamic="token", block=32)
    x = torch.randn(17, K)
    assert torch.equal(PackedLinear.cat([m])(x), m(x))


def test_cat_refuses_layers_that_quantize_their_input_differently():
    rng = np.random.default_rng(9)
    a_bits, a_scale = a_quantizer(rng, True)
    base = layer(rng, 8, [4, 8], a_bits, a_scale, dynamic="token", block=32, name="query")
    cases = {
        "a_scale": layer(rng, 8, [4, 8], a_bits, a_scale * 2, dynamic="token", block=32, name="key"),
        "a_bits": layer(rng, 8, [4, 8], torch.full((K,), 8), torch.full((K,), 0.03), dynamic="token", block=32),
        "a_dynamic": layer(rng, 8, [4, 8], a_bits, a_scale, dynamic=None, block=32),
        "hadamard_block": layer(rng, 8, [4, 8], a_bits, a_scale, dynamic="token", block=64),
        "bias": layer(rng, 8, [4, 8], a_bits, a_scale, dynamic="token", block=32, bias=False),
    }
    for what, other in cases.items():
        with pytest.raises(ValueError, match=rf"layers\[1\] \(.*\)\.{what} must equal layers\[0\]'s \(query\)"):
            PackedLinear.cat([base, other])
    with pytest.raises(ValueError, match="in_features must equal"):
        PackedLinear.cat([base, layer(rng, 8, [4, 8], a_bits[:100], a_scale[:100], dynamic="token", block=4)])
    with pytest.raises(TypeError, match=r"layers\[1\] must be a soniq.nn.PackedLinear"):
        PackedLinear.cat([base, torch.nn.Linear(K, 4)])
    with pytest.raises(ValueError, match="non-empty"):
        PackedLinear.cat([])

