"""soniq.nn: training modules (noise / straight-through quantization with learned bits).

QLinear / QConv2d quantize their weights per output channel and their input activations
per input channel; use soniq.qat.prepare to swap them into a model, and soniq.convert to
turn them into packed modules (soniq.nn.PackedLinear / PackedConv2d) running on mpgemm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _dist
from ._packed_nn import PackedConv2d, PackedLinear
from ._quantizers import PHASE_EXACT, ActQuantizer, WeightQuantizer, check_smooth_alpha
from ._dynamic_act import dynamic_codes
from ._hadamard import check_block, layer_block, rotate, rotate_weight
from .ops import quantize
from .ops._quantize import level_bounds


def _bits_summary(bits: Tensor, weights_per_channel: float) -> dict:
    b = bits.detach().float().cpu()
    d = {"mean": float(b.mean()), "channels": int(b.numel()), "per_channel_elems": float(weights_per_channel)}
    if bool((b == torch.round(b)).all()):
        vals, counts = torch.unique(b, return_counts=True)
        d["hist"] = {int(v): int(c) for v, c in zip(vals.tolist(), counts.tolist())}
    return d


# The layer's quantization layout, saved beside its tensors (state_dict key "qat_layout", int64):
# what the weight and clips mean. Loading a checkpoint into a layer prepared differently (another
# rotation, palette, activation mode or smoothing) would run silently wrong numbers, so it is refused.
_LAYOUT_KEY = "qat_layout"
_LAYOUT_VERSION = 1
_LAYOUT_FIELDS = ("version", "w_palette[0]", "w_palette[1]", "a_palette[0]", "a_palette[1]", "a_dynamic",
                  "hadamard_block", "smooth_alpha")


def _layout_value(field: str, v: int):
    """A layout entry as the QATConfig field spells it (error messages)."""
    if field == "a_dynamic":
        return "'token'" if v == 1 else "None"
    if field == "smooth_alpha":
        return "set" if v == 1 else "None"
    return v


class _QMixin:
    smooth_alpha = None  # per-input-channel activation smoothing (QLinear only), see QLinear
    hadamard_block = 0  # block Hadamard rotation of the input (QLinear only), see QLinear

    def quant_layout(self) -> Tensor:
        """[version, w_palette, a_palette, a_dynamic (1 = token), hadamard_block, smoothing (1 = on)]"""
        return torch.tensor([_LAYOUT_VERSION, *self.w_quant.palette, *self.a_quant.palette,
                             int(self.a_quant.dynamic == "token"), int(self.hadamard_block),
                             int(self.smooth_alpha is not None)], dtype=torch.int64, device=self.weight.device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + _LAYOUT_KEY] = self.quant_layout()

    def _layout_check(self, saved, state_dict, prefix: str) -> tuple:
        """(error message or None, {quantizer: palette to adopt}). A palette may differ where the
        checkpoint's quantizer is in phase 2 (set_uniform_precision widens palettes to hold the
        frozen bits, which are what phase 2 uses): the layer takes the saved palette."""
        if not isinstance(saved, Tensor) or saved.dim() != 1 or saved.numel() < 1:
            return f"{prefix}{_LAYOUT_KEY}: expected an int64 vector, got {saved!r}", {}
        saved = [int(v) for v in saved.tolist()]
        if saved[0] != _LAYOUT_VERSION or len(saved) != len(_LAYOUT_FIELDS):
            return (f"{prefix}{_LAYOUT_KEY}: layout version {saved[0]} with {len(saved)} entries; this soniq "
                    f"reads version {_LAYOUT_VERSION} with {len(_LAYOUT_FIELDS)} (saved by another soniq version?)"), {}
        diff = [(f, s, m) for f, s, m in zip(_LAYOUT_FIELDS, saved, self.quant_layout().tolist()) if s != m]
        adopt = {}
        for i, name in ((1, "w_quant"), (3, "a_quant")):
            q, pal = getattr(self, name), (saved[i], saved[i + 1])
            phase = state_dict.get(f"{prefix}{name}.phase")
            if (pal != q.palette and 1 <= pal[0] <= pal[1] <= 8 and isinstance(phase, Tensor) and phase.numel() == 1
                    and int(phase) == PHASE_EXACT):
                adopt[q] = pal
                diff = [d for d in diff if d[0] not in _LAYOUT_FIELDS[i:i + 2]]
        if not diff:
            return None, adopt
        was = ", ".join(f"{f}={_layout_value(f, s)}" for f, s, _ in diff)
        has = ", ".join(f"{f}={_layout_value(f, m)}" for f, _, m in diff)
        return (f"{prefix[:-1] or type(self).__name__}: the checkpoint was saved with {was}, this layer has "
                f"{has}; prepare the model with the QATConfig the checkpoint was made with"), {}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """As nn.Module's, plus the layout check: a checkpoint made under another layout is an
        error and this layer keeps its state. Checkpoints saved before the layout was (no key)
        load as before."""
        key, adopt = prefix + _LAYOUT_KEY, {}
        if key in state_dict:
            err, adopt = self._layout_check(state_dict[key], state_dict, prefix)
            if err:
                error_msgs.append(err)
                for q in (self.w_quant, self.a_quant):  # torch loads them next: they keep theirs too
                    q.skip_next_load = True
                return
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) == errors:
            for q, pal in adopt.items():
                q.palette = pal

    def _setup_quant(self, w_palette, a_palette, w_bits, a_bits, a_axis, a_dynamic=None):
        self.w_quant = WeightQuantizer(self.weight, w_palette, w_bits)
        self.a_quant = ActQuantizer(self.weight.shape[1], a_palette, a_bits, a_axis, dynamic=a_dynamic)

    def effective_weight(self) -> Tensor:
        """The float weight the quantizer sees (QLinear with smoothing: weight * a_smooth)."""
        return self.weight

    def quantizer_input(self, x: Tensor) -> Tensor:
        """The float input the activation quantizer sees (QLinear: x * a_inv_smooth with
        smoothing, x rotated with hadamard_block)."""
        return x

    @property
    def phase(self) -> int:
        return int(self.w_quant.phase)

    def precision(self) -> dict:
        """Bits this layer uses now: weights per output channel, activations per input channel."""
        wb = self.stored_w_bits()
        d = {"type": type(self).__name__, "phase": self.phase,
             "w_bits": _bits_summary(wb, self.w_quant.per_channel),
             "a_bits": _bits_summary(self.a_quant.bits(), float(self.a_quant.elems_per_channel)),
             "a_signed": self.a_quant.signed}
        d["w_bytes"] = float((wb.detach() * self.w_quant.per_channel).sum() / 8)
        return d

    def stored_w_bits(self) -> Tensor:
        """Bits per weight of each output channel as stored: the tiers, or for trellis-coded
        weights (soniq.ptq, trellis_states_log2) the trellis widths, while the layer runs them
        as 8-bit codes and they are still the codes the PTQ chose (once training moves the
        weight or its clip, soniq.convert stores 8-bit rows, and 8 is what is counted)."""
        tw = getattr(self, "w_trellis", None)
        if tw is None or not tw.current(self):
            return self.w_quant.bits()
        return tw.row_bits.to(self.w_quant.frozen_bits)

    def quantized_weight(self) -> Tensor:
        return self.w_quant(self.effective_weight())

    def integer_operands(self, x: Tensor):
        """Phase 2 only: (activation values, weight values) as exact integers (int64), the
        operands the packed kernels multiply (conv inputs not yet unfolded)."""
        if self.phase != PHASE_EXACT:
            raise RuntimeError(f"{self.a_quant.name}: integer operands exist only after freeze_precision")
        ax = self.a_quant.axis % x.dim()
        if self.a_quant.dynamic:  # per-token scales: the codes of ops.quantize_pack(dynamic="token")
            xs = self.quantizer_input(x.detach()).float()
            step = self.a_quant.step().detach().float()
            lo, hi, alpha = level_bounds(self.a_quant.bits().float(), self.a_quant.signed)
            va = dynamic_codes(xs.reshape(-1, xs.shape[-1]), step, lo, hi, alpha)[0].reshape(xs.shape)
        else:
            va = quantize(self.quantizer_input(x.detach()), self.a_quant.step().detach(), self.a_quant.bits(),
                          signed=self.a_quant.signed, axis=ax, values_only=True)
        vw = quantize(self.effective_weight().detach(), self.w_quant.step().detach(), self.w_quant.bits(),
                      signed=True, axis=0, values_only=True)
        return va.to(torch.int64), vw.to(torch.int64)


@torch.no_grad()
def smooth_factors(amax_x: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """SmoothQuant factors s_k = max|x_k|^alpha / max_n|W_nk|^(1-alpha) from the per-input
    largest |x| amax_x [K] of the weight [N, K], scaled to geometric mean 1."""
    amax_x = amax_x.float().clamp_min(float(amax_x.max()) * 1e-5 + 1e-12)
    amax_w = weight.detach().float().abs().amax(0).clamp_min(1e-8)
    s = amax_x.pow(alpha) / amax_w.pow(1.0 - alpha)
    return (s / s.log().mean().exp()).clamp(1e-4, 1e4)


class QLinear(_QMixin, nn.Linear):
    """nn.Linear with quantized weights (per output channel) and inputs (per input feature).

    With smooth_alpha (0..1), the first batch also sets a per-input-channel factor s
    (SmoothQuant: s_k = max|x_k|^alpha / max_n|W_nk|^(1-alpha), geometric mean 1): the layer
    computes (x * (1/s)) @ (W * s).T, the same product in float, with activation outlier
    channels shrunk before the per-layer activation clip. The packed layer applies the same
    float32 1/s before quantizing, so fake and real stay equal.

    a_dynamic="token": per-token dynamic activation scales (see soniq.qat.QATConfig).

    hadamard_block (a power of two; 0 = off): the input is rotated by a block Hadamard
    transform H before it is quantized (soniq._hadamard) and the weight is kept in that basis
    (from_float stores W H / b), so the layer computes (x H) @ (W H / b).T = x @ W.T in float
    with activation outliers spread over their block. A layer whose in_features the block
    does not divide takes the largest power of two that does (none: no rotation). The packed
    layer rotates its input the same way, bit for bit. Not combined with smoothing."""

    def __init__(self, in_features, out_features, bias=True, *, w_palette=(2, 4), a_palette=(4, 8),
                 w_bits=None, a_bits=None, smooth_alpha=None, a_dynamic=None, hadamard_block=0, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_hadamard(hadamard_block, smooth_alpha)
        self._setup_quant(w_palette, a_palette, w_bits or sum(w_palette) / 2, a_bits or sum(a_palette) / 2, -1,
                          a_dynamic)
        self._setup_smoothing(smooth_alpha)

    def _setup_hadamard(self, block, smooth_alpha) -> None:
        block = check_block(block)
        if block and smooth_alpha is not None:
            raise ValueError("hadamard_block and smooth_alpha cannot be combined (one input transform per layer)")
        self.hadamard_block = layer_block(block, self.in_features) if block else 0

    def _setup_smoothing(self, alpha):
        self.smooth_alpha = check_smooth_alpha(alpha)
        ones = torch.ones(self.in_features, device=self.weight.device)
        self.register_buffer("a_smooth", ones)
        self.register_buffer("a_inv_smooth", ones.clone())

    @torch.no_grad()
    def _init_smoothing(self, x: Tensor) -> None:
        self.set_smoothing(smooth_factors(x.detach().float().abs().reshape(-1, self.in_features).amax(0),
                                          self.weight, self.smooth_alpha))

    @torch.no_grad()
    def set_smoothing(self, s: Tensor) -> None:
        """Sets the factors s (from smooth_factors) and refits the weight clip for W * s."""
        self.a_smooth.copy_(s)
        self.a_inv_smooth.copy_(torch.ones_like(s) / s)
        # the weight clip was fit to the unsmoothed weight
        b = int(round(float(self.w_quant.bits().mean())))
        self.w_quant.clip.copy_(WeightQuantizer._init_clip(self.effective_weight().detach(), b))
        _dist.broadcast_from_rank0(self.a_smooth, self.a_inv_smooth, self.w_quant.clip)  # as calibrate()

    def effective_weight(self) -> Tensor:
        return self.weight if self.smooth_alpha is None else self.weight * self.a_smooth

    def quantizer_input(self, x: Tensor) -> Tensor:
        if self.hadamard_block:
            return rotate(x, self.hadamard_block)
        return x if self.smooth_alpha is None else x * self.a_inv_smooth.to(x.dtype)

    @classmethod
    def from_float(cls, m: nn.Linear, **kw) -> "QLinear":
        q = cls.__new__(cls)
        nn.Linear.__init__(q, m.in_features, m.out_features, m.bias is not None,
                           device=m.weight.device, dtype=m.weight.dtype)
        q._setup_hadamard(kw.get("hadamard_block", 0), kw.get("smooth_alpha"))
        with torch.no_grad():
            q.weight.copy_(rotate_weight(m.weight.detach(), q.hadamard_block))  # the basis of the rotated input
            if m.bias is not None:
                q.bias.copy_(m.bias)
        q._setup_quant(kw["w_palette"], kw["a_palette"], kw["w_bits"], kw["a_bits"], -1, kw.get("a_dynamic"))
        q._setup_smoothing(kw.get("smooth_alpha"))
        return q

    def forward(self, x: Tensor) -> Tensor:
        if self.smooth_alpha is not None and not bool(self.a_quant.calibrated):
            self._init_smoothing(x)
        return F.linear(self.a_quant(self.quantizer_input(x)), self.w_quant(self.effective_weight()), self.bias)

    def extra_repr(self) -> str:
        rot = f", hadamard_block={self.hadamard_block}" if self.hadamard_block else ""
        return super().extra_repr() + rot


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
        if x.dim() == 3:  # unbatched [C, H, W], as nn.Conv2d takes it: channels stay on dim 1
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.a_quant.name}: expected input [B, {self.in_channels}, H, W] or "
                             f"[{self.in_channels}, H, W], got shape {tuple(x.shape)}")
        return self._conv_forward(self.a_quant(x), self.w_quant(self.weight), self.bias)


__all__ = ["QLinear", "QConv2d", "PackedLinear", "PackedConv2d"]
