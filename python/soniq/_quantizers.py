"""Per-channel quantizers with learnable bits (phase 1) and learned scales (both phases).

Weights: signed, one clip value per output channel; step = clip / 2^(b-1), so the grid is
[-clip, clip - step] (1-bit: {-clip, +clip}).
Activations: one clip value per layer, so a channel's step depends only on its bits (one
scale per tier, which is what the packed GEMM can factor out): unsigned step =
clip / (2^b - 1) (grid [0, clip]); signed step = clip / 2^(b-1). Signedness is decided from
the first batch the layer sees (calibration), as is the clip.
Bits: b = lo + (hi - lo) * sigmoid(theta) within the palette range in phase 1; integers
from the palette after soniq.qat.freeze_precision (phase 2).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import _dist
from ._dynamic_act import dynamic_fake_quant, token_scale
from ._quant_autograd import NoiseQuant, RoundQuant, grad_scale
from .ops._quantize import level_bounds, resolve_seed

PHASE_NOISE, PHASE_EXACT = 1, 2


def check_smooth_alpha(alpha):
    """smooth_alpha is None (no smoothing) or a number in [0, 1]; returns it as a float."""
    if alpha is not None and not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"smooth_alpha must be a number in [0, 1] or None, got {alpha!r}")
    return None if alpha is None else float(alpha)


def mix_seed(*words: int) -> int:
    """A seed in [0, 2**63) from integers (splitmix64 over each word in turn)."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = (h ^ (int(w) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h >> 1


def _den(bits: Tensor, signed: bool) -> Tensor:
    """clip / step: the largest level magnitude for (real) bits."""
    two = torch.full_like(bits, 2.0)
    return torch.pow(two, bits - 1) if signed else torch.pow(two, bits) - 1


def _logit(p: float) -> float:
    p = min(max(p, 1e-3), 1 - 1e-3)
    return math.log(p / (1 - p))


# float16 / bfloat16 inputs (torch.autocast, model.half()) are fake-quantized in float32, the
# native quantizer's type, and handed back in their own dtype (the codes x step rounded to it)
_HALF = (torch.float16, torch.bfloat16)

class ChannelQuantizer(nn.Module):
    """Shared state: palette, learnable bits, frozen bits, phase."""

    def __init__(self, channels: int, palette: tuple, init_bits: float, axis: int):
        super().__init__()
        self.axis = axis
        self.palette = (int(palette[0]), int(palette[1]))
        lo, hi = self.palette
        frac = 0.5 if hi == lo else (min(max(init_bits, lo + 0.1 * (hi - lo)), hi - 0.1 * (hi - lo)) - lo) / (hi - lo)
        self.bits_logit = nn.Parameter(torch.full((channels,), _logit(frac)))
        self.register_buffer("frozen_bits", torch.zeros(channels))
        self.register_buffer("phase", torch.tensor(PHASE_NOISE))
        self.name = "?"  # set by soniq.qat.prepare, used in error messages
        self.channels = channels
        # phase-1 noise: with a key (soniq.qat.prepare with QATConfig(seed=...)), call n on rank r
        # uses the seed mix(key, r, n), so ranks differ and a rerun repeats; without one, a seed
        # from torch's generator. noise_rank overrides the torch.distributed rank (tests).
        self.noise_key, self.noise_calls, self.noise_rank = None, 0, None

    def _load_from_state_dict(self, *args, **kwargs):
        if self.__dict__.pop("skip_next_load", False):  # the layer refused the checkpoint (nn._QMixin)
            return
        super()._load_from_state_dict(*args, **kwargs)

    def bits(self) -> Tensor:
        """Per-channel bits: continuous (differentiable) in phase 1, the frozen integers in phase 2."""
        if int(self.phase) == PHASE_EXACT:
            return self.frozen_bits
        lo, hi = self.palette
        return lo + (hi - lo) * torch.sigmoid(self.bits_logit)

    def freeze(self, bits: Tensor) -> None:
        bits = bits.to(self.frozen_bits)
        lo, hi = self.palette
        bad = (bits != lo) & (bits != hi)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{self.name}: channel {i} gets {float(bits[i])} bits, outside the palette {self.palette}")
        self.frozen_bits.copy_(bits)
        self.phase.fill_(PHASE_EXACT)
        self.bits_logit.requires_grad_(False)

    def _check_step(self, step: Tensor) -> None:
        if not bool(torch.isfinite(step).all()) or bool((step <= 0).any()):
            raise ValueError(f"{self.name}: quantization scale became non-positive or NaN "
                             f"({step.detach().flatten()[:4].tolist()}...); lower the learning rate")

    def _fake_quant(self, x: Tensor, step: Tensor, bits: Tensor, signed: bool) -> Tensor:
        if x.dtype in _HALF:
            return self._fake_quant(x.float(), step, bits, signed).to(x.dtype)
        axis = self.axis % x.dim()
        self._check_step(step.detach())
        lo, hi, alpha = level_bounds(bits.to(x.dtype), signed)
        step = step.to(x.dtype)
        if int(self.phase) == PHASE_EXACT:
            return RoundQuant.apply(x, step, lo.detach(), hi.detach(), alpha.detach(), axis)
        return NoiseQuant.apply(x, step, lo, hi, alpha, axis, self._noise_seed())

    def _noise_seed(self) -> int:
        if self.noise_key is None:
            return resolve_seed(None)
        r = _dist.rank() if self.noise_rank is None else self.noise_rank
        # A forward run inside backward is activation checkpointing recomputing a segment: it
        # must draw the noise of the forward it replays (else the gradient belongs to other
        # noise than the loss), so it reuses the last call's nonce and does not advance.
        if torch._C._current_graph_task_id() == -1 or self.noise_calls == 0:
            self.noise_calls += 1
        return mix_seed(self.noise_key, r, self.noise_calls - 1)


