"""soniq.convert: fake-quantized (phase 2) modules -> packed modules on ops.mpgemm."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from . import ops
from ._fastpath import disable_torch_fastpaths
from ._fuse import fuse_activations
from ._packed_nn import PackedConv2d, PackedLinear
from .packed import KLayout
from ._quantizers import PHASE_EXACT
from .nn import QConv2d, QLinear


def _pack_weight(m, a_bits_k: torch.Tensor, name: str):
    w_step = m.w_quant.step().detach().float()
    vw = ops.quantize(m.effective_weight().detach().float(), w_step, m.w_quant.bits(), signed=True, axis=0,
                      values_only=True).to(torch.int64)
    vw = vw.reshape(vw.shape[0], -1)
    _check_trellis(m, vw, name)
    return ops.pack(vw, m.w_quant.bits().to(torch.int64), signed=True, axis=0,
                    scale=w_step, k_layout=KLayout.from_bits(a_bits_k))


def _check_trellis(m, codes: torch.Tensor, name: str) -> None:
    """A layer rounded to trellis codes (soniq.ptq, trellis_states_log2) keeps its streams for
    soniq.save only while its codes are still what they decode to: training after the PTQ
    changes the codes, and the layer is then saved as the 8-bit rows it runs as."""
    tw = getattr(m, "w_trellis", None)
    if tw is None:
        return
    if not bool((m.w_quant.bits() == 8).all()) or not tw.matches(codes):
        warnings.warn(f"{name}: the weights changed since they were trellis-coded (soniq.ptq); the packed layer "
                      "keeps its 8-bit codes and soniq.save stores those, not the trellis streams", stacklevel=4)
        del m.w_trellis


def _keep_trellis(m, out):
    if getattr(m, "w_trellis", None) is not None:
        out.w_trellis = m.w_trellis
    return out


def convert_module(m, name: str):
    if m.phase != PHASE_EXACT:
        raise ValueError(f"module {name!r} ({type(m).__name__}) is still in phase 1 (noise, real-valued bits); "
                         "call soniq.qat.freeze_precision(model) and fine-tune before soniq.convert")
    if not bool(m.a_quant.calibrated):
        raise ValueError(f"module {name!r} ({type(m).__name__}) has an uncalibrated activation quantizer; "
                         "run the model on data before converting")
    a_bits = m.a_quant.bits().to(torch.int64).cpu()
    a_scale = m.a_quant.step().detach().float().cpu()
    signed = m.a_quant.signed
    bias = None if m.bias is None else m.bias.detach()
    if isinstance(m, QLinear):
        inv = None if m.smooth_alpha is None else m.a_inv_smooth.detach().float().cpu()
        out = PackedLinear(_pack_weight(m, a_bits, name), a_bits, a_scale, signed, bias, name, a_inv_smooth=inv,
                           a_dynamic=m.a_quant.dynamic, hadamard_block=m.hadamard_block)
        return _keep_trellis(m, out)
    if isinstance(m, QConv2d):
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(f"module {name!r} (QConv2d): the converter handles groups=1 with numeric zero padding only")
        if signed and any(m.padding) and bool((a_bits == 1).any()):
            raise ValueError(f"module {name!r} (QConv2d): signed 1-bit activations cannot represent the zero "
                             "padding ({-1, +1}); use a low tier of 2+ bits or no padding")
        kk = m.kernel_size[0] * m.kernel_size[1]
        out = PackedConv2d(_pack_weight(m, a_bits.repeat_interleave(kk), name), a_bits, a_scale, signed, bias, name,
                           kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation)
        return _keep_trellis(m, out)
    raise ValueError(f"module {name!r}: soniq.convert cannot handle {type(m).__name__}")


def convert(model: nn.Module, *, inplace: bool = False, fuse: bool = True) -> nn.Module:
    """Returns a copy of `model` (phase 2) where every QLinear / QConv2d is a PackedLinear /
    PackedConv2d: exact integer accumulators equal to the fake-quantized model's. fuse: a
    packed Linear followed by an exact GELU applies it in place to its output (the same
    values, one tensor fewer per call: soniq.fuse_activations); fuse=False keeps the modules."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = model if inplace else copy.deepcopy(model)
    names = [n for n, m in out.named_modules() if isinstance(m, (QLinear, QConv2d))]
    if not names:
        raise ValueError("model has no soniq QLinear/QConv2d layers to convert (prepare and train it first)")
    if isinstance(out, (QLinear, QConv2d)):
        return convert_module(out.cpu(), "<root>")
    for n in names:
        parts = n.split(".")
        parent = out
        for p in parts[:-1]:
            parent = getattr(parent, p)
        setattr(parent, parts[-1], convert_module(getattr(parent, parts[-1]).cpu(), n))
    if fuse:
        fuse_activations(out)
    disable_torch_fastpaths(out)
    return out.cpu().eval()
