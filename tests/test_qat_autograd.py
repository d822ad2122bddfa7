"""Gradients of the quantizer autograd Functions: gradcheck with fixed noise, LSQ/STE
against torch's learnable fake-quantize, finite differences on the learned bits."""
import pytest
import torch

from soniq.ops._quantize import level_bounds
from soniq._quant_autograd import NoiseQuant, RoundQuant
from soniq._quantizers import ActQuantizer, WeightQuantizer


@pytest.mark.parametrize("signed", [False, True])
def test_noise_quant_gradcheck_fixed_noise(signed):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 4, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    s = (torch.rand(4, generator=g, dtype=torch.float64) * 0.3 + 0.2).requires_grad_()
    bits = torch.tensor([1.3, 2.0, 2.7, 3.5], dtype=torch.float64)
    lo, hi, al = (t.clone().requires_grad_() for t in level_bounds(bits, signed))
    f = lambda x, s, lo, hi, al: NoiseQuant.apply(x, s, lo, hi, al, 1, 1234)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, s, lo, hi, al), eps=1e-6, atol=1e-6)


def test_round_quant_matches_torch_learnable_fake_quantize():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 7, generator=g) * 3).requires_grad_()
    s = (torch.rand(6, generator=g) * 0.5 + 0.1).requires_grad_()
    lo, hi, al = level_bounds(torch.full((6,), 3.0), True)
    out = RoundQuant.apply(x, s, lo, hi, al, 0)
    gy = torch.randn(6, 7, generator=g)
    gx, gs = torch.autograd.grad(out, (x, s), gy)
    x2, s2 = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    ref = torch._fake_quantize_learnable_per_channel_affine(x2, s2, torch.zeros(6), 0, -4, 3, 1.0)
    rx, rs = torch.autograd.grad(ref, (x2, s2), gy)
    assert torch.equal(out, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gs, rs, rtol=1e-5, atol=1e-5)


def _fd_check(q, inp, seed=7, eps=1e-6):
    """Autograd gradient to bits_logit against central differences (same noise each call)."""
    r = torch.randn_like(inp)

    def loss():
        torch.manual_seed(seed)
        return (q(inp) * r).sum()

    q.bits_logit.grad = None
    loss().backward()
    got = q.bits_logit.grad.clone()
    with torch.no_grad():
        for c in range(q.bits_logit.numel()):
            q.bits_logit[c] += eps
            up = loss()
            q.bits_logit[c] -= 2 * eps
            dn = loss()
            q.bits_logit[c] += eps
            fd = (up - dn) / (2 * eps)
            assert abs(float(fd) - float(got[c])) <= 1e-4 * max(1.0, abs(float(fd))), (c, float(fd), float(got[c]))
    assert bool((got != 0).any())


def test_weight_bits_finite_differences():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    q = WeightQuantizer(w, (1, 4), 2.5).double()
    _fd_check(q, w)


@pytest.mark.parametrize("shift", [0.0, -0.5])  # unsigned (ReLU-like) and signed inputs
def test_activation_bits_finite_differences(shift):
    torch.manual_seed(0)
    x = torch.rand(4, 6, 5, 5, dtype=torch.float64) * 3 + shift
    q = ActQuantizer(6, (2, 8), 4.0, axis=1).double()
    q.calibrate(x)
    assert q.signed == (shift < 0)
    _fd_check(q, x)
