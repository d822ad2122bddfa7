"""Activation fusion for converted models: a PackedLinear followed by an exact (erf) GELU
applies it to its own output. On the CPU the fused forward applies soniq's native GELU
(soniq.ops.gelu_, cpp/gelu.h) inside its one native call, to each output row as soon as it
is final, on the thread that wrote it: no second tensor, no separate pass over the output
from the other core's cache, no torch op. Measured on the demo's MiniLM at batch 1 (AMX
CPU, 2 threads, same process): 7.86 -> 7.05 ms per forward against torch's gelu_ in place
after the call (docs/DESIGN_NOTES.md, "Activation fusion"). Its values are soniq's GELU, the same
bits on every CPU ISA path; they differ from torch's gelu in the last bits (soniq's erf is
faithfully rounded, torch's CPU erf is off by up to 1.5e-7), so the fused model equals the
unfused one with soniq.ops.gelu_ in the activation's place, not with torch's (fuse=False in
soniq.convert keeps torch's). On other devices the activation is torch's gelu in place.

Fusion changes no state: the activation module is swapped for a FusedActivation that keeps
it (saving writes the original), and soniq.convert / soniq.load fuse again. Recognized:
- nn.Sequential: a PackedLinear followed by nn.GELU() (approximate="none");
- Hugging Face feed-forward blocks whose forward is exactly `act(dense(x))` (BertIntermediate
  and its copies: RoBERTa, XLM-R, ELECTRA, MPNet, ...), with an erf GELU as the activation
  (the block's output is used once, so overwriting it is safe).
The residual add of Hugging Face output blocks (`LayerNorm(dropout(dense(x)) + input)`,
BertSelfOutput / BertOutput and copies) whose dense is packed goes in place the same way: the
block is swapped for a FusedResidual holding the same children (state_dict keys unchanged)
whose forward adds the residual into the dense layer's fresh output (measured on MiniLM at
batch 32, 1 thread: 508 -> 480 ms per forward, bit-identical).
"""
from __future__ import annotations

import torch
from torch import nn

from ._packed_nn import PackedLinear


class FusedActivation(nn.Module):
    """Stands where an activation was fused into the preceding packed layer: passes its input
    through. `original` is the module it replaced (saved in its place; unfuse() puts it back)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original

    def forward(self, x):
        return x

    def extra_repr(self) -> str:
        return f"fused into the preceding PackedLinear: {type(self.original).__name__}"


def _is_exact_gelu(m: nn.Module) -> bool:
    if type(m) is nn.GELU:
        return m.approximate == "none"
    # transformers.activations.GELUActivation with torch's gelu (not its python formula)
    return type(m).__name__ == "GELUActivation" and getattr(m, "act", None) is torch.nn.functional.gelu


def _dense_then_act(self, hidden_states):  # the forward a Hugging Face block must have (bytecode)
    hidden_states = self.dense(hidden_states)
    hidden_states = self.intermediate_act_fn(hidden_states)
    return hidden_states


def _same_code(f, g) -> bool:
    a, b = getattr(f, "__code__", None), g.__code__
    return a is not None and (a.co_code, a.co_names, a.co_varnames, a.co_consts[1:]) == \
        (b.co_code, b.co_names, b.co_varnames, b.co_consts[1:])


def _dense_dropout_add_norm(self, hidden_states, input_tensor):  # Hugging Face's output blocks (bytecode)
    hidden_states = self.dense(hidden_states)
    hidden_states = self.dropout(hidden_states)
    hidden_states = self.LayerNorm(hidden_states + input_tensor)
    return hidden_states


class FusedResidual(nn.Module):
    """Stands for a Hugging Face output block (dense -> dropout -> LayerNorm(x + residual)) whose
    dense is a PackedLinear: the same children under the same names, the residual added in
    place into the dense layer's fresh output (the same float32 adds: bit-identical). The
    original block is kept (not as a submodule: its children are these) for unfuse."""

    def __init__(self, original: nn.Module):
        super().__init__()
        for name, m in original._modules.items():
            self.add_module(name, m)
        self.__dict__["original"] = original

    def forward(self, hidden_states, input_tensor):
        h = self.dropout(self.dense(hidden_states))
        if h.requires_grad or h.shape != input_tensor.shape or h.dtype != input_tensor.dtype:
            return self.LayerNorm(h + input_tensor)  # an autograd graph or a broadcast: as written
        return self.LayerNorm(h.add_(input_tensor))

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__} with the residual added in place"


def _fuse_pair(parent: nn.Module, lin_name: str, act_name: str) -> bool:
    lin, act = getattr(parent, lin_name), getattr(parent, act_name)
    if not isinstance(lin, PackedLinear) or lin.activation is not None or not _is_exact_gelu(act):
        return False
    lin.activation = "gelu"
    setattr(parent, act_name, FusedActivation(act))
    return True


def fuse_activations(model: nn.Module) -> int:
    """Fuses every recognized PackedLinear -> GELU pair of `model` in place; returns how many."""
    n = 0
    for m in list(model.modules()):
        if type(m) is nn.Sequential:
            names = list(m._modules)
            for a, b in zip(names, names[1:]):
                n += _fuse_pair(m, a, b)
        elif (isinstance(m._modules.get("dense"), PackedLinear) and "intermediate_act_fn" in m._modules
              and _same_code(type(m).forward, _dense_then_act)):
            n += _fuse_pair(m, "dense", "intermediate_act_fn")
        for name, c in list(m._modules.items()):  # output blocks are swapped in their parent
            if (c is not None and not isinstance(c, FusedResidual) and isinstance(c._modules.get("dense"), PackedLinear)
                    and {"dropout", "LayerNorm"} <= set(c._modules)
                    and _same_code(type(c).forward, _dense_dropout_add_norm)):
                setattr(m, name, FusedResidual(c))
                n += 1
    return n


def unfuse_activations(model: nn.Module) -> int:
    """Undoes fuse_activations in place (the original activation modules back, the packed
    layers without their activation); returns how many."""
    n = 0
    for m in list(model.modules()):
        names = list(m._modules)
        for i, name in enumerate(names):
            f = m._modules[name]
            if isinstance(f, FusedResidual):  # the original block, with the children as they are now
                for cname, c in f._modules.items():
                    setattr(f.original, cname, c)
                setattr(m, name, f.original)
                n += 1
                continue
            if not isinstance(f, FusedActivation):
                continue
            prev = m._modules.get("dense") if name == "intermediate_act_fn" else \
                (m._modules[names[i - 1]] if i > 0 else None)
            if isinstance(prev, PackedLinear):
                prev.activation = None
            setattr(m, name, f.original)
            n += 1
    return n
