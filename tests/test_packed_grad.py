"""Packed layers pass gradients to their input: the gradient of the fake-quantized (phase 2)
model they were converted from (straight-through inside each activation tier's range, zero
where QAT's clipping mask is), through the dequantized packed weights, the Hadamard rotation
or smoothing, and a fused GELU. The forward values stay those of the no-grad call, bit for bit."""
import copy

import pytest
import torch
from torch import nn

import soniq
from soniq.qat import QATConfig

LOW = dict(w_palette=(2, 4), a_palette=(2, 8), w_bits_target=3.0, a_bits_target=4.0)


def _pair(make, x, **kw):
    """(QAT model in phase 2, eval; its packed conversion)."""
    m = soniq.qat.prepare(make(), QATConfig(**LOW, **kw))
    torch.manual_seed(1)
    m(x)
    soniq.qat.freeze_precision(m)
    m.eval()
    return m, soniq.convert(copy.deepcopy(m))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 8))


def _grads(model, x, g):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("kw", [{}, {"a_dynamic": "token"}, {"hadamard_block": 16, "a_dynamic": "token"},
                                {"hadamard_block": 32}, {"smooth_alpha": 0.5}])
def test_linear_gradient_is_the_fake_quantized_models(kw):
    torch.manual_seed(2)
    x = torch.randn(3, 5, 64) * 2  # 3-D input; wide enough that some activations clip
    fake, packed = _pair(_mlp, x.reshape(-1, 64), **kw)
    assert type(packed[1]).__name__ == "FusedActivation"  # the GELU runs inside the first layer
    g = torch.randn(3, 5, 8)
    y, gx = _grads(packed, x, g)
    _, want = _grads(fake, x, g)
    with torch.no_grad():
        assert torch.equal(y, packed(x))  # the gradient path computes the same values
    assert torch.allclose(gx, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(gx == 0, want == 0)  # the same clipping mask


def test_gradient_reaches_trainable_layers_around_a_packed_model():
    torch.manual_seed(3)
    x = torch.randn(16, 64)
    _, packed = _pair(_mlp, x)
    head, tail = nn.Linear(64, 64), nn.Linear(8, 2)
    for p in packed.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([*head.parameters(), *tail.parameters()], lr=0.1)
    loss0 = None
    for _ in range(20):
        loss = tail(packed(head(x))).pow(2).mean()
        loss0 = loss0 if loss0 is not None else loss.detach().item()
        opt.zero_grad()
        loss.backward()
        assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0
        opt.step()
    assert loss.detach().item() < loss0
    with torch.no_grad():
        assert packed(head(x)).grad_fn is None


def test_non_contiguous_and_bfloat16_inputs():
    torch.manual_seed(4)
    fake, packed = _pair(_mlp, torch.randn(16, 64), a_dynamic="token", hadamard_block=16)
    base = torch.randn(6, 130)
    x = base[:, 1:129:2]  # non-contiguous rows and columns
    g = torch.randn(6, 8)
    _, gx = _grads(packed, x, g)
    _, want = _grads(fake, x.contiguous(), g)
    assert torch.allclose(gx, want, rtol=1e-5, atol=1e-6)
    lin, xb, gb = packed[2], torch.randn(6, 48).to(torch.bfloat16), g.to(torch.bfloat16)  # one layer
    yb, gxb = _grads(lin, xb, gb)
    assert yb.dtype == torch.bfloat16 and gxb.dtype == torch.bfloat16
    _, g32 = _grads(lin, xb.float(), gb.float())  # computed in float32, returned in the input's dtype
    assert torch.equal(gxb, g32.to(torch.bfloat16))


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 4, 3, dilation=2))


def test_conv_gradient_is_the_fake_quantized_models():
    torch.manual_seed(5)
    x = torch.rand(2, 3, 11, 9) * 3 - 1
    fake, packed = _pair(_convnet, x)
    g = torch.randn(2, 4, 2, 1)
    y, gx = _grads(packed, x, g)
    _, want = _grads(fake, x, g)
    with torch.no_grad():
        assert torch.equal(y, packed(x))
    assert torch.allclose(gx, want, rtol=1e-5, atol=1e-6) and torch.equal(gx == 0, want == 0)
    one, g1 = _grads(packed, x[0], g[0])  # unbatched [C, H, W]
    assert torch.allclose(g1, gx[0], rtol=1e-5, atol=1e-6)


def test_loaded_weights_change_the_gradient():
    torch.manual_seed(6)
    x = torch.randn(16, 64)
    _, a = _pair(_mlp, x)
    torch.manual_seed(7)
    other = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 8))
    m = soniq.qat.prepare(other, QATConfig(**LOW))
    m(x)
    soniq.qat.freeze_precision(m)
    b = soniq.convert(m.eval())
    g = torch.randn(16, 8)
    _grads(a, x, g)  # builds a's cached dequantized weights
    a.load_state_dict(b.state_dict())
    assert torch.equal(_grads(a, x, g)[1], _grads(b, x, g)[1])


def test_fused_gelu_gradient_when_its_layer_is_not_armed():
    """The FusedActivation applies the GELU itself when its layer was called outside its block
    (layer hooks, or the layers called one at a time): the gradient still has its derivative."""
    torch.manual_seed(8)
    x = torch.randn(10, 64)
    fake, packed = _pair(_mlp, x, a_dynamic="token")
    g = torch.randn(10, 8)
    _, want = _grads(fake, x, g)

    def one_at_a_time(t):
        return packed[2](packed[1](packed[0](t)))

    h = packed[0].register_forward_hook(lambda m, a, out: None)  # a hooked layer is not armed
    try:
        _, hooked = _grads(packed, x, g)
    finally:
        h.remove()
    for got in (hooked, _grads(one_at_a_time, x, g)[1]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_second_derivative_is_refused():
    torch.manual_seed(9)
    _, packed = _pair(_mlp, torch.randn(8, 64))
    x = torch.randn(4, 64, requires_grad=True)
    gx = torch.autograd.grad(packed(x).pow(2).sum(), x, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_pickled_and_copied_layers_drop_the_dequantized_weight():
    torch.manual_seed(10)
    _, packed = _pair(_mlp, torch.randn(8, 64))
    _grads(packed, torch.randn(4, 64), torch.randn(4, 8))
    assert "_grad_weight" in packed[0].__dict__
    assert "_grad_weight" not in copy.deepcopy(packed)[0].__dict__