class WeightQuantizer(ChannelQuantizer):
    signed = True

    def __init__(self, weight: Tensor, palette: tuple, init_bits: float):
        super().__init__(weight.shape[0], palette, init_bits, axis=0)
        self.clip = nn.Parameter(self._init_clip(weight.detach(), round(init_bits)))
        self.per_channel = weight[0].numel()

    @staticmethod
    def _init_clip(w: Tensor, bits: int) -> Tensor:
        """Per-channel clip minimizing the rounding MSE at `bits` (grid search over max|w|)."""
        wf = w.reshape(w.shape[0], -1).float()
        amax = wf.abs().amax(1).clamp_min(1e-8)
        best, best_err = amax.clone(), torch.full_like(amax, float("inf"))
        for f in torch.linspace(0.2, 1.0, 33).tolist():
            clip = amax * f
            step = (clip / 2 ** (bits - 1)).unsqueeze(1)
            lo, hi = (-1.0, 1.0) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            if bits == 1:
                q = torch.where(wf >= 0, 1.0, -1.0) * step
            else:
                q = torch.clamp(torch.round(wf / step), lo, hi) * step
            err = ((q - wf) ** 2).mean(1)
            better = err < best_err
            best, best_err = torch.where(better, clip, best), torch.where(better, err, best_err)
        return best

    @torch.no_grad()
    def refit_clip(self, w: Tensor) -> None:
        """Phase 2 start: per-channel clip refit (rounding MSE) for each channel's frozen bits."""
        bits = self.frozen_bits
        for b in torch.unique(bits).tolist():
            sel = bits == b
            self.clip[sel] = self._init_clip(w.detach()[sel], int(b)).to(self.clip)

    def step(self) -> Tensor:
        b = self.bits()
        g = 1.0 / math.sqrt(self.per_channel * float(2 ** (self.palette[1] - 1)))
        return grad_scale(self.clip, g).clamp_min(1e-12) / _den(b, True)

    def forward(self, w: Tensor) -> Tensor:
        return self._fake_quant(w, self.step(), self.bits(), True)


A_DYNAMIC = (None, "token")


def check_a_dynamic(mode):
    if mode not in A_DYNAMIC:
        raise ValueError(f"a_dynamic must be None (one static clip per layer) or 'token' (per-token dynamic "
                         f"scales), got {mode!r}")
    return mode


