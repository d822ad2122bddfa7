"""Block-wise output reconstruction for soniq.ptq (BRECQ / AdaRound-style, no labels).

After the tiers are frozen and the codes rounded (GPTQ), each block (a module holding
quantized layers, e.g. one transformer layer) is taken in the order the blocks run. Its
inputs come from the model with every earlier block already quantized and reconstructed;
its target is the float model's output of the same block on the same calibration batch.
Each weight picks, per element, one of two neighbouring codes on its frozen grid (AdaRound):
    w = (base + gap * h(V)) * step,   h = clamp(1.2 * sigmoid(V) - 0.1, 0, 1),
base and the starting h put the two choices around the rounded code, on the side of the
float weight, so the hard start is exactly the rounded codes. V (and optionally the
activation clips and the block's float parameters: biases, norms) is fitted by Adam to the
block-output error, with the soft h in the forward (the weight quantizer is bypassed while
fitting) and a regularizer that pushes h to 0 or 1 as its exponent anneals; then each
weight takes the code h rounds to. The error is the mean over tokens of 1 - cosine of the
output features plus 0.1 x its relative MSE: relative MSE alone is dominated by a few
large features (a transformer's outlier dimensions) and lowered it without moving the
model's cosine on MiniLM. Only integer codes change, so soniq.convert packs exactly what the
fake-quantized model computes. A block whose calibration error did not go down keeps its
previous codes and clips.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .nn import QConv2d, QLinear


class _Stop(Exception):
    pass


def run_to_hook(model, batches, forward, module: nn.Module, pre, with_kwargs: bool = False) -> None:
    """Runs each batch through `model` (no grad) only as far as `module`: its forward pre-hook
    `pre` sees the inputs, then the rest of the forward is skipped (pre raises _Stop)."""
    h = module.register_forward_pre_hook(pre, with_kwargs=with_kwargs)
    try:
        for b in batches:
            try:
                with torch.no_grad():
                    forward(model, b)
            except _Stop:
                pass
    finally:
        h.remove()


def map_tensors(v, fn):
    """v with fn applied to every tensor in it (nested tuples, lists, dicts; the rest as is)."""
    if isinstance(v, Tensor):
        return fn(v)
    if isinstance(v, (tuple, list)):
        return type(v)(map_tensors(t, fn) for t in v)
    if isinstance(v, dict):
        return {k: map_tensors(t, fn) for k, t in v.items()}
    return v


def _detach(v):
    return map_tensors(v, Tensor.detach)


def float_tensors(out) -> list:
    """The floating-point tensors of a module's output (nested tuples, lists, dicts)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for v in out.values() for t in float_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in float_tensors(v)]
    return []


