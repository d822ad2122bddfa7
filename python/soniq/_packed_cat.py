"""PackedLinear.cat: packed Linear layers that read one input with the same activation
quantizer (an attention block's query, key and value) as one layer: one quantize pass, one
GEMM over their rows. The codes, row scales and biases are the layers' own, concatenated, so
the output is torch.cat([layer(x) for layer in layers], -1) bit for bit. At MiniLM's batch-1
shapes three 384 -> 384 layers take 146 us and the one 384 -> 1152 layer 85 us
(docs/DESIGN_NOTES.md, "Q, K and V as one layer")."""
from __future__ import annotations

import torch

from . import ops


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    return a == b


def _shared(m) -> dict:
    """What the one quantize pass and the repacked weight need every layer to share, by name."""
    return {"in_features": m.a_bits.numel(), "a_bits": m.a_bits, "a_scale": m.a_scale, "a_signed": m.a_signed,
            "a_dynamic": m.a_dynamic, "hadamard_block": m.hadamard_block, "a_inv_smooth": m.a_inv_smooth,
            "activation": m.activation, "bias": "no bias" if m.bias is None else "a bias",
            "w.axis": m.w.axis, "w.signed": m.w.signed,
            "w.row_scale": "no scales" if m.w.row_scale is None else "scales", "w.device": m.w.device}


def _shown(v, whose: str):
    return f"{whose} values" if isinstance(v, torch.Tensor) else v


def cat_linear(cls, layers, name: str):
    layers = list(layers) if not isinstance(layers, cls) else None
    if not layers:
        raise ValueError("layers must be a non-empty sequence of PackedLinear layers")
    for i, m in enumerate(layers):
        if not isinstance(m, cls):
            raise TypeError(f"layers[{i}] must be a soniq.nn.PackedLinear, got {type(m).__name__}")
    first = layers[0]
    want = _shared(first)
    for i, m in enumerate(layers[1:], 1):
        for what, got in _shared(m).items():
            if not _same(want[what], got):
                raise ValueError(f"layers[{i}] ({m.name}).{what} must equal layers[0]'s ({first.name}) for one "
                                 f"quantize pass: expected {_shown(want[what], 'their')}, got {_shown(got, 'other')}")
    if first.w.axis != 0:
        raise ValueError(f"layers[0] ({first.name}).w must have its bits and scales along rows (axis 0)")
    # built as ordinary tensors even under torch.inference_mode() (the module tracks its
    # buffers' versions, which inference tensors do not have)
    with torch.inference_mode(False), torch.no_grad():
        return _build(cls, layers, first, name)


def _build(cls, layers, first, name):
    codes = torch.cat([ops.unpack(m.w).to(torch.int64) for m in layers])
    bits = torch.cat([m.w.bits.to(torch.int64) for m in layers])
    scale = None if first.w.row_scale is None else torch.cat([m.w.row_scale.float() for m in layers])
    w = ops.pack(codes, bits, signed=first.w.signed, axis=0, scale=scale, k_layout=first.w)
    bias = None if first.bias is None else torch.cat([m.bias for m in layers])
    out = cls(w, first.a_bits.clone(), first.a_scale.clone(), first.a_signed, bias, name,
              a_inv_smooth=None if first.a_inv_smooth is None else first.a_inv_smooth.clone(),
              a_dynamic=first.a_dynamic, hadamard_block=first.hadamard_block)
    out.activation = first.activation
    return out
