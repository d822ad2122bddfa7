"""soniq.qat: two-phase SONIQ training (design.md sections 1 and 4).

    cfg = QATConfig(w_palette=(2, 4), a_palette=(4, 8), w_bits_target=2.0, a_bits_target=4.0)
    model = prepare(model, cfg)                 # phase 1: noise + learnable bits
    loss = task_loss + bit_penalty(model)       # budget penalty (weight cfg.penalty_weight)
    freeze_precision(model)                     # snap to the two tiers within the budget
    ... fine-tune (phase 2: exact rounding, learned scales) ...
    precision_report(model)
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _dist
from .._fastpath import attention_projections, disable_torch_fastpaths
from .._hadamard import check_block
from .._quantizers import check_a_dynamic, check_smooth_alpha, mix_seed
from ..nn import QConv2d, QLinear
from ..ops._quantize import resolve_seed

def _real(name: str, v) -> float:
    """A finite real number (not a bool), or a ValueError naming the argument."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


__all__ = ["QATConfig", "prepare", "bit_penalty", "freeze_precision", "precision_report", "quant_layers",
           "set_uniform_precision"]


@dataclass(frozen=True)
class QATConfig:
    """Palettes (low tier in 1..4, high tier in 4..8), average-bit budgets, the penalty weight,
    and the module names to leave in float ("first"/"last" name the first/last layer).

    A value: immutable, never written by prepare / freeze_precision (the training phase and
    the calibration live on the prepared model's quantizers), so one config prepares any
    number of models. seed: phase-1 noise drawn from (seed, rank, layer, step) instead of
    torch's global generator (see soniq.qat.prepare)."""

    w_palette: tuple = (2, 4)
    a_palette: tuple = (4, 8)
    w_bits_target: float = 2.0
    a_bits_target: float = 4.0
    exclude: tuple = ()
    penalty_weight: float = 1.0
    size_bytes_target: Optional[float] = None   # optional budget on weight bytes (bits/8 summed)
    init_w_bits: Optional[float] = None         # phase-1 starting bits (default: palette middle)
    init_a_bits: Optional[float] = None
    smooth_alpha: Optional[float] = None        # Linear layers: SmoothQuant-style input smoothing (QLinear)
    seed: Optional[int] = None                  # phase-1 noise seed (None: torch's generator)
    # Linear layers: "token" = one dynamic activation scale per row (token), its largest |x|,
    # times the learned per-tier scale (computed in the fused quantize + pack pass when
    # packed); None = one static clip per layer. Conv2d layers keep static scales.
    a_dynamic: Optional[str] = None
    # Linear layers: inputs rotated by a block Hadamard transform of this many features (a
    # power of two; a layer takes the largest power of two <= it dividing its in_features),
    # weights kept in the rotated basis (QLinear); 0 = off. Not with smooth_alpha.
    hadamard_block: int = 0
    # freeze_precision picks the weight tiers per group of this many consecutive output
    # channels (their mean learned bits; a layer's last group may be smaller): 1 = per channel,
    # or a multiple of 8, so packed layers write their outputs in place, without the column
    # merge interleaved tiers need (docs/DESIGN_NOTES.md, "Tier groups")
    tier_group: int = 1

    def __post_init__(self):
        for name, (lo_rng, hi_rng) in (("w_palette", ((1, 4), (4, 8))), ("a_palette", ((1, 4), (4, 8)))):
            pal = getattr(self, name)
            if (not isinstance(pal, (tuple, list)) or len(pal) != 2
                    or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in pal)):
                raise ValueError(f"{name} must be two integer bit widths (low tier, high tier), got {pal!r}")
            lo, hi = (int(b) for b in pal)
            if not (lo_rng[0] <= lo <= lo_rng[1] and hi_rng[0] <= hi <= hi_rng[1] and lo <= hi):
                raise ValueError(f"{name}={tuple(pal)}: the low tier must be in 1..4 and the high tier in 4..8")
            object.__setattr__(self, name, (lo, hi))
        for name, pal in (("w_bits_target", self.w_palette), ("a_bits_target", self.a_palette)):
            t = _real(name, getattr(self, name))
            if t < pal[0]:
                raise ValueError(f"budget cannot be met: {name}={t} is below the palette's low tier {pal[0]}")
        if _real("penalty_weight", self.penalty_weight) < 0:
            raise ValueError(f"penalty_weight must be >= 0, got {self.penalty_weight!r}")
        if self.size_bytes_target is not None and _real("size_bytes_target", self.size_bytes_target) <= 0:
            raise ValueError(f"size_bytes_target must be a positive number of bytes (or None), got {self.size_bytes_target!r}")
        for name, pal in (("init_w_bits", self.w_palette), ("init_a_bits", self.a_palette)):
            v = getattr(self, name)
            if v is not None and not pal[0] <= _real(name, v) <= pal[1]:
                raise ValueError(f"{name} must lie in the palette {pal} (or be None: its middle), got {v!r}")
        if isinstance(self.exclude, str) or not isinstance(self.exclude, (tuple, list, set, frozenset)) \
                or not all(isinstance(n, str) for n in self.exclude):
            raise ValueError(f"exclude must be a tuple of module names (or 'first' / 'last'), got {self.exclude!r}"
                             + (f"; for one name write ({self.exclude!r},)" if isinstance(self.exclude, str) else ""))
        if self.seed is not None:
            resolve_seed(self.seed)  # the same checks as ops.quantize's seed
        object.__setattr__(self, "smooth_alpha", check_smooth_alpha(self.smooth_alpha))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        check_a_dynamic(self.a_dynamic)
        check_block(self.hadamard_block)
        object.__setattr__(self, "tier_group", check_tier_group(self.tier_group))
        if self.hadamard_block and self.smooth_alpha is not None:
            raise ValueError("hadamard_block and smooth_alpha cannot be combined (one input transform per layer)")


