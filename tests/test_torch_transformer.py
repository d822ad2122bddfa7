"""torch's own Transformer layers: their fused fast paths (eval, no grad) read the Linear
layers' weights directly instead of calling them, and nn.MultiheadAttention never calls its
out_proj. soniq keeps those projections in float (with a warning) and turns the fast paths off
where soniq layers sit, so the quantized model is what runs, and converts, saves and loads."""
import copy

import pytest
import torch
from torch import nn

import soniq
from soniq.qat import QATConfig


def _encoder():
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)


def test_encoder_runs_its_quantized_layers_in_eval_and_converts(tmp_path):
    fm, x = _encoder().eval(), torch.randn(2, 5, 16)
    assert fm.use_nested_tensor  # the float encoder would take its nested-tensor path
    with pytest.warns(UserWarning, match=r"layers.0.self_attn.out_proj.*stay in float"):
        m = soniq.qat.prepare(copy.deepcopy(fm), QATConfig(w_palette=(1, 4), w_bits_target=1.0,
                                                           a_palette=(2, 8), a_bits_target=2.0))
    assert type(m.layers[0].self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    m(x)
    soniq.qat.freeze_precision(m)
    m.eval()
    with torch.no_grad():
        a = m(x)  # the fast path would run the float weights here
    b = m(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - fm(x)).abs().max() > 1e-3  # 1- to 4-bit weights: not the float model
    p = soniq.convert(m)
    with torch.no_grad():
        torch.testing.assert_close(p(x), a, rtol=1e-4, atol=1e-4)
        # padded batches (src_key_padding_mask: the encoder's nested-tensor path) too
        mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
        torch.testing.assert_close(p(x, src_key_padding_mask=mask), m(x, src_key_padding_mask=mask),
                                   rtol=1e-4, atol=1e-4)
    soniq.save(p, tmp_path / "enc.safetensors")
    back = soniq.load(tmp_path / "enc.safetensors", model=copy.deepcopy(fm))
    with torch.no_grad():
        assert torch.equal(back(x), p(x))
