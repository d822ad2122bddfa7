"""Empirical bias correction for soniq.ptq (Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction", with calibration data instead of BN
statistics).

Rounding leaves each layer's output with a systematic shift: its mean over the calibration
data moves away from the float layer's, and the shifts add up through the network. After the
codes are final, each quantized layer's bias moves by the mean shift of its output against
the float model's on the same batches, taking the layer groups in the order they run, each
measured on the outputs of the already-corrected layers before it. Biases stay float in the
packed layers, so the fake-quantized and packed models stay exactly equal.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import _recon


def _channel_sum(out: Tensor, conv: bool) -> tuple:
    """(per output channel sum in float64, number of positions) of one layer output."""
    o = out.detach()
    o = o.transpose(0, 1).reshape(o.shape[1], -1).T if conv else o.reshape(-1, o.shape[-1])
    return o.double().sum(0), o.shape[0]


def output_means(model: nn.Module, layers: dict, batches, forward, stop: Optional[str] = None) -> dict:
    """{name: mean output per channel} of `layers` (name -> module of `model`) over the
    batches. A layer called more than once per batch counts its first call only (the float and
    the quantized pass then see the same calls). stop: the forward ends after that layer."""
    acc = {n: [0.0, 0] for n in layers}
    seen = set()

    def hook(name):
        def fn(m, args, out):
            if name in seen:
                return
            seen.add(name)
            s, c = _channel_sum(out, isinstance(m, nn.Conv2d))
            acc[name][0] = acc[name][0] + s
            acc[name][1] += c
            if name == stop:
                raise _recon._Stop
        return fn

    hs = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for b in batches:
                seen.clear()
                try:
                    forward(model, b)
                except _recon._Stop:
                    pass
    finally:
        for h in hs:
            h.remove()
    missing = [n for n, (_, c) in acc.items() if c == 0]
    if missing:
        raise ValueError(f"bias correction: the calibration batches never reach layers {missing[:4]}")
    return {n: s / c for n, (s, c) in acc.items()}


def correct_biases(model: nn.Module, groups: list, float_means: dict, batches, forward) -> dict:
    """Moves the bias of every layer named in float_means by its output's mean shift, group by
    group (groups: layer names in run order; a group's layers read one input, so they are
    measured in one pass). Returns {name: largest |shift|}."""
    shifts = {}
    for g in groups:
        mods = {n: model.get_submodule(n) for n in g if n in float_means}
        if not mods:
            continue
        got = output_means(model, mods, batches, forward, stop=list(mods)[-1])
        for n, m in mods.items():
            d = got[n] - float_means[n]
            with torch.no_grad():
                m.bias.sub_(d.to(m.bias))
            shifts[n] = float(d.abs().max())
    return shifts
