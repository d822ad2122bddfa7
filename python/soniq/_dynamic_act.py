"""Per-token dynamic activation scales on the fake-quantized side: the float32 steps of
ops.quantize_pack(dynamic="token") (cpp/actpack.h) in torch, so the codes are bit-identical
to the packed path.

Row r's scale a_r is its largest finite |x| (NaN, +-inf skipped), and channel k is
quantized with the float32 scale S = s_k * a_r (s_k: the static per-tier scale, relative to
the row's range), inverse 1 / S: t = x * (1 / S), v = round_half_even(clamp(t)), out = v * S.
a_r = 1 where a_r is 0 or, for some tier, s * a_r or its inverse is 0 or inf.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._quant_autograd import NoiseQuant
from .ops import _quantize  # noqa: F401  (registers soniq::quantize_raw)

_FMAX = torch.finfo(torch.float32).max


def token_scale(x: Tensor, scale: Tensor) -> Tensor:
    """a_r (float32 [M]) of rows x [M, K] for the per-column static scales `scale` [K]."""
    ax = x.detach().abs()
    a = torch.where(ax <= _FMAX, ax, torch.zeros_like(ax)).amax(1)  # NaN and inf fail the compare
    u = torch.unique(scale.detach())  # one per tier
    sa = u[None, :] * a[:, None]
    ok = ((sa > 0) & (sa <= _FMAX) & (torch.ones_like(sa) / sa <= _FMAX)).all(1)
    return torch.where(ok, a, torch.ones_like(a))


def scaled_rows(x: Tensor, scale: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """(S, t): the float32 scales s_k * a_r [M, K] and t = x * (1 / S), as the kernels round them."""
    S = scale.detach()[None, :] * a[:, None]
    return S, x * (torch.ones_like(S) / S)


def _codes(x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, alpha: Tensor):
    a = token_scale(x, scale)
    S, t = scaled_rows(x.detach(), scale, a)
    ones = torch.ones_like(scale)  # t * (1 / 1) == t: quantize_raw then only clamps and rounds
    v = torch.ops.soniq.quantize_raw(t.contiguous(), ones.contiguous(), lo.contiguous(), hi.contiguous(),
                                     alpha.contiguous(), 1, 0, 0, True)
    return v, S, a, t


def dynamic_codes(x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(v, S, a) for float32 rows x [M, K]: integer values v (float32), scales S [M, K] and a [M]."""
    return _codes(x, scale, lo, hi, alpha)[:3]


class DynRoundQuant(torch.autograd.Function):
    """Phase 2 with per-token scales: straight-through rounding (clipping mask as RoundQuant)
    and the LSQ gradient to the static scale s_k, through S = s_k * a_r (a_r held constant)."""

    @staticmethod
    def forward(ctx, x, s, lo, hi, alpha):
        v, S, a, t = _codes(x.contiguous(), s, lo, hi, alpha)
        ctx.save_for_backward(t, v, a, lo, hi, alpha)
        return v * S

    @staticmethod
    def backward(ctx, g):
        t, v, a, lo, hi, alpha = ctx.saved_tensors
        r = torch.where(alpha == 1, torch.round(t), torch.round((t + 1) * 0.5) * 2 - 1)
        inside = (r >= lo) & (r <= hi)
        gx = g * inside
        gs = (g * torch.where(inside, v - t, v) * a[:, None]).sum(0)
        return gx, gs, None, None, None


def dynamic_fake_quant(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, alpha: Tensor, exact: bool,
                       seed: int) -> Tensor:
    """x [..., K] with per-token scales: exact rounding (phase 2, bit-identical to the packed
    path) or phase-1 noise of one step on x / a_r (then times a_r; gradients as NoiseQuant)."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if exact:
        return DynRoundQuant.apply(rows, step, lo, hi, alpha).reshape(shape)
    a = token_scale(rows, step)[:, None]
    return (NoiseQuant.apply(rows / a, step, lo, hi, alpha, 1, seed) * a).reshape(shape)
