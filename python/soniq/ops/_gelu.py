"""soniq::gelu_: the exact (erf) GELU in place, as packed layers apply a fused activation.

On the CPU, soniq's native GELU (cpp/gelu.h): the same bits on every ISA path, faster than
torch's and closer to the float64 GELU (its erf is faithfully rounded; torch's CPU erf is
Abramowitz-Stegun 7.1.26, off by up to 1.5e-7). The op's body, what a device type without a
kernel of its own runs (CUDA), is torch's gelu. PackedLinear's fused forward applies the
same function inside its native call (LinearPlan.forward(..., gelu=True)).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._native import _C
from .._op_kernels import register


@torch.library.custom_op("soniq::gelu_", mutates_args=("x",))
def gelu_(x: Tensor) -> None:
    """x = gelu(x) (erf form), in place. The body runs on device types with no kernel of their
    own (torch's gelu)."""
    torch.ops.aten.gelu_(x)


@register(gelu_, "cpu")
def gelu_cpu(x: Tensor) -> None:
    if x.dtype == torch.float32 and x.is_contiguous():
        _C.gelu_(x.data_ptr(), x.numel())
        return
    if not x.is_floating_point():
        raise TypeError(f"gelu_: x must be a floating-point tensor, got {x.dtype}")
    if x.dtype == torch.float64:  # the native GELU is float32: float64 keeps its own accuracy
        torch.ops.aten.gelu_(x)
        return
    y = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    _C.gelu_(y.data_ptr(), y.numel())
    x.copy_(y)


@gelu_.register_fake
def _(x):
    return None


# An in-place activation with no backward: on a tensor that requires grad it would pass the
# gradient through unchanged (identity), silently. Refused, as torch refuses in-place ops on
# leaves that require grad.
_lib = torch.library.Library("soniq", "IMPL")


def _gelu_autograd(x: Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("gelu_: x requires grad, and soniq's in-place GELU has no backward; use "
                           "torch.nn.functional.gelu to train, or run under torch.no_grad()")
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.soniq.gelu_(x)


_lib.impl("gelu_", _gelu_autograd, "Autograd")