def relative_mse(outs, refs) -> Tensor:
    """Sum over paired tensors of mean squared error / mean square of the reference."""
    return sum(((o - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-30) for o, t in zip(outs, refs))


def float_targets(model: nn.Module, blocks, batches, forward) -> tuple:
    """One pass over the float model: (the order the blocks run in, {block: [per batch, its
    output's float tensors]})."""
    order, outs = [], {b: [] for b in blocks}

    def hook(name):
        def fn(m, args, out):
            if name not in order:
                order.append(name)
            outs[name].append([t.detach().clone() for t in float_tensors(out)])
        return fn

    hs = [model.get_submodule(b).register_forward_hook(hook(b)) for b in blocks]
    try:
        with torch.no_grad():
            for b in batches:
                forward(model, b)
    finally:
        for h in hs:
            h.remove()
    missing = [b for b in blocks if len(outs[b]) != len(batches)]
    if missing:
        raise ValueError(f"reconstruct_blocks {missing[:4]} do not run once per calibration batch (check forward=)")
    if any(not o for b in blocks for o in outs[b]):
        raise ValueError("a reconstruct block's output holds no float tensor to reconstruct")
    return order, outs


def _block_inputs(model, block: nn.Module, batches, forward) -> list:
    """(args, kwargs) the block receives on each batch in the (partly quantized) model."""
    got = []

    def pre(m, args, kwargs):
        got.append((_detach(args), _detach(kwargs)))
        raise _Stop

    run_to_hook(model, batches, forward, block, pre, with_kwargs=True)
    return got


def _token_cosine_error(o: Tensor, t: Tensor) -> Tensor:
    """Mean over positions of 1 - cosine of the feature vectors (features: dim 1 of NCHW
    maps, else the last dim)."""
    dim = 1 if o.dim() == 4 else -1
    if o.dim() == 1:
        o, t = o.unsqueeze(0), t.unsqueeze(0)
    return (1 - torch.nn.functional.cosine_similarity(o.float(), t.float(), dim=dim, eps=1e-12)).mean()


def _loss(out, target) -> Tensor:
    outs = float_tensors(out)
    return sum(_token_cosine_error(o, t) for o, t in zip(outs, target)) + 0.1 * relative_mse(outs, target)


def _codes(q) -> Tensor:
    return ops.quantize(q.weight.detach().float(), q.w_quant.step().detach().float(), q.w_quant.bits(),
                        signed=True, axis=0, values_only=True).reshape(q.weight.shape)


def _float_params(block: nn.Module, qs: dict) -> list:
    """The block's parameters that stay float in the packed model: biases, norms (not the
    quantized weights, not the quantizers' own parameters)."""
    skip = {id(q.weight) for q in qs.values()} | {id(p) for q in qs.values()
                                                 for p in (*q.w_quant.parameters(), *q.a_quant.parameters())}
    return [p for p in block.parameters() if id(p) not in skip and p.is_floating_point()]


_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid: h reaches 0 and 1 exactly
_REG = 1.0                 # rounding regularizer, relative to the block's starting error
_WARMUP = 0.2              # share of the steps before the regularizer starts


def _soft(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


def _soft_start(q, w_float: Tensor) -> tuple:
    """(base, gap, V, step): the two codes around q's rounded code on the float weight's side
    (base and base + gap), V so the soft start lies about halfway between the code and the
    float weight, yet rounds to the code. 1-bit codes are -1 and +1 (gap 2)."""
    shape = (-1,) + (1,) * (q.weight.dim() - 1)
    step = q.w_quant.step().detach().float().reshape(shape)
    bits = q.w_quant.bits().detach().float().reshape(shape)
    c = _codes(q).float()
    gap = torch.where(bits == 1, 2.0, 1.0).expand_as(c)
    lo = torch.where(bits == 1, -1.0, -(2 ** (bits - 1))).expand_as(c)
    hi = torch.where(bits == 1, 1.0, 2 ** (bits - 1) - 1).expand_as(c)
    # up to 0.49 of a step toward the float weight: strictly inside the code's rounding interval
    x = c + 0.49 * gap * torch.clamp((w_float.float() / step - c) / gap, -1, 1)
    base = torch.clamp(torch.floor((x - lo) / gap) * gap + lo, lo, hi - gap)
    frac = torch.clamp((x - base) / gap, 0.01, 0.99)
    v = -torch.log((_ZETA - _GAMMA) / (frac - _GAMMA) - 1)
    return base, gap, v, step


@contextmanager
def _weights_as_given(qs: dict):
    """While fitting, the quantized layers use the soft weights as they are (their weight
    quantizer would round them: the relaxation needs the soft values in the forward)."""
    for q in qs.values():
        q.w_quant.forward = _identity
    try:
        yield
    finally:
        for q in qs.values():
            del q.w_quant.forward


def _identity(w: Tensor) -> Tensor:
    return w


def reconstruct_block(block: nn.Module, inputs: list, targets: list, steps: int, lr: float, clip_lr: float,
                      float_lr: float = 0.0, float_weights: Optional[dict] = None) -> tuple:
    """Fits the block's rounding choices (and its activation clips; with float_lr > 0 its float
    parameters: biases, norms) to the targets. float_weights: {layer name in the block: its
    float weight} (default: the current weights, i.e. no side preferred). Returns
    (calibration error before, after); the block keeps the better state."""
    qs = {n: m for n, m in block.named_modules() if isinstance(m, (QLinear, QConv2d))}
    floats = _float_params(block, qs) if float_lr > 0 else []

    def call(args, kwargs, over=None):
        if over is None:
            return block(*args, **kwargs)
        return torch.func.functional_call(block, over, args, kwargs, strict=False)

    def total():
        with torch.no_grad():
            return sum(float(_loss(call(a, k), t)) for (a, k), t in zip(inputs, targets)) / len(inputs)

    before = total()
    keep = {n: (q.weight.detach().clone(), q.a_quant.clip.detach().clone()) for n, q in qs.items()}
    keep_f = [p.detach().clone() for p in floats]
    start = {n: _soft_start(q, (float_weights or {}).get(n, q.weight).detach()) for n, q in qs.items()}
    v = {n: s[2].requires_grad_(True) for n, s in start.items()}

    def weights(hard: bool = False):
        out = {}
        for n, q in qs.items():
            base, gap, _, step = start[n]
            h = (v[n] >= 0).float() if hard else _soft(v[n])
            out[f"{n}.weight" if n else "weight"] = ((base + gap * h) * step).to(q.weight.dtype)
        return out

    clips = [q.a_quant.clip for q in qs.values()]
    grads = [p.requires_grad for p in clips + floats]
    for p in clips + floats:
        p.requires_grad_(True)
    groups = [{"params": list(v.values()), "lr": lr}, {"params": clips, "lr": clip_lr}]
    opt = torch.optim.Adam(groups + ([{"params": floats, "lr": float_lr}] if floats else []))
    warm, nv = int(_WARMUP * steps), sum(t.numel() for t in v.values())
    try:
        with _weights_as_given(qs):
            for s in range(steps):
                a, k = inputs[s % len(inputs)]
                loss = _loss(call(a, k, weights()), targets[s % len(inputs)])
                if s >= warm:  # exponent 20 -> 2: first only the undecided h are pushed
                    beta = 2 + 18 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
                    reg = sum((1 - (2 * _soft(t) - 1).abs().pow(beta)).sum() for t in v.values()) / nv
                    loss = loss + _REG * before * reg
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p, g in zip(clips + floats, grads):
            p.requires_grad_(g)
    with torch.no_grad():
        w = weights(hard=True)
        for n, q in qs.items():
            q.weight.copy_(w[f"{n}.weight" if n else "weight"])
            want = start[n][0] + start[n][1] * (v[n] >= 0).float()
            if not torch.equal(_codes(q).float(), want):  # codes x step: the quantizer gives these codes back
                raise RuntimeError(f"{n}: reconstructed codes do not survive the quantizer's rounding")
    after = total()
    if not after < before:
        with torch.no_grad():
            for n, q in qs.items():
                for p, val in zip((q.weight, q.a_quant.clip), keep[n]):
                    p.copy_(val)
            for p, val in zip(floats, keep_f):
                p.copy_(val)
        after = before
    return before, after


def reconstruct(model: nn.Module, order, targets: dict, batches, forward, steps: int, lr: float,
                clip_lr: float, float_lr: float = 0.0, float_weights: Optional[dict] = None) -> dict:
    """Every block in run order, each on the inputs the already-reconstructed blocks produce.
    float_weights: {layer name in the model: its float weight}, the side each rounding choice
    starts toward. Returns {block: (calibration error before, after)}."""
    report = {}
    for name in order:
        block = model.get_submodule(name)
        if not any(isinstance(m, (QLinear, QConv2d)) for m in block.modules()):
            continue
        inputs = _block_inputs(model, block, batches, forward)
        fw = {("" if n == name else n[len(name) + 1:]): w for n, w in (float_weights or {}).items()
              if n == name or n.startswith(name + ".")}
        report[name] = reconstruct_block(block, inputs, targets[name], steps, lr, clip_lr, float_lr, fw)
    return report
