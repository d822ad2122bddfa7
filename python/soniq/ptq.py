"""soniq.ptq: mixed-precision post-training quantization, no training.

    model = soniq.ptq.quantize(model, calib_batches, PTQConfig(w_palette=(4, 8), w_bits_target=4.5))
    packed = soniq.convert(model)

1. Calibration: one float pass over the batches records each Linear / Conv2d layer's input
   second moment H = X.T X / T (Conv2d: over unfolded patches), a sample of its inputs for
   the activation clip, and the order the layers run in.
2. Sensitivity: per output channel, the output error (w - q) H (w - q).T of rounding it at
   the low tier minus at the high tier; with allocation="measured" times the layer's gain,
   the change of the model's output per unit of that layer's output error, measured by
   quantizing the layer alone at the low tier.
3. Allocation: the channels with the most sensitivity per weight go to the high tier while
   the average bits stay within the budget (the greedy soniq.qat.freeze_precision uses,
   which then freezes those tiers and fits each channel's clip for its tier).
4. Rounding: "rtn" keeps round-to-nearest; "gptq" re-chooses each layer's integer codes with
   error feedback, on the inputs the already-rounded layers before it produce (sequential,
   with the activations quantized as the packed model will quantize them); asymmetric=True
   fits each layer to the float model's output instead, clip_search tries several clips per
   channel and keeps the one whose GPTQ rounding changes the channel's output least;
   trellis_states_log2 codes each tier's weights as bitshift-trellis paths instead of grid codes
   (soniq._trellis: the same bits, about half the error; the rows then run as 8-bit codes).
5. Optional: block reconstruction (reconstruct_blocks / reconstruct_steps: each block's codes
   re-chosen against the float block's output, soniq._recon) and bias correction
   (bias_correction: each layer's output mean shift against the float model taken out of its
   bias, soniq._bias_correction).
Only the integer codes and scales change (the weight becomes codes x step; clip_search scales
weight clips; step 5 also moves biases and activation clips, which the packed layers keep as
they are), so the fake-quantized model and soniq.convert's packed model stay exactly equal.
"""
from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _bias_correction, _recon, _row_weights, _trellis, ops, qat
from ._gptq import gptq_codes, grid, h_error, mse_step, round_codes, trellis_codes
from ._hadamard import check_block, layer_block, rotate_moment, rotate_weight, unrotate_weight
from ._layer_inputs import LayerInputs
from .nn import QConv2d, QLinear, smooth_factors
from ._quantizers import check_smooth_alpha
from .qat import QATConfig, _assign_tiers, _real, check_tier_group, group_channels

__all__ = ["PTQConfig", "Calibration", "calibrate", "quantize", "output_distortion"]

_LOGIT = 30.0  # sigmoid(+-30) pins a channel's phase-1 bits at a palette end


def _palette(name: str, pal) -> tuple:
    # numbers.Integral takes numpy's integers; a bool is not a bit width
    if (not isinstance(pal, (tuple, list)) or len(pal) != 2
            or not all(isinstance(b, numbers.Integral) and not isinstance(b, (bool, np.bool_)) for b in pal)):
        raise ValueError(f"{name} must be two integer bit widths (low tier, high tier), got {pal!r}")
    lo, hi = int(pal[0]), int(pal[1])
    if not (1 <= lo <= hi <= 8 and (lo == hi or lo <= 4 <= hi)):
        raise ValueError(f"{name}={tuple(pal)}: one width in 1..8 (uniform), or a low tier in 1..4 and a high "
                         "tier in 4..8")
    return (lo, hi)