class ActQuantizer(ChannelQuantizer):
    """dynamic="token" (Linear inputs): each row (token) of x is first scaled by its largest
    finite |x| (soniq._dynamic_act, bit-identical to ops.quantize_pack(dynamic="token")), so
    the clip is relative to the row's range (calibrated on x / a_r by rounding MSE)."""

    def __init__(self, channels: int, palette: tuple, init_bits: float, axis: int, dynamic=None):
        super().__init__(channels, palette, init_bits, axis)
        self.dynamic = check_a_dynamic(dynamic)
        self.clip = nn.Parameter(torch.ones(1))
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("is_signed", torch.tensor(False))
        self.register_buffer("elems_per_channel", torch.tensor(1))  # per sample, for averages
        self.init_bits = init_bits

    @property
    def signed(self) -> bool:
        return bool(self.is_signed)

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        axis = self.axis % x.dim()
        xf = x.detach().float()
        if self.dynamic:  # the clip is relative to each row's largest |x|
            rows = xf.reshape(-1, xf.shape[-1])
            xf = rows / token_scale(rows, torch.ones(rows.shape[1], device=rows.device))[:, None]
        xf = xf.flatten()
        xf = xf[torch.isfinite(xf)]  # a NaN or inf would make the clip NaN or inf for good
        if xf.numel() == 0:  # checked before any state changes: a later batch can still calibrate
            raise ValueError(f"{self.name}: cannot calibrate the activation clip on an input of shape "
                             f"{tuple(x.shape)} with no finite values (the first batch a prepared model "
                             f"sees sets its activation clips: pass real, finite data first)")
        if not bool((xf != 0).any()):  # a clip of ~0 would saturate every later input
            raise ValueError(f"{self.name}: cannot calibrate the activation clip on an input of shape "
                             f"{tuple(x.shape)} that is all zeros (the first batch a prepared model sees "
                             f"sets its activation clips: pass representative data first)")
        signed = bool(xf.min() < 0)
        self.is_signed.fill_(signed)
        self.elems_per_channel.fill_(max(1, x[0].numel() // x.shape[axis]) if x.dim() > 1 else 1)
        if xf.numel() > 200_000:
            xf = xf[torch.randperm(xf.numel(), device=xf.device)[:200_000]]
        amax = float(xf.abs().max().clamp_min(1e-8))
        b = round(self.init_bits)
        best, best_err = amax, float("inf")
        for f in torch.linspace(0.1, 1.0, 37).tolist():
            clip = amax * f
            if signed:
                step, lo, hi = clip / 2 ** (b - 1), -(2 ** (b - 1)), 2 ** (b - 1) - 1
            else:
                step, lo, hi = clip / (2 ** b - 1), 0, 2 ** b - 1
            err = float(((torch.clamp(torch.round(xf / step), lo, hi) * step - xf) ** 2).mean())
            if err < best_err:
                best, best_err = clip, err
        self.clip.fill_(best)
        # under torch.distributed every rank takes rank 0's calibration (its data, its noise),
        # so clips and signedness never diverge; a single process computes the same as rank 0
        _dist.broadcast_from_rank0(self.clip, self.is_signed, self.elems_per_channel)
        self.calibrated.fill_(True)

    def step(self, numel_per_channel: int = 1) -> Tensor:
        b = self.bits()
        g = 1.0 / math.sqrt(max(1, numel_per_channel) * self.channels * float(2 ** self.palette[1] - 1))
        return grad_scale(self.clip, g).clamp_min(1e-12) / _den(b, self.signed)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0:
            raise ValueError(f"{self.name}: expected an input with a channel axis, got a 0-d tensor")
        if not bool(self.calibrated):
            self.calibrate(x)
        axis = self.axis % x.dim()
        if self.dynamic:
            return self._dynamic_quant(x, self.step(x.numel() // x.shape[axis]), self.bits())
        return self._fake_quant(x, self.step(x.numel() // x.shape[axis]), self.bits(), self.signed)

    def _dynamic_quant(self, x: Tensor, step: Tensor, bits: Tensor) -> Tensor:
        if self.axis % x.dim() != x.dim() - 1:
            raise ValueError(f"{self.name}: per-token dynamic scales need the channels last (Linear inputs)")
        if x.dtype in _HALF:
            return self._dynamic_quant(x.float(), step, bits).to(x.dtype)
        self._check_step(step.detach())
        lo, hi, alpha = level_bounds(bits.to(x.dtype), self.signed)
        exact = int(self.phase) == PHASE_EXACT
        if exact:
            lo, hi, alpha = lo.detach(), hi.detach(), alpha.detach()
        return dynamic_fake_quant(x, step.to(x.dtype), lo, hi, alpha, exact, 0 if exact else self._noise_seed())