def quant_layers(model: nn.Module) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QLinear, QConv2d))}


def prepare(model: nn.Module, config: Optional[QATConfig] = None) -> nn.Module:
    """Swaps every nn.Linear / nn.Conv2d (not excluded) for QLinear / QConv2d in place and returns
    the model; a model that is one nn.Linear / nn.Conv2d has no parent to swap it in: its
    quantized copy is returned (use the returned module)."""
    cfg = config or QATConfig()
    if not isinstance(cfg, QATConfig):
        raise TypeError(f"config must be a soniq.qat.QATConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if quant_layers(model) or hasattr(model, "_soniq_config"):
        raise ValueError("model was already prepared by soniq.qat.prepare (it holds soniq layers or their "
                         "config): prepare a float model once")
    if type(model) in (nn.Linear, nn.Conv2d):  # the model is one layer: its quantized copy (not in place)
        if cfg.exclude:
            raise ValueError(f"exclude={cfg.exclude!r}: the model is a single {type(model).__name__}; nothing to exclude")
        q = prepare(nn.Sequential(model), cfg)[0]
        q.w_quant.name, q.a_quant.name = "weight", "input"
        q._soniq_config = cfg
        return q
    # torch's attention reads out_proj's weight directly (never calls it): kept in float
    skipped = attention_projections(model)
    if skipped:
        warnings.warn(f"soniq.qat.prepare: {skipped} stay in float: nn.MultiheadAttention reads their weights "
                      "directly instead of calling the layer", stacklevel=2)
    cand = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and n not in skipped]
    excl = set(cfg.exclude)
    if "first" in excl and cand:
        excl.add(cand[0])
    if "last" in excl and cand:
        excl.add(cand[-1])
    unknown = excl - set(cand) - {"first", "last"}
    if unknown:
        raise ValueError(f"exclude names modules that are not Linear/Conv2d layers of the model: {sorted(unknown)}")
    # a layer reached under several names (one module object used twice) would be swapped at
    # its first place only, leaving float copies of it elsewhere: refused before anything changes
    places = {}
    for n, m in model.named_modules(remove_duplicate=False):
        places.setdefault(id(m), []).append(n)
    for name in cand:
        more = places[id(model.get_submodule(name))]
        if name not in excl and len(more) > 1:
            raise ValueError(f"module {name!r} is one layer used at several places ({more}): soniq.qat.prepare "
                             f"quantizes a layer at one place; give each place its own copy "
                             f"(copy.deepcopy) or keep it in float with QATConfig(exclude=({name!r},))")
    kw = dict(w_palette=cfg.w_palette, a_palette=cfg.a_palette,
              w_bits=sum(cfg.w_palette) / 2 if cfg.init_w_bits is None else cfg.init_w_bits,
              a_bits=sum(cfg.a_palette) / 2 if cfg.init_a_bits is None else cfg.init_a_bits)
    keyed = []
    for name in cand:
        if name in excl:
            continue
        parent, attr = _parent(model, name)
        m = getattr(parent, attr)
        try:
            if isinstance(m, nn.Linear):
                q = QLinear.from_float(m, **kw, smooth_alpha=cfg.smooth_alpha, a_dynamic=cfg.a_dynamic,
                                       hadamard_block=cfg.hadamard_block)
            else:
                q = QConv2d.from_float(m, **kw)
        except ValueError as e:
            raise ValueError(f"module {name!r} ({type(m).__name__}) cannot be quantized: {e}") from None
        q.w_quant.name, q.a_quant.name = f"{name}.weight", f"{name}.input"
        if cfg.seed is not None:  # noise keyed by (seed, layer, weight/input); rank and step added per call
            q.w_quant.noise_key = mix_seed(cfg.seed, len(keyed), 0)
            q.a_quant.noise_key = mix_seed(cfg.seed, len(keyed), 1)
        keyed.append(name)
        setattr(parent, attr, q)
    disable_torch_fastpaths(model)
    model._soniq_config = cfg
    return model