@dataclass(frozen=True)
class PTQConfig:
    """w_palette / a_palette: two tiers (low in 1..4, high in 4..8) or one width twice (uniform);
    w_bits_target / a_bits_target: average bits per weight / per activation element.
    rounding: "gptq" (error feedback) or "rtn" (round to nearest).
    allocation: "measured" (H-proxy x measured layer gain), "hessian" (H-proxy alone) or
    "uniform" (every layer meets the budget on its own, its channels ranked by the H-proxy; the
    room left by rounding down goes to the densest channels anywhere).
    sequential: GPTQ on the inputs the already-rounded layers produce (else the float inputs).
    asymmetric: (sequential GPTQ) each layer is fitted to the float layer's output on the
    float model's input, not to its own output on the quantized input (GPTAQ's asymmetric
    calibration): the weights compensate the error of the layers before them. Costs a float
    copy of the model and one more partial float forward per layer group.
    target_damp: (asymmetric) the damping of that fit, as a fraction of H's mean diagonal: the
    target is W (C^T + lam I) (H + lam I)^-1, lam = target_damp x mean diag H, pulled toward W
    where the calibration rows say little. None = damp.
    gain_batches: calibration batches used to measure the layer gains ("measured").
    exclude: module names left in float ("first"/"last" as in soniq.qat.prepare).
    qat_options: extra soniq.qat.QATConfig fields as (name, value) pairs. ("smooth_alpha", a):
    SmoothQuant factors s per Linear input column from the largest |x| over all calibration
    batches (QLinear: its first batch); allocation and GPTQ then see W * s and x / s.
    ("hadamard_block", b): Linear inputs rotated by a block Hadamard transform H
    (soniq._hadamard); allocation and GPTQ then see W H / b and x H.
    reconstruct_blocks / reconstruct_steps: after rounding, fit each named block (e.g. the
    transformer layers) to the float model's block output, reconstruct_steps Adam steps per
    block on the calibration batches (soniq._recon: each weight chooses between the two grid
    codes around its rounded code, AdaRound-style; 0 = off); reconstruct_lr for those choices'
    logits, reconstruct_clip_lr for the activation clips (the weight grids stay as they are),
    reconstruct_float_lr for the block's parameters that stay float (biases, norms; 0 = they
    stay as they are).
    bias_correction: last, each quantized layer with a bias gets its output's mean shift
    against the float model (over the calibration batches, layers in run order) taken out of
    its bias (soniq._bias_correction); bias_correction_batches: how many calibration batches
    measure the means (0 = all).
    clip_search: (GPTQ) factors in [0.1, 10] of each weight channel's clip (as fitted for its
    tier by rounding MSE) to try, 1.0 always among them: GPTQ rounds the layer once per factor
    and each output channel keeps the factor whose rounding changes its output least on the
    calibration inputs, (w - q) H (w - q)^T (the weight a layer is fitted to: W, or W' with
    asymmetric=True), so never more than with the fitted clip. () = the fitted clip only.
    tier_group: weight tiers chosen per group of this many consecutive output channels: 1 (per
    channel) or a multiple of 8 (a layer's last group may be smaller). Then every run of 8
    outputs of a packed layer is one tier, so its kernels write the outputs in place: no column
    merge, which costs interleaved per-channel tiers 1.1-1.3x the time of one tier
    (docs/DESIGN_NOTES.md, "Tier groups"); at some accuracy, as the allocation is coarser.
    row_weighting: (sequential GPTQ) weight each calibration row (token, patch) of a layer's
    H, and of the asymmetric target, by how much noise on that row's outputs moves the model's
    output, to this power (soniq._row_weights; 0 = every row alike, 1 = the expected output
    change, 0.5 = half way in log scale); costs one forward and row_weight_draws backward passes
    over the calibration batches. quantize(output=...) picks the output that counts.
    trellis_states_log2: (GPTQ) 0 = the uniform grid; L in 8..16 = trellis-coded weights
    (soniq._trellis): each row keeps its tier's bits per weight, but as steps of a bitshift
    trellis with 2^L states over an int8 codebook, rounded by Viterbi with GPTQ's error feedback
    in blocks of trellis_block columns. Less than half the uniform grid's error at the same bits
    (docs/DESIGN_NOTES.md, "Trellis-coded weights"); in memory the rows run as 8-bit codes (the
    codebook's entries), soniq.save stores the k-bit streams (format 5) and the codebook (2^L
    bytes). Viterbi costs O(2^L) per weight, native (cpp/trellis.h; MiniLM at L = 14: a small
    part of the PTQ, whose forwards dominate). Not with
    clip_search (the trellis scales rows by their RMS) or reconstruct_steps (it re-rounds on the
    grid). A trellis row's step is a bfloat16 value (chosen before its codes), which soniq.save
    stores in 2 bytes.
    trellis_joint: (trellis) each input column is one path down all the rows, every row's steps
    at its tier's width, and Viterbi weighs each row's error by its step^2, so the column's bits
    go where they cut the layer's error most (save format 7); False: one path per tier width
    (format 5/6). The same bits per row either way.
    float16_biases: last, the quantized layers' float32 biases are rounded to float16 values,
    which soniq.save then stores in 2 bytes (format 6): 2 bytes less per output channel (MiniLM:
    0.03 bits per weight) for a relative bias error of at most 2^-11."""

    w_palette: tuple = (4, 8)
    w_bits_target: float = 4.5
    a_palette: tuple = (8, 8)
    a_bits_target: float = 8.0
    rounding: str = "gptq"
    allocation: str = "measured"
    sequential: bool = True
    asymmetric: bool = False
    damp: float = 0.01
    target_damp: Optional[float] = None
    block_size: int = 128
    act_order: bool = True
    gain_batches: int = 2
    exclude: tuple = ()
    qat_options: tuple = ()
    reconstruct_blocks: tuple = ()
    reconstruct_steps: int = 0
    reconstruct_lr: float = 1e-2
    reconstruct_clip_lr: float = 1e-5
    reconstruct_float_lr: float = 0.0
    bias_correction: bool = False
    bias_correction_batches: int = 0
    tier_group: int = 1
    clip_search: tuple = ()
    row_weighting: float = 0.0
    row_weight_draws: int = 2
    trellis_states_log2: int = 0
    trellis_block: int = 8
    trellis_joint: bool = True
    float16_biases: bool = False

    def __post_init__(self):
        set_ = object.__setattr__
        for pal, tgt in (("w_palette", "w_bits_target"), ("a_palette", "a_bits_target")):
            lo, hi = _palette(pal, getattr(self, pal))
            set_(self, pal, (lo, hi))
            t = getattr(self, tgt)
            set_(self, tgt, _real(tgt, t))
            if t < lo:
                raise ValueError(f"budget cannot be met: {tgt}={t} is below the low tier of {pal}={(lo, hi)}")
        if self.rounding not in ("gptq", "rtn"):
            raise ValueError(f"rounding must be 'gptq' or 'rtn', got {self.rounding!r}")
        set_(self, "tier_group", check_tier_group(self.tier_group))
        if self.allocation not in ("measured", "hessian", "uniform"):
            raise ValueError(f"allocation must be 'measured', 'hessian' or 'uniform', got {self.allocation!r}")
        if not isinstance(self.damp, (int, float)) or not (0 < self.damp < 1):
            raise ValueError(f"damp must be in (0, 1), got {self.damp!r}")
        td = self.target_damp
        if td is not None and (isinstance(td, bool) or not isinstance(td, numbers.Real) or not (0 < td < math.inf)):
            raise ValueError(f"target_damp must be None (= damp) or a number > 0, got {td!r}")
        if td is not None:
            set_(self, "target_damp", float(td))
            if not self.asymmetric:
                raise ValueError("target_damp is the damping of asymmetric GPTQ's target: it needs asymmetric=True")
        if isinstance(self.reconstruct_blocks, str) or not all(isinstance(n, str) for n in self.reconstruct_blocks):
            raise ValueError(f"reconstruct_blocks must be a tuple of module names, got {self.reconstruct_blocks!r}")
        set_(self, "reconstruct_blocks", tuple(self.reconstruct_blocks))
        blocks = self.reconstruct_blocks
        nested = [(a, b) for a in blocks for b in blocks if a != b and b.startswith(a + ".")]
        if nested or len(set(blocks)) != len(blocks):
            raise ValueError(f"reconstruct_blocks must name distinct, non-nested modules, got {blocks!r}")
        rs = self.reconstruct_steps
        if isinstance(rs, bool) or not isinstance(rs, int) or rs < 0:
            raise ValueError(f"reconstruct_steps must be a non-negative integer, got {rs!r}")
        if rs and not blocks:
            raise ValueError("reconstruct_steps > 0 needs reconstruct_blocks (the modules to fit block by block)")
        for name in ("reconstruct_lr", "reconstruct_clip_lr", "reconstruct_float_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("block_size", "gain_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        bb = self.bias_correction_batches
        if isinstance(bb, bool) or not isinstance(bb, int) or bb < 0:
            raise ValueError(f"bias_correction_batches must be an integer >= 0 (0 = all), got {bb!r}")
        for name in ("sequential", "asymmetric", "act_order", "bias_correction", "float16_biases", "trellis_joint"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.asymmetric and not (self.sequential and self.rounding == "gptq"):
            raise ValueError("asymmetric=True needs rounding='gptq' and sequential=True (it fits each layer on "
                             "the quantized model's inputs)")
        cs = self.clip_search
        cs = tuple(cs) if not isinstance(cs, (str, bytes)) and hasattr(cs, "__iter__") else None
        if cs is None or not all(isinstance(f, numbers.Real) and not isinstance(f, bool) and 0.1 <= f <= 10
                                 for f in cs):
            raise ValueError(f"clip_search must be a tuple of factors of the fitted clip in [0.1, 10] (e.g. (0.9, "
                             f"1.0, 1.1)), got {self.clip_search!r}")
        set_(self, "clip_search", tuple(sorted({float(f) for f in cs} | {1.0})) if cs else ())
        if self.clip_search and self.rounding != "gptq":
            raise ValueError("clip_search needs rounding='gptq' (each factor is tried by rounding with GPTQ)")
        rw = self.row_weighting
        if isinstance(rw, bool) or not isinstance(rw, numbers.Real) or not (0 <= rw <= 4):
            raise ValueError(f"row_weighting must be a number in [0, 4] (0 = off), got {rw!r}")
        set_(self, "row_weighting", float(rw))
        if rw and not (self.sequential and self.rounding == "gptq"):
            raise ValueError("row_weighting > 0 needs rounding='gptq' and sequential=True (the weights apply to "
                             "the rows sequential GPTQ gathers)")
        dr = self.row_weight_draws
        if isinstance(dr, bool) or not isinstance(dr, int) or dr < 1:
            raise ValueError(f"row_weight_draws must be a positive integer, got {dr!r}")
        tl = self.trellis_states_log2
        lo_l, hi_l = _trellis.STATES_LOG2
        if isinstance(tl, bool) or not isinstance(tl, numbers.Integral) or not (tl == 0 or lo_l <= tl <= hi_l):
            raise ValueError(f"trellis_states_log2 must be 0 (the uniform grid) or in {lo_l}..{hi_l}, got {tl!r}")
        set_(self, "trellis_states_log2", int(tl))
        tb = self.trellis_block
        if isinstance(tb, bool) or not isinstance(tb, numbers.Integral) or tb < 1:
            raise ValueError(f"trellis_block must be a positive integer, got {tb!r}")
        if tl and self.rounding != "gptq":
            raise ValueError("trellis_states_log2 > 0 needs rounding='gptq' (Viterbi with GPTQ's error feedback)")
        if tl and self.clip_search:
            raise ValueError("trellis_states_log2 > 0 cannot be combined with clip_search (trellis rows are scaled "
                             "by their RMS, not by a grid clip)")
        if tl and rs:
            raise ValueError("trellis_states_log2 > 0 cannot be combined with reconstruct_steps (block "
                             "reconstruction re-rounds on the uniform grid)")
        if isinstance(self.exclude, str) or not all(isinstance(n, str) for n in self.exclude):
            raise ValueError(f"exclude must be a tuple of module names, got {self.exclude!r}")
        set_(self, "exclude", tuple(self.exclude))
        opts = dict(self.qat_options) if not isinstance(self.qat_options, dict) else self.qat_options
        taken = {"w_palette", "a_palette", "w_bits_target", "a_bits_target", "exclude", "phase", "init_w_bits",
                 "init_a_bits", "tier_group"} & set(opts)
        if taken:
            raise ValueError(f"qat_options cannot set {sorted(taken)}: they are PTQConfig fields")
        if opts.get("smooth_alpha") is not None:
            check_smooth_alpha(opts["smooth_alpha"])
            if rs:  # _recon re-parametrizes q.weight as codes x step: no room for the factors
                raise ValueError("qat_options smooth_alpha and reconstruct_steps > 0 cannot be combined (block "
                                 "reconstruction assumes unsmoothed weights)")
        if "hadamard_block" in opts:
            check_block(opts["hadamard_block"], "qat_options hadamard_block")
            if opts.get("smooth_alpha") is not None:
                raise ValueError("qat_options hadamard_block and smooth_alpha cannot be combined (one input "
                                 "transform per layer)")
        set_(self, "qat_options", tuple(sorted(opts.items())))
        try:  # an unknown option or a bad value fails here, not after the calibration pass
            self.qat_config()
        except TypeError as e:
            raise ValueError(f"qat_options: {e}") from None

    def qat_config(self):
        """The soniq.qat.QATConfig the model is prepared with (a uniform width b becomes the
        palette (min(b, 4), max(b, 4)) with every channel at b)."""
        def pal(p):
            return (min(p[0], 4), max(p[1], 4)) if p[0] == p[1] else p

        return QATConfig(w_palette=pal(self.w_palette), a_palette=pal(self.a_palette),
                         w_bits_target=float(self.w_bits_target), a_bits_target=float(self.a_bits_target),
                         exclude=self.exclude, init_w_bits=float(min(self.w_palette[1], self.w_bits_target)),
                         init_a_bits=float(min(self.a_palette[1], self.a_bits_target)), tier_group=self.tier_group,
                         **dict(self.qat_options))


def _default_forward(model, batch):
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if not isinstance(batch, Mapping):
        return model(batch)
    try:  # a dict batch: model(batch) as SentenceTransformer takes it; most models want model(**batch)
        return model(batch)
    except (TypeError, AttributeError) as e:  # what a dict given as the first argument raises
        raise TypeError(f"the default forward called model(batch) with a dict batch (keys {list(batch)[:4]}) and "
                        f"it failed ({type(e).__name__}: {e}); pass forward=lambda m, b: m(**b) for a model "
                        "taking keyword arguments (Hugging Face models), or your own forward(model, batch)") from e


def output_distortion(out, ref) -> float:
    """Default distortion: sum over the output's float tensors of mean squared error / mean
    square of the reference."""
    a, b = _recon.float_tensors(out), _recon.float_tensors(ref)
    if not a or len(a) != len(b):
        raise ValueError("the model's output holds no float tensors to compare; pass distortion=")
    return float(_recon.relative_mse([x.float() for x in a], [y.float() for y in b]))


# ---- calibration -------------------------------------------------------------------------

def _rows(m: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as [T, K] rows matching weight.reshape(N, K) (Conv2d: patches)."""
    if isinstance(m, nn.Conv2d):
        cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # [B, C*kh*kw, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class _Stats:
    """H accumulator and activation sample of one layer."""

    def __init__(self, k: int, cap_elems: int):
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.t = 0
        self.amax = torch.zeros(k)  # largest |x| per input column (smoothing factors)
        self.sample, self.cap, self.n = [], cap_elems, 0
        self.first_shape = None

    def add_xtx(self, xtx: Tensor, t: int, amax: Optional[Tensor] = None) -> None:
        # xtx: the float32 product of one batch, summed over batches in float64
        self.h += xtx.double()
        self.t += t
        if amax is not None:
            torch.maximum(self.amax, amax.cpu(), out=self.amax)

    def add_sample(self, x: Tensor, gen: torch.Generator) -> None:
        """Keeps up to cap elements of the input (whole rows / images): the rows holding the
        largest and the smallest value (range and sign), plus random ones."""
        if self.first_shape is None:
            self.first_shape = tuple(x.shape)
        lead = x.reshape(-1, x.shape[-1]) if x.dim() != 4 else x
        per = max(1, lead[0].numel())
        keep = max(1, min(lead.shape[0], self.cap // per // 4))
        flat = lead.detach().reshape(lead.shape[0], -1)
        ends = torch.stack([flat.amax(1).argmax(), flat.amin(1).argmin()]).cpu()
        idx = torch.unique(torch.cat([torch.randperm(lead.shape[0], generator=gen)[:keep], ends]))
        self.sample.append(lead[idx].detach().float().clone())
        self.n += idx.numel() * per
        while self.n > self.cap and len(self.sample) > 1:  # keep the newest; older ones thin out
            s = self.sample.pop(0)
            self.n -= s.numel()

    def moment(self) -> Tensor:
        return self.h / max(1, self.t)


def _run(model, batches, forward):
    with torch.no_grad():
        return [forward(model, b) for b in batches]


def _float_pass(model, layers: dict, batches, forward, cap: int):
    """One pass over the float model: H and input samples per layer, the order layers run
    in, and groups of layers that read the same input tensor (Q, K, V)."""
    stats = {n: _Stats(m.weight[0].numel(), cap) for n, m in layers.items()}
    order, inputs, groups = [], [], []
    gen = torch.Generator().manual_seed(0)
    first, batch = [True], [0]
    last = [None, None, None]  # (input, conv geometry, X.T X): Q, K and V share one product

    def hook(name):
        def fn(m, args):
            x = args[0]
            geo = (m.kernel_size, m.dilation, m.padding, m.stride) if isinstance(m, nn.Conv2d) else None
            if last[0] is not x or last[1] != geo:
                r = _rows(m, x).detach().float()
                if not bool(torch.isfinite(r).all()):  # H and the clips would be NaN (damping cannot help)
                    raise ValueError(f"calibration batch {batch[0]}: the input of layer {name!r} holds NaN or inf; "
                                     "PTQ needs finite calibration data")
                last[:] = [x, geo, (r.T @ r, r.shape[0], r.abs().amax(0))]
            if first[0] and name not in order:
                order.append(name)
                # the same tensor object (kept alive here, so never a reused address) = one group
                i = next((j for j, t in enumerate(inputs) if t is x), None)
                if i is None:
                    inputs.append(x)
                    groups.append([name])
                else:
                    groups[i].append(name)
            stats[name].add_xtx(*last[2])
            stats[name].add_sample(x, gen)
        return fn

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                batch[0] = i
                forward(model, b)
                first[0] = False
    finally:
        for h in hs:
            h.remove()
        last[:] = [None, None, None]
    return stats, order, groups


@dataclass(frozen=True)
class Calibration:
    """What one float pass over the calibration batches measured (soniq.ptq.calibrate):
    reusable for several PTQConfigs on copies of the same float model. stats[name].amax:
    the largest |input| per column over all batches (smoothing factors)."""

    batches: tuple
    forward: Callable
    stats: dict
    order: tuple
    groups: tuple
    layer_names: tuple


def _unsupported(m) -> bool:
    return isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str))


def _layers(model: nn.Module, exclude, skip_unsupported: bool = False) -> dict:
    """The layers soniq.qat.prepare will swap (same rule for exclude, "first", "last"); a
    Conv2d it cannot pack raises unless excluded (skip_unsupported: left out, for calibrate,
    which gathers statistics before any exclude is known)."""
    cand = {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    excl, names = set(exclude), list(cand)
    excl |= {names[0]} if "first" in excl and names else set()
    excl |= {names[-1]} if "last" in excl and names else set()
    layers = {n: m for n, m in cand.items() if n not in excl and not (skip_unsupported and _unsupported(m))}
    if not layers:
        raise ValueError("model has no nn.Linear / nn.Conv2d layer to quantize (after exclude)")
    for n, m in layers.items():
        if _unsupported(m):
            raise ValueError(f"module {n!r} (Conv2d): soniq.ptq handles groups=1 with numeric zero padding only "
                             f"(exclude it to keep it in float)")
    return layers


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, (QLinear, QConv2d)) for m in model.modules()):
        raise ValueError("model already holds soniq QLinear/QConv2d layers; pass the float model")
    if type(model) in (nn.Linear, nn.Conv2d):  # quantize works in place: a root layer has no parent
        raise ValueError(f"model is a single {type(model).__name__}: soniq.ptq.quantize swaps layers in place; "
                         f"wrap it (nn.Sequential(layer)) and take [0] of the result")


def calibrate(model: nn.Module, calib_batches, *, forward: Optional[Callable] = None,
              sample_elems: int = 400_000) -> Calibration:
    """One float pass over `calib_batches` (a list of batches; forward(model, batch) runs one,
    default model(*batch) for a tuple/list, else model(batch)): each Linear / Conv2d layer's
    input second moment, a sample of its inputs, and the order the layers run in. The model
    is not changed. Pass the result to quantize() instead of the batches to reuse it."""
    _check_model(model)
    if isinstance(calib_batches, (Tensor, dict)) or not hasattr(calib_batches, "__iter__"):
        raise TypeError("calib_batches must be a list (or other iterable) of batches, "
                        f"got {type(calib_batches).__name__}")
    batches = tuple(calib_batches)
    if not batches:
        raise ValueError("calib_batches is empty: PTQ needs calibration inputs")
    forward = forward or _default_forward
    layers = _layers(model, (), skip_unsupported=True)
    was = model.training
    model.eval()
    try:
        stats, order, groups = _float_pass(model, layers, batches, forward, sample_elems)
    finally:
        model.train(was)
    return Calibration(batches, forward, stats, tuple(order), tuple(tuple(g) for g in groups), tuple(layers))


# ---- sensitivity and allocation ----------------------------------------------------------

def _rtn(w2: Tensor, bits: int):
    step = mse_step(w2, bits)
    lo, hi, al = grid(torch.full((w2.shape[0],), float(bits)))
    return round_codes(w2.float(), step, lo.float(), hi.float(), al.float()) * step.unsqueeze(1)


def _layer_gains(model, layers, errs_lo, batches, forward, distortion) -> dict:
    """Change of the model's output per unit of layer output error: each layer rounded alone
    at the low tier (RTN), the others in float."""
    ref = _run(model, batches, forward)
    gains = {}
    for n, m in layers.items():
        e = float(errs_lo[n].sum())
        if e <= 0:
            gains[n] = 0.0
            continue
        keep = m.weight.detach().clone()
        with torch.no_grad():
            m.weight.copy_(m._ptq_low.reshape(keep.shape).to(keep))
            try:
                d = sum(distortion(o, r) for o, r in zip(_run(model, batches, forward), ref)) / len(batches)
            finally:
                m.weight.copy_(keep)
        gains[n] = float(d) / e
    return gains


def _moment(stats, n, smooth, rot) -> Tensor:
    """H of the input the activation quantizer sees: x * (1/s) when layer n is smoothed, x H
    when it is rotated (rot[n]: its Hadamard block)."""
    h = stats[n].moment()
    if rot.get(n):
        return rotate_moment(h, rot[n])
    if n not in smooth:
        return h
    inv = 1.0 / smooth[n].double()
    return h * inv[:, None] * inv[None, :]


def _w_scores(layers, stats, cfg, smooth, rot) -> tuple:
    """Per layer: output-error increase of each channel at the low tier vs the high tier
    (smoothed layers: of the weight W * s the quantizer rounds, on the inputs x / s; rotated
    ones: of W H / b on x H)."""
    lo, hi = cfg.w_palette
    scores, errs_lo = {}, {}
    for n, m in layers.items():
        w2 = m.weight.detach().reshape(m.weight.shape[0], -1).float()
        s, b = smooth.get(n), rot.get(n, 0)
        w2 = rotate_weight(w2, b) if s is None else w2 * s.to(w2)
        h = _moment(stats, n, smooth, rot)
        ql = _rtn(w2, lo)
        # the float weight whose smoothed / rotated rounding this is
        m._ptq_low = unrotate_weight(ql, b) if s is None else ql / s.to(ql)
        errs_lo[n] = h_error(w2, ql, h)
        scores[n] = errs_lo[n] - (h_error(w2, _rtn(w2, hi), h) if hi != lo else 0)
    return scores, errs_lo


def _a_scores(layers, qlayers, cfg) -> dict:
    """Per input channel: output noise of its activation rounding at the low tier vs the high
    tier, ||W[:, k]||^2 x (step_lo^2 - step_hi^2) / 12 (one clip per layer)."""
    lo, hi = cfg.a_palette
    out = {}
    for n, m in layers.items():
        q = qlayers[n].a_quant
        clip = float(q.clip.detach())
        den = (lambda b: 2 ** (b - 1)) if q.signed else (lambda b: 2 ** b - 1)
        w = qlayers[n].effective_weight().detach().double()
        wk = (w ** 2).sum(0).reshape(w.shape[1], -1).sum(1)  # Conv2d: over outputs and the kernel window
        out[n] = wk * (clip ** 2) * (1 / den(lo) ** 2 - 1 / den(hi) ** 2) / 12
    return out


def _allocate(scores: dict, counts: dict, palette, target, gains, mode: str, what: str, group: int = 1) -> dict:
    """{layer: bits per channel}: the greedy of soniq.qat.freeze_precision on sensitivity per
    bit (per layer when mode is "uniform"). group > 1: one tier per `group` consecutive
    channels (their mean sensitivity per bit, their summed cost; a layer's last group may be
    smaller, qat.group_channels)."""
    names = list(scores)
    if palette[0] == palette[1]:
        return {n: torch.full_like(scores[n], float(palette[0]), dtype=torch.float32) for n in names}
    grouped = {n: group_channels(scores[n] * (gains[n] if mode == "measured" else 1.0) / counts[n], counts[n], group)
               for n in names}
    dens = [grouped[n][0] for n in names]
    counts = {n: grouped[n][1] for n in names}  # per group: channels x elements per channel
    size = {n: grouped[n][2] for n in names}
    if mode != "uniform":
        out = dict(zip(names, _assign_tiers(dens, [counts[n] for n in names], palette, target, what)))
        return {n: out[n].repeat_interleave(size[n]) for n in names}
    out = {n: _assign_tiers([d], [counts[n]], palette, target, what)[0] for n, d in zip(names, dens)}
    # then the room the layers leave (each rounds down) goes to the densest low channels
    # anywhere, so the set is maximal: the same greedy over all channels picks exactly it
    lo, hi = palette
    total = sum(float(counts[n].sum()) for n in names)
    room = (target - lo) * total - sum(float(((out[n] - lo) * counts[n]).sum()) for n in names)
    cand = sorted(((float(d[i]), n, i) for n, d in zip(names, dens) for i in (out[n] == lo).nonzero()[:, 0].tolist()),
                  key=lambda t: -t[0])
    for _, n, i in cand:
        if (hi - lo) * float(counts[n][i]) <= room + 1e-9 * total:
            out[n][i] = hi
            room -= (hi - lo) * float(counts[n][i])
    return {n: out[n].repeat_interleave(size[n]) for n in names}


def _freeze(model, qlayers: dict, wbits: dict, abits: dict) -> None:
    """Freezes the chosen tiers through soniq.qat.freeze_precision (which also fits each
    weight channel's clip for its tier, applies a size_bytes_target and keeps ranks in step):
    phase-1 bits pinned at the palette ends make its greedy pick exactly the channels (or
    tier groups: the QATConfig carries tier_group) chosen here, the same greedy over a maximal
    set."""
    with torch.no_grad():
        for n, q in qlayers.items():
            for quant, bits in ((q.w_quant, wbits[n]), (q.a_quant, abits[n])):
                lo, hi = quant.palette
                quant.bits_logit.copy_(torch.where(bits.to(quant.bits_logit) >= hi, _LOGIT, -_LOGIT)
                                       if hi > lo else torch.zeros_like(quant.bits_logit))
    qat.freeze_precision(model, refit_weight_scales=True)
    for n, q in qlayers.items():
        for quant, bits in ((q.w_quant, wbits[n]), (q.a_quant, abits[n])):
            if not torch.equal(quant.bits().cpu(), bits.to(quant.bits().dtype).cpu()):
                raise RuntimeError(f"{quant.name}: freeze_precision chose other tiers than soniq.ptq allocated")


# ---- rounding ----------------------------------------------------------------------------

def _set_codes(q, codes: Tensor, name: str) -> None:
    """weight <- codes x step (smoothed: / s) so the quantizer's rounding of the weight it sees
    gives back exactly these codes (checked)."""
    step = q.w_quant.step().detach()
    shape = q.weight.shape
    with torch.no_grad():
        w = codes.to(torch.float32) * step.float().unsqueeze(1)
        w = w if q.smooth_alpha is None else w / q.a_smooth.float()
        q.weight.copy_(w.reshape(shape).to(q.weight))
        back = ops.quantize(q.effective_weight().detach().float(), step.float(), q.w_quant.bits(), signed=True,
                            axis=0, values_only=True).reshape(shape[0], -1)
    if not torch.equal(back.double(), codes.double()):
        raise RuntimeError(f"{name}: GPTQ codes do not survive the quantizer's rounding")


def _same_act(a, b) -> bool:
    """Same activation quantization and geometry: the quantized rows are the same."""
    sa, sb = a.a_quant.state_dict(), b.a_quant.state_dict()
    geo = (lambda m: (m.kernel_size, m.dilation, m.padding, m.stride) if isinstance(m, nn.Conv2d) else None)
    return (type(a) is type(b) and geo(a) == geo(b) and sa.keys() == sb.keys()
            and all(torch.equal(sa[k], sb[k]) for k in sa))


def _quantized_rows(q, x: Tensor) -> Tensor:
    with torch.no_grad():
        return _rows(q, q.a_quant(q.quantizer_input(x)))


def _group_moments(qlayers: dict, group: list, inputs: LayerInputs, float_inputs: Optional[LayerInputs],
                   row_weights: Optional[dict] = None) -> dict:
    """Per member: H = mean of r r^T over the rows r the quantized model feeds it (its own
    activation quantizer applied), and with float_inputs also C = mean of r f^T, f the float
    model's rows on the same batch (rotated / smoothed as the layer's input). Members whose
    activation quantizers agree share one product. row_weights[name][batch]: a weight per row
    (soniq._row_weights), the rows of both products scaled by its square root."""
    k = {n: qlayers[n].weight[0].numel() for n in group}
    acc = {n: _Stats(k[n], 1) for n in group}
    cross = {n: torch.zeros(k[n], k[n], dtype=torch.float64) for n in group} if float_inputs is not None else None
    xqs = inputs.first_args(qlayers[group[0]])
    xfs = None if cross is None else float_inputs.first_args(float_inputs.model.get_submodule(group[0]))
    for bi, xq in enumerate(xqs):
        xf = None if xfs is None else next(xfs)
        if xq is None or (xfs is not None and xf is None):  # the group does not run on this batch
            continue
        done = []
        for n in group:
            q = qlayers[n]
            w = None if row_weights is None else row_weights[n][bi]
            hit = next((d for d in done if _same_act(d[0], q) and d[3] is w), None)
            if hit is None:
                with torch.no_grad():
                    r = _quantized_rows(q, xq).float()
                    f = None if xf is None else _rows(q, q.quantizer_input(xf.to(q.weight.dtype))).float()
                    if w is not None:
                        if w.numel() != r.shape[0]:
                            raise ValueError(f"row_weighting: layer {n!r} read {r.shape[0]} rows on calibration batch "
                                             f"{bi} but wrote {w.numel()} output rows (a layer whose input and "
                                             "output rows differ cannot be row-weighted)")
                        sw = w.sqrt().to(r)[:, None]
                        r, f = r * sw, None if f is None else f * sw
                    c = None if f is None else r.T @ f
                hit = (q, (r.T @ r, r.shape[0]), c, w)
                done.append(hit)
            acc[n].add_xtx(*hit[1])
            if cross is not None:
                cross[n] += hit[2].double()
    return {n: (acc[n].moment(), None if cross is None else cross[n] / max(1, acc[n].t)) for n in group}


def _float_target(w: Tensor, h: Tensor, c: Tensor, damp: float) -> Tensor:
    """The weight W' minimizing |r W'^T - f W^T|^2 + lam |W' - W|^2 over the calibration rows
    (r quantized-model inputs, f float-model inputs; H = r^T r, C = r^T f as means): W' =
    W (C^T + lam I) (H + lam I)^-1. GPTQ on W' with H then minimizes the distance of the
    rounded layer on r to the float layer on f (the residual of W' is orthogonal to r)."""
    w, h, c = w.double(), h.double(), c.double()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    lam = damp * float(torch.diagonal(h).mean().clamp_min(1e-30))
    return torch.linalg.solve(h + lam * eye, (c + lam * eye) @ w.T).T  # H symmetric


def _float_copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as e:  # e.g. a module holding a handle that cannot be copied
        raise TypeError(f"PTQConfig(asymmetric=True) runs a float copy of the model beside it, but "
                        f"copy.deepcopy(model) failed: {type(e).__name__}: {e}") from e


def _gptq(model, qlayers: dict, stats: dict, groups: list, batches, forward, cfg, smooth, rot,
          float_model=None, row_weights=None) -> None:
    inputs = LayerInputs(model, batches, forward)
    float_inputs = None if float_model is None else LayerInputs(float_model, batches, forward)
    for group in groups:
        mom = _group_moments(qlayers, group, inputs, float_inputs, row_weights) if cfg.sequential else {}
        for n in group:
            q = qlayers[n]
            w2 = q.effective_weight().detach().reshape(q.weight.shape[0], -1)
            h = mom[n][0] if cfg.sequential else _moment(stats, n, smooth, rot)
            if float_model is not None:
                w2 = _float_target(w2, h, mom[n][1], cfg.damp if cfg.target_damp is None else cfg.target_damp)
            _set_codes(q, _round_layer(q, w2, h, cfg), n)
            if getattr(q, "w_trellis", None) is not None:
                q.w_trellis.bind(q)  # the codes the streams hold, as the fake layer now has them


# float64 elements of w2 copies rounded in one GPTQ call (128 MB): the clip search's factors
# share a Cholesky and a column loop up to this size
_STACK_ELEMS = 1 << 24


def _round_layer(q, w2: Tensor, h: Tensor, cfg) -> Tensor:
    """GPTQ codes of w2 on q's grids. With cfg.clip_search, one rounding per factor of the
    fitted clips; each row keeps the factor with the least H-error, and q's clip is scaled to it.
    GPTQ rounds each row on its own given H, so the factors' copies of w2 are rounded as the
    rows of one call (one Cholesky and one column loop, in chunks of about _STACK_ELEMS)."""
    if cfg.trellis_states_log2:
        return _round_trellis(q, w2, h, cfg)
    step, bits = q.w_quant.step().detach(), q.w_quant.bits().detach()
    factors = (1.0,) + tuple(f for f in cfg.clip_search if f != 1.0)
    n = w2.shape[0]
    per_call = max(1, _STACK_ELEMS // max(1, w2.numel()))
    codes = []
    for i in range(0, len(factors), per_call):
        fs = factors[i:i + per_call]
        w, s, b = (w2, step * fs[0], bits) if len(fs) == 1 else \
            (w2.repeat(len(fs), 1), torch.cat([step * f for f in fs]), bits.repeat(len(fs)))  # no copy for one
        codes += gptq_codes(w, h, s, b, damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order).split(n)
    best = codes[0]
    if len(factors) == 1:
        return best
    err = h_error(w2, best * step.double()[:, None], h)
    pick = torch.ones_like(err)
    for f, c in zip(factors[1:], codes[1:]):
        e = h_error(w2, c * (step.double() * f)[:, None], h)
        better = e < err  # ties keep the fitted clip (e.g. a row of zeros)
        best, err = torch.where(better[:, None], c, best), torch.where(better, e, err)
        pick = torch.where(better, torch.full_like(e, f), pick)
    with torch.no_grad():  # step = clip / den(bits), so scaling the clip scales the step
        q.w_quant.clip.mul_(pick.to(q.w_quant.clip))
    return best


def _round_trellis(q, w2: Tensor, h: Tensor, cfg) -> Tensor:
    """Trellis codes of w2 at each row's tier width; the layer's rows become 8-bit rows of those
    codes (step = the trellis step), and q.w_trellis keeps the streams soniq.save writes."""
    row_bits = q.w_quant.bits().detach().to(torch.int64)
    cb = _trellis.codebook(cfg.trellis_states_log2)
    codes, states, step = trellis_codes(w2, h, row_bits, cb, damp=cfg.damp, block_size=cfg.trellis_block,
                                        act_order=cfg.act_order, joint=cfg.trellis_joint)
    wq = q.w_quant
    with torch.no_grad():
        wq.palette = (wq.palette[0], 8)  # the execution width; the stored width stays row_bits
        wq.frozen_bits.fill_(8)
        wq.clip.copy_((step * 2 ** 7).to(wq.clip))  # step = clip / 2^(8-1)
    q.w_trellis = _trellis.TrellisWeights.from_states(tuple(w2.shape), row_bits, states, cb, joint=cfg.trellis_joint)
    return codes.double()


# ---- entry point -------------------------------------------------------------------------

def quantize(model: nn.Module, calib, config: Optional[PTQConfig] = None, *,
             forward: Optional[Callable] = None, distortion: Optional[Callable] = None,
             output: Optional[Callable] = None) -> nn.Module:
    """Prepares `model` in place (soniq.qat.prepare), allocates and freezes the tiers, rounds
    the weights, and returns it in phase 2 (eval mode), ready for soniq.convert.

    calib: a few hundred inputs as a list of batches (see calibrate() for forward=), or a
    Calibration of a float model with the same layers. distortion(out, ref) -> float
    compares outputs for the measured layer gains (default: output_distortion). output(out) ->
    the part of the model's output that PTQConfig(row_weighting=...) weighs rows by (default:
    every float tensor of it), e.g. lambda out: out["sentence_embedding"]."""
    _check_model(model)
    cfg = PTQConfig() if config is None else config
    if not isinstance(cfg, PTQConfig):
        raise TypeError(f"config must be a soniq.ptq.PTQConfig, got {type(cfg).__name__}")
    layers = _layers(model, cfg.exclude)  # before the float pass: a layer it cannot pack fails fast
    if isinstance(calib, Calibration):
        if forward is not None:
            raise ValueError("forward= belongs to calibrate() when calib is a Calibration")
        cal = calib
    else:
        cal = calibrate(model, calib, forward=forward)
    if not set(layers) <= set(cal.layer_names):
        raise ValueError(f"the Calibration was made on another model: no statistics for "
                         f"{sorted(set(layers) - set(cal.layer_names))[:4]}")
    missing = [n for n in layers if n not in cal.stats or cal.stats[n].t == 0]
    if missing:
        raise ValueError(f"the calibration batches never reach layers {missing[:4]} (check forward=)")
    batches, forward, stats = cal.batches, cal.forward, cal.stats
    distortion = distortion or output_distortion
    model.eval()
    recon = None
    if cfg.reconstruct_steps:
        names = dict(model.named_modules())
        bad = [b for b in cfg.reconstruct_blocks if b not in names]
        if bad:
            raise ValueError(f"reconstruct_blocks: the model has no module {bad[0]!r}")
        recon = _recon.float_targets(model, cfg.reconstruct_blocks, batches, forward)
    bc_batches = batches[:cfg.bias_correction_batches or None]
    bc_means = None
    if cfg.bias_correction:  # the float model's output means, before prepare swaps the layers
        with_bias = {n: m for n, m in layers.items() if m.bias is not None}
        bc_means = _bias_correction.output_means(model, with_bias, bc_batches, forward) if with_bias else {}

    alpha = dict(cfg.qat_options).get("smooth_alpha")  # Linear layers: factors from the calibration's amax
    smooth = {} if alpha is None else {n: smooth_factors(stats[n].amax, m.weight, alpha)
                                       for n, m in layers.items() if type(m) is nn.Linear}
    block = dict(cfg.qat_options).get("hadamard_block") or 0  # Linear layers: as QLinear picks its block
    rot = {n: layer_block(block, m.in_features) for n, m in layers.items() if type(m) is nn.Linear and block}
    w_scores, errs_lo = _w_scores(layers, stats, cfg, smooth, rot)
    gains = {n: 1.0 for n in layers}
    if cfg.allocation == "measured" and cfg.w_palette[0] != cfg.w_palette[1]:
        gains = _layer_gains(model, layers, errs_lo, batches[:cfg.gain_batches], forward, distortion)
    for m in layers.values():
        m.__dict__.pop("_ptq_low", None)

    if output is not None and not callable(output):
        raise TypeError(f"output must be a function of the model's output, got {type(output).__name__}")
    row_weights = None
    if cfg.row_weighting:  # on the float model, before prepare swaps the layers
        row_weights = _row_weights.measure(model, layers, batches, forward, output, cfg.row_weighting,
                                           cfg.row_weight_draws)
    float_model = _float_copy(model) if cfg.asymmetric else None  # the targets asymmetric GPTQ fits
    qat.prepare(model, cfg.qat_config())
    qlayers = {n: model.get_submodule(n) for n in layers}
    for n, q in qlayers.items():  # activation clips from the whole calibration sample
        s = stats[n]
        x = torch.cat(s.sample)
        with torch.no_grad():
            if n in smooth:
                q.set_smoothing(smooth[n].to(q.weight.device))
            q.a_quant.calibrate(q.quantizer_input(x.to(q.weight.dtype)))
            per = int(torch.tensor(s.first_shape[1:]).prod()) // s.first_shape[q.a_quant.axis % len(s.first_shape)]
            q.a_quant.elems_per_channel.fill_(max(1, per))
    w_counts = {n: float(q.w_quant.per_channel) for n, q in qlayers.items()}
    a_counts = {n: float(q.a_quant.elems_per_channel) for n, q in qlayers.items()}
    wbits = _allocate(w_scores, w_counts, cfg.w_palette, cfg.w_bits_target, gains, cfg.allocation, "w_bits_target",
                      cfg.tier_group)
    a_sc = _a_scores(layers, qlayers, cfg) if cfg.a_palette[0] != cfg.a_palette[1] else \
        {n: torch.zeros(q.a_quant.channels, dtype=torch.float64) for n, q in qlayers.items()}
    abits = _allocate(a_sc, a_counts, cfg.a_palette, cfg.a_bits_target, gains, cfg.allocation, "a_bits_target")
    _freeze(model, qlayers, wbits, abits)
    # the float weights, the side each rounding choice of the reconstruction starts toward
    float_w = {n: q.weight.detach().clone() for n, q in qlayers.items()} if recon is not None else None
    if cfg.rounding == "gptq":
        order = [n for n in cal.order if n in qlayers]
        groups = [[n for n in g if n in qlayers] for g in cal.groups]
        _gptq(model, {n: qlayers[n] for n in order}, stats, [g for g in groups if g], batches, forward, cfg,
              smooth, rot, float_model, row_weights)
    del float_model
    report = {}
    if recon is not None:
        report = _recon.reconstruct(model, recon[0], recon[1], batches, forward, cfg.reconstruct_steps,
                                    cfg.reconstruct_lr, cfg.reconstruct_clip_lr, cfg.reconstruct_float_lr, float_w)
    shifts = {}
    if bc_means is not None:
        groups = [[n for n in g if n in qlayers] for g in cal.groups]
        shifts = _bias_correction.correct_biases(model, [g for g in groups if g], bc_means, bc_batches, forward)
    if cfg.float16_biases:
        with torch.no_grad():
            for q in qlayers.values():
                if q.bias is not None and q.bias.dtype == torch.float32:
                    q.bias.copy_(q.bias.half().float())
    model.eval()
    model._soniq_ptq = {"config": cfg, "layer_gains": gains, "reconstruction": report, "bias_shift": shifts}
    return model
