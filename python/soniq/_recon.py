"""Block-wise output reconstruction for soniq.ptq (BRECQ / AdaRound-style, no labels).

After the tiers are frozen and the codes rounded (GPTQ), each block (a module holding
quantized layers, e.g. one transformer layer) is taken in the order the blocks run. Its
inputs come from the model with every earlier block already quantized and reconstructed;
its target is the float model's output of the same block on the same calibration batch.
Per quantized layer, the weight is re-parametrized in code units,
    w = (codes + delta) * step(clip),
and delta (init 0), the weight clips and the activation clips (optionally also the block's
float parameters: biases, norms) are fitted by Adam to the block-output MSE, straight
through the rounding. delta is in units of each channel's step,
so one learning rate moves a 4-bit and an 8-bit channel by the same number of levels.
Afterwards the weight is snapped to its new codes x step: only integer codes and scales
change, so soniq.convert packs exactly what the fake-quantized model computes. A block
whose calibration error did not go down keeps its previous codes and clips.
"""
from __future__ import annotations

import math

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


def _detach(v):
    if isinstance(v, Tensor):
        return v.detach()
    if isinstance(v, (tuple, list)):
        return type(v)(_detach(t) for t in v)
    if isinstance(v, dict):
        return {k: _detach(t) for k, t in v.items()}
    return v


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


def _loss(out, target) -> Tensor:
    return relative_mse(float_tensors(out), target)


def _codes(q) -> Tensor:
    return ops.quantize(q.weight.detach().float(), q.w_quant.step().detach().float(), q.w_quant.bits(),
                        signed=True, axis=0, values_only=True).reshape(q.weight.shape)


def _float_params(block: nn.Module, qs: dict) -> list:
    """The block's parameters that stay float in the packed model: biases, norms (not the
    quantized weights, not the quantizers' own parameters)."""
    skip = {id(q.weight) for q in qs.values()} | {id(p) for q in qs.values()
                                                 for p in (*q.w_quant.parameters(), *q.a_quant.parameters())}
    return [p for p in block.parameters() if id(p) not in skip and p.is_floating_point()]


def reconstruct_block(block: nn.Module, inputs: list, targets: list, steps: int, lr: float, clip_lr: float,
                      float_lr: float = 0.0) -> tuple:
    """Fits the block's quantized layers (codes via delta, weight and activation clips) and,
    with float_lr > 0, its float parameters (biases, norms) to the targets. Returns
    (calibration error before, after); the block keeps the better state."""
    qs = {n: m for n, m in block.named_modules() if isinstance(m, (QLinear, QConv2d))}
    floats = _float_params(block, qs) if float_lr > 0 else []

    def total(over=None):
        with torch.no_grad():
            return sum(float(_loss(_call(a, k, over), t)) for (a, k), t in zip(inputs, targets)) / len(inputs)

    def _call(args, kwargs, over):
        if over is None:
            return block(*args, **kwargs)
        return torch.func.functional_call(block, over(), args, kwargs, strict=False)

    before = total()
    keep = {n: (q.weight.detach().clone(), q.w_quant.clip.detach().clone(), q.a_quant.clip.detach().clone())
            for n, q in qs.items()}
    keep_f = [p.detach().clone() for p in floats]
    codes = {n: _codes(q) for n, q in qs.items()}
    delta = {n: torch.zeros_like(c, requires_grad=True) for n, c in codes.items()}

    def weights():
        # step() keeps the clip's gradient: changing a clip scales the grid with the codes on it
        return {f"{n}.weight" if n else "weight": ((codes[n] + delta[n]) * q.w_quant.step().reshape(
            (-1,) + (1,) * (codes[n].dim() - 1))).to(q.weight.dtype) for n, q in qs.items()}

    clips = [q.w_quant.clip for q in qs.values()] + [q.a_quant.clip for q in qs.values()]
    grads = [p.requires_grad for p in clips + floats]
    for p in clips + floats:
        p.requires_grad_(True)
    groups = [{"params": list(delta.values()), "lr": lr}, {"params": clips, "lr": clip_lr}]
    opt = torch.optim.Adam(groups + ([{"params": floats, "lr": float_lr}] if floats else []))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    try:
        for s in range(steps):
            a, k = inputs[s % len(inputs)]
            loss = _loss(_call(a, k, weights), targets[s % len(inputs)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        for p, g in zip(clips + floats, grads):
            p.requires_grad_(g)
    with torch.no_grad():
        w = weights()
        for n, q in qs.items():
            q.weight.copy_(w[f"{n}.weight" if n else "weight"])
            c = _codes(q)  # snap to codes x step: the quantizer gives these codes back exactly
            q.weight.copy_((c * q.w_quant.step().reshape((-1,) + (1,) * (c.dim() - 1))).to(q.weight))
            if not torch.equal(_codes(q), c):
                raise RuntimeError(f"{n}: reconstructed codes do not survive the quantizer's rounding")
    after = total()
    if not after < before:
        with torch.no_grad():
            for n, q in qs.items():
                for p, v in zip((q.weight, q.w_quant.clip, q.a_quant.clip), keep[n]):
                    p.copy_(v)
            for p, v in zip(floats, keep_f):
                p.copy_(v)
        after = before
    return before, after


def reconstruct(model: nn.Module, order, targets: dict, batches, forward, steps: int, lr: float,
                clip_lr: float, float_lr: float = 0.0) -> dict:
    """Every block in run order, each on the inputs the already-reconstructed blocks produce.
    Returns {block: (calibration error before, after)}."""
    report = {}
    for name in order:
        block = model.get_submodule(name)
        if not any(isinstance(m, (QLinear, QConv2d)) for m in block.modules()):
            continue
        inputs = _block_inputs(model, block, batches, forward)
        report[name] = reconstruct_block(block, inputs, targets[name], steps, lr, clip_lr, float_lr)
    return report