def _parent(model: nn.Module, name: str):
    parts = name.split(".")
    parent = model
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1]


def _config(model: nn.Module) -> QATConfig:
    """The QATConfig of `model`, or of the one submodule prepared inside it (e.g. the encoder
    of a SentenceTransformer)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = getattr(model, "_soniq_config", None)
    if cfg is None:
        found = {id(c): c for c in (getattr(m, "_soniq_config", None) for m in model.modules()) if c is not None}
        if len(found) > 1:
            raise ValueError("model holds several submodules prepared with different QATConfigs; "
                             "call this on each prepared submodule")
        cfg = next(iter(found.values()), None)
    if cfg is None:
        raise ValueError("model was not prepared with soniq.qat.prepare (no QATConfig attached)")
    return cfg


def _averages(model: nn.Module) -> dict:
    """Differentiable averages: bits per weight, bits per activation element, weight bytes."""
    layers = quant_layers(model)
    if not layers:
        raise ValueError("model has no soniq QLinear/QConv2d layers (call soniq.qat.prepare first)")
    wsum = wn = asum = an = 0
    for m in layers.values():
        bw = m.stored_w_bits()
        wsum = wsum + bw.sum() * m.w_quant.per_channel
        wn += bw.numel() * m.w_quant.per_channel
        ba = m.a_quant.bits()
        e = float(m.a_quant.elems_per_channel)
        asum = asum + ba.sum() * e
        an += ba.numel() * e
    return {"avg_w_bits": wsum / wn, "avg_a_bits": asum / an, "w_bytes": wsum / 8}


def bit_penalty(model: nn.Module, weight: Optional[float] = None) -> Tensor:
    """penalty_weight * (relu(avg_w_bits - w_target) + relu(avg_a_bits - a_target)
    [+ relu(w_bytes / size_target - 1)]): zero within the budget, linear above it."""
    cfg = _config(model)
    if weight is None:
        lam = cfg.penalty_weight
    elif isinstance(weight, Tensor):  # an annealed weight may be a tensor
        lam = weight
        if weight.numel() != 1 or not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
            raise ValueError(f"weight must be one finite value >= 0, got {weight!r}")
    else:
        lam = _real("weight", weight)
        if lam < 0:
            raise ValueError(f"weight must be >= 0, got {weight!r}")
    avg = _averages(model)
    pen = torch.relu(avg["avg_w_bits"] - cfg.w_bits_target) + torch.relu(avg["avg_a_bits"] - cfg.a_bits_target)
    if cfg.size_bytes_target is not None:
        pen = pen + torch.relu(avg["w_bytes"] / cfg.size_bytes_target - 1) * cfg.w_palette[1]
    return lam * pen


def check_tier_group(tg) -> int:
    """QATConfig / PTQConfig.tier_group as an int: 1 (per channel) or a multiple of 8."""
    if isinstance(tg, bool) or not isinstance(tg, numbers.Integral) or tg < 1 or (tg > 1 and tg % 8):
        raise ValueError(f"tier_group must be 1 (per channel) or a multiple of 8 (the packed kernels' output "
                         f"runs), got {tg!r}")
    return int(tg)


def group_channels(score: Tensor, count: float, group: int) -> tuple:
    """(score per group, cost per group, channels per group): runs of `group` consecutive
    channels as one (their mean score, count x their number), the last run what is left."""
    score = score.detach().float().cpu().reshape(-1)
    if group == 1:
        return score, torch.full((score.numel(),), float(count)), torch.ones(score.numel(), dtype=torch.int64)
    sizes = torch.full((score.numel() // group,), group, dtype=torch.int64)
    if score.numel() % group:
        sizes = torch.cat([sizes, torch.tensor([score.numel() % group])])
    means = torch.stack([p.mean() for p in score.split(sizes.tolist())]) if sizes.numel() else score
    return means, float(count) * sizes.float(), sizes


def _assign_tiers(scores: list, counts: list, palette: tuple, target: float, what: str, group: int = 1) -> list:
    """Two tiers for all channels: the highest-scoring channels take the high tier while the
    count-weighted average stays <= target (greedy: a channel that does not fit is skipped).
    counts: per layer, one count per channel or a tensor of one per entry. group > 1: per
    group of consecutive channels (group_channels), expanded back."""
    if group > 1:
        g = [group_channels(t, c, group) for t, c in zip(scores, counts)]
        tiers = _assign_tiers([x[0] for x in g], [x[1] for x in g], palette, target, what)
        return [t.repeat_interleave(x[2]) for t, x in zip(tiers, g)]
    lo, hi = palette
    s = torch.cat([t.detach().float().cpu() for t in scores])
    n = torch.cat([c.float().cpu().reshape(-1) if isinstance(c, Tensor) else torch.full((t.numel(),), float(c))
                   for t, c in zip(scores, counts)])
    total = float(n.sum())
    if target < lo:
        raise ValueError(f"budget cannot be met: {what} target {target} is below the low tier {lo}")
    room = (target - lo) * total  # bits left for upgrades
    bits = torch.full_like(s, float(lo))
    if hi > lo:
        for i in torch.argsort(s, descending=True, stable=True).tolist():
            cost = (hi - lo) * float(n[i])
            if cost <= room + 1e-9 * total:
                bits[i] = hi
                room -= cost
    out, k = [], 0
    for t in scores:
        out.append(bits[k:k + t.numel()])
        k += t.numel()
    return out


def freeze_precision(model: nn.Module, *, refit_weight_scales: bool = True) -> nn.Module:
    """Phase 1 -> 2: snaps every channel to one of the config's two tiers (channels with the
    most learned bits go high first) so the average bits stay within the budgets. With
    refit_weight_scales, each weight channel's clip is refit (rounding MSE) for its tier:
    a clip learned at ~2 real bits is too wide for 1-bit channels."""
    cfg = _config(model)
    layers = list(quant_layers(model).values())
    if not layers:
        raise ValueError("model has no soniq QLinear/QConv2d layers (call soniq.qat.prepare first)")
    frozen = [n for n, m in quant_layers(model).items() if m.phase == 2]
    if frozen:  # again would refit the clips phase 2 learned (and re-pick tiers from stale logits)
        raise ValueError(f"freeze_precision: the model is already in phase 2 (layers {frozen[:3]}"
                         f"{' ...' if len(frozen) > 3 else ''} have frozen tiers); call it once, after phase 1")
    missing = [m.a_quant.name for m in layers if not bool(m.a_quant.calibrated)]
    if missing:  # checked before anything is frozen: after a forward, the call can be made again
        raise ValueError(f"activation quantizers {missing} have seen no data: run at least one forward "
                         "pass before freeze_precision")
    assigned = []  # every tier is allocated before any is frozen (a refused budget changes nothing)
    for kind, pal, target in (("w", cfg.w_palette, cfg.w_bits_target), ("a", cfg.a_palette, cfg.a_bits_target)):
        qs = [getattr(m, f"{kind}_quant") for m in layers]
        counts = [q.per_channel if kind == "w" else float(q.elems_per_channel) for q in qs]
        what = "w_bits_target" if kind == "w" else "a_bits_target"
        if kind == "w" and cfg.size_bytes_target is not None:  # a byte budget caps the bits per weight
            n_w = sum(q.channels * q.per_channel for q in qs)
            if cfg.size_bytes_target * 8 / n_w < target:
                target, what = cfg.size_bytes_target * 8 / n_w, f"size_bytes_target={cfg.size_bytes_target}"
        tiers = _assign_tiers([q.bits() for q in qs], counts, pal, target, what, cfg.tier_group if kind == "w" else 1)
        # every rank takes rank 0's tiers (equal anyway when the bit logits are, as under DDP)
        flat = torch.cat(tiers).to(qs[0].frozen_bits.device)
        _dist.broadcast_from_rank0(flat)
        assigned += zip(qs, flat.split([q.channels for q in qs]))
    for q, b in assigned:
        q.freeze(b)
    if refit_weight_scales:
        for m in layers:
            m.w_quant.refit_clip(m.effective_weight())
    return model


def set_uniform_precision(model: nn.Module, w_bits: int, a_bits: int) -> nn.Module:
    """Every channel at the same bits, phase 2 (uniform QAT / PTQ baselines)."""
    for m in quant_layers(model).values():
        for q, b in ((m.w_quant, w_bits), (m.a_quant, a_bits)):
            q.palette = (min(q.palette[0], b), max(q.palette[1], b))
            q.freeze(torch.full((q.channels,), float(b)))
    return model


def precision_report(model: nn.Module) -> dict:
    """{"avg_w_bits", "avg_a_bits", "w_bytes", "layers": {name: layer.precision()}} -- the bits
    actually in use (continuous means in phase 1, the tiers in phase 2)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with torch.no_grad():
        avg = _averages(model)
    return {"avg_w_bits": float(avg["avg_w_bits"]), "avg_a_bits": float(avg["avg_a_bits"]),
            "w_bytes": float(avg["w_bytes"]),
            "layers": {n: m.precision() for n, m in quant_layers(model).items()}}
