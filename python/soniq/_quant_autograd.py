"""torch.autograd.Functions over soniq.ops.quantize.

NoiseQuant (phase 1): v = clamp(x/s + alpha*(u - 1/2), lo, hi), out = v*s. Piecewise linear in
every input, so its exact gradient exists almost everywhere: backward regenerates the same
Philox noise from the seed (nothing stored) and differentiates x, s, lo, hi, alpha -- the
gradient to the bits flows through s (noise magnitude) and lo/hi/alpha (clipping range).
RoundQuant (phase 2): straight-through rounding with clipping masks (as torch.fake_quantize) and the LSQ gradient
to the step (Esser et al. 2020): d out/d s = v - x/s inside the range, v at the clamp.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .ops._quantize import philox_uniform


def _view(t: Tensor, dim: int, axis: int) -> Tensor:
    shape = [1] * dim
    shape[axis] = -1
    return t.view(shape)


def _sum_to_channel(t: Tensor, axis: int) -> Tensor:
    dims = [d for d in range(t.dim()) if d != axis]
    return t.sum(dims) if dims else t


class NoiseQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, lo, hi, alpha, axis: int, seed: int):
        x = x.contiguous()
        ctx.save_for_backward(x, s, lo, hi, alpha)
        ctx.axis, ctx.seed = axis, seed
        return torch.ops.soniq.quantize_raw(x, s.contiguous(), lo.contiguous(), hi.contiguous(),
                                            alpha.contiguous(), axis, 1, seed, False)

    @staticmethod
    def backward(ctx, g):
        x, s, lo, hi, alpha = ctx.saved_tensors
        ax, d = ctx.axis, x.dim()
        n = philox_uniform(x.numel(), ctx.seed, dtype=x.dtype, device=x.device).view(x.shape) - 0.5
        sv, lov, hiv, av = (_view(t, d, ax) for t in (s, lo, hi, alpha))
        t = x * (1.0 / sv) + av * n
        below, above = t < lov, t > hiv
        inside = ~(below | above)
        gx = g * inside
        gs = _sum_to_channel(g * torch.where(inside, av * n, torch.where(below, lov, hiv)), ax)
        glo = _sum_to_channel(g * below, ax) * s
        ghi = _sum_to_channel(g * above, ax) * s
        ga = _sum_to_channel(g * inside * n, ax) * s
        return gx, gs, glo, ghi, ga, None, None


class RoundQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, lo, hi, alpha, axis: int):
        x = x.contiguous()
        v = torch.ops.soniq.quantize_raw(x, s.contiguous(), lo.contiguous(), hi.contiguous(),
                                         alpha.contiguous(), axis, 0, 0, True)
        ctx.save_for_backward(x, s, lo, hi, alpha, v)
        ctx.axis = axis
        return v * _view(s, x.dim(), axis)

    @staticmethod
    def backward(ctx, g):
        x, s, lo, hi, alpha, v = ctx.saved_tensors
        ax, d = ctx.axis, x.dim()
        t = x * (1.0 / _view(s, d, ax))
        # the mask of torch.fake_quantize: the rounded (unclamped) value lies on the grid
        r = torch.where(_view(alpha, d, ax) == 1, torch.round(t), torch.round((t + 1) * 0.5) * 2 - 1)
        inside = (r >= _view(lo, d, ax)) & (r <= _view(hi, d, ax))
        gx = g * inside
        gs = _sum_to_channel(g * torch.where(inside, v - t, v), ax)
        return gx, gs, None, None, None, None


def grad_scale(t: Tensor, factor: float) -> Tensor:
    """Identity forward, gradient times `factor` (LSQ step-size gradient scaling)."""
    return (t - t * factor).detach() + t * factor
