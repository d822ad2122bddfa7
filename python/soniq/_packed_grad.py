"""Gradients through packed layers, to their input: the straight-through estimate the
fake-quantized (phase 2) layer's autograd gives, i.e. the activation quantizer passes the
gradient where its rounded code lies in the tier's range (QAT's clipping mask, computed by the
same autograd functions) and the weight is the dequantized packed one. So a packed model can sit
inside a graph that trains something else (a head, adapters, inputs) and gets the gradients
its fake-quantized twin would; the packed weights stay fixed (train the fake-quantized model to
change them). The forward values are the layer's usual ones, bit for bit."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import ops
from ._dynamic_act import DynRoundQuant
from ._quant_autograd import RoundQuant


class InputGrad(torch.autograd.Function):
    """out = layer's forward of x (values from layer._forward(x, gelu)); d out / d x from
    layer._input_grad(grad_out, x, gelu). gelu: whether this call applies the fused GELU."""

    @staticmethod
    def forward(ctx, x: Tensor, layer, gelu: bool) -> Tensor:
        with torch.no_grad():
            out = layer._forward(x.detach(), gelu)
        ctx.layer, ctx.gelu = layer, gelu
        ctx.save_for_backward(x.detach())
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # create_graph=True: an error, not a silent constant
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        return ctx.layer._input_grad(grad_out, x, ctx.gelu), None, None


class NativeGelu(torch.autograd.Function):
    """soniq's native GELU (activate(x): in place on a fresh copy, the fused layers' values)
    with the exact GELU's derivative: FusedActivation applying the GELU itself (its layer was
    not armed by its block) on an input that needs a gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, activate) -> Tensor:
        ctx.save_for_backward(x.detach())
        return activate(x.detach().clone())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        return grad_out * gelu_derivative(x), None


def needs_input_grad(x) -> bool:
    """True when the layer's output must carry a gradient to x (eager autograd)."""
    return isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled() \
        and not torch.compiler.is_compiling()


def gelu_derivative(z: Tensor) -> Tensor:
    """d/dz of the exact GELU z * Phi(z): Phi(z) + z * phi(z)."""
    return 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0)))) + z * torch.exp(-0.5 * z * z) * (
        1.0 / math.sqrt(2.0 * math.pi))


def dequantized(w) -> Tensor:
    """The packed weight's values as float32 [rows, K] in the original order: codes x row scale."""
    v = ops.unpack(w).to(torch.float32)
    return v if w.row_scale is None else v * w.row_scale.to(torch.float32).view(-1, 1)


def through_quantizer(u: Tensor, grad_v: Tensor, params: tuple, dynamic: bool, axis: int) -> Tensor:
    """d loss / d u from d loss / d (fake-quantized u): the phase-2 quantizer's own backward
    (RoundQuant per channel along axis, DynRoundQuant per token), params (scale, lo, hi, alpha)."""
    with torch.enable_grad():
        u = u.detach().requires_grad_(True)
        v = DynRoundQuant.apply(u, *params) if dynamic else RoundQuant.apply(u, *params, axis)
        return torch.autograd.grad(v, u, grad_v)[0]
