"""soniq.nn: training modules (noise / straight-through quantization with learned bits).

QLinear / QConv2d quantize their weights per output channel and their input activations
per input channel; use soniq.qat.prepare to swap them into a model, and soniq.convert to
turn them into packed modules (soniq.nn.PackedLinear / PackedConv2d) running on mpgemm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .qat._quantizers import PHASE_EXACT, ActQuantizer, WeightQuantizer


def _bits_summary(bits: Tensor, weights_per_channel: float) -> dict:
    b = bits.detach().float().cpu()
    d = {"mean": float(b.mean()), "channels": int(b.numel()), "per_channel_elems": float(weights_per_channel)}
    if bool((b == torch.round(b)).all()):
        vals, counts = torch.unique(b, return_counts=True)
        d["hist"] = {int(v): int(c) for v, c in zip(vals.tolist(), counts.tolist())}
    return d


class _QMixin:
    def _setup_quant(self, w_palette, a_palette, w_bits, a_bits, a_axis):
        self.w_quant = WeightQuantizer(self.weight, w_palette, w_bits)
        self.a_quant = ActQuantizer(self.weight.shape[1], a_palette, a_bits, a_axis)

    @property
    def phase(self) -> int:
        return int(self.w_quant.phase)

    def precision(self) -> dict:
        """Bits this layer uses now: weights per output channel, activations per input channel."""
        d = {"type": type(self).__name__, "phase": self.phase,
             "w_bits": _bits_summary(self.w_quant.bits(), self.w_quant.per_channel),
             "a_bits": _bits_summary(self.a_quant.bits(), float(self.a_quant.elems_per_channel)),
             "a_signed": self.a_quant.signed}
        d["w_bytes"] = float((self.w_quant.bits().detach() * self.w_quant.per_channel).sum() / 8)
        return d

    def quantized_weight(self) -> Tensor:
        return self.w_quant(self.weight)

    def integer_operands(self, x: Tensor):
        """Phase 2 only: (activation values, weight values) as exact integers (int64), the
        operands the packed kernels multiply (conv inputs not yet unfolded)."""
        if self.phase != PHASE_EXACT:
            raise RuntimeError(f"{self.a_quant.name}: integer operands exist only after freeze_precision")
        from .ops import quantize

        ax = self.a_quant.axis % x.dim()
        va = quantize(x.detach(), self.a_quant.step().detach(), self.a_quant.bits(), signed=self.a_quant.signed,
                      axis=ax, values_only=True)
        vw = quantize(self.weight.detach(), self.w_quant.step().detach(), self.w_quant.bits(), signed=True,
                      axis=0, values_only=True)
        return va.to(torch.int64), vw.to(torch.int64)


class QLinear(_QMixin, nn.Linear):
    """nn.Linear with quantized weights (per output channel) and inputs (per input feature)."""

    def __init__(self, in_features, out_features, bias=True, *, w_palette=(2, 4), a_palette=(4, 8),
                 w_bits=None, a_bits=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_quant(w_palette, a_palette, w_bits or sum(w_palette) / 2, a_bits or sum(a_palette) / 2, -1)

    @classmethod
    def from_float(cls, m: nn.Linear, **kw) -> "QLinear":
        q = cls.__new__(cls)
        nn.Linear.__init__(q, m.in_features, m.out_features, m.bias is not None,
                           device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(m.weight)
            if m.bias is not None:
                q.bias.copy_(m.bias)
        q._setup_quant(kw["w_palette"], kw["a_palette"], kw["w_bits"], kw["a_bits"], -1)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.a_quant(x), self.w_quant(self.weight), self.bias)


class QConv2d(_QMixin, nn.Conv2d):
    """nn.Conv2d with quantized weights (per output channel) and inputs (per input channel)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, *, w_palette=(2, 4), a_palette=(4, 8), w_bits=None, a_bits=None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         device=device, dtype=dtype)
        self._check_supported()
        self._setup_quant(w_palette, a_palette, w_bits or sum(w_palette) / 2, a_bits or sum(a_palette) / 2, 1)

    def _check_supported(self):
        if self.groups != 1:
            raise ValueError(f"QConv2d supports groups=1 only (per-input-channel activation bits), got groups={self.groups}")
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError(f"QConv2d supports numeric zero padding only, got padding={self.padding!r}, "
                             f"padding_mode={self.padding_mode!r}")

    @classmethod
    def from_float(cls, m: nn.Conv2d, **kw) -> "QConv2d":
        q = cls.__new__(cls)
        nn.Conv2d.__init__(q, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                           m.groups, m.bias is not None, m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
        q._check_supported()
        with torch.no_grad():
            q.weight.copy_(m.weight)
            if m.bias is not None:
                q.bias.copy_(m.bias)
        q._setup_quant(kw["w_palette"], kw["a_palette"], kw["w_bits"], kw["a_bits"], 1)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.a_quant(x), self.w_quant(self.weight), self.bias)


from ._packed_nn import PackedConv2d, PackedLinear  # noqa: E402

__all__ = ["QLinear", "QConv2d", "PackedLinear", "PackedConv2d"]
