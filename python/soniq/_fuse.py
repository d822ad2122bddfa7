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
it (saving writes the original), and soniq.convert / soniq.load fuse again. The packed layer
applies the GELU only when its parent block calls it: a forward pre-hook on the parent arms the
layer for its next call in this thread (a layer with hooks of its own is not armed: they see its
own output), and the FusedActivation passes through exactly the output the armed call made;
any other input (the layer called on its own elsewhere, so not armed) gets the GELU there. So a
layer also called outside its block gives its own output, as before fusion. Recognized:
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
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ._fuse_state import state as _state
from ._packed_grad import NativeGelu, needs_input_grad
from ._packed_nn import PackedLinear


class _Arm:
    """Forward pre-hook of a block holding fused pairs: arms its packed layers (named, not held,
    so copies and pickles of the model stay right; the list is shared with its _Disarm)."""

    def __init__(self, names: list):
        self.names = names

    def __call__(self, module, args):
        armed = _state()[0]
        for n in self.names:
            lin = module._modules.get(n)
            if isinstance(lin, PackedLinear) and not (lin._forward_hooks or lin._forward_pre_hooks
                                                      or _global_forward_hooks or _global_forward_pre_hooks):
                armed.add(id(lin))


class _Disarm(_Arm):
    """Forward hook (always called, errors too): what the block left armed is disarmed."""

    def __call__(self, module, args, out):
        armed, outs = _state()
        for n in self.names:
            armed.discard(id(module._modules.get(n)))
        outs.clear()


def call_in_block(layer: nn.Module, *args):
    """Calls `layer` as the block it is fused in calls it (a fused packed layer then applies
    its GELU), for measurements that time layers outside their model (soniq bench); any other
    module is just called. Leaves nothing armed or recorded behind."""
    if not (isinstance(layer, PackedLinear) and layer.fused):
        return layer(*args)
    armed, outs = _state()
    armed.add(id(layer))
    try:
        out = layer(*args)
    finally:
        armed.discard(id(layer))
    outs[:] = [t for t in outs if t is not out]
    return out


class FusedActivation(nn.Module):
    """Stands where an activation was fused into the preceding packed layer: passes through the
    output its armed call made (GELU applied), and applies soniq's GELU to anything else.
    `original` is the module it replaced (saved in its place; unfuse() puts it back)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original

    def forward(self, x):
        outs = _state()[1]
        for i, t in enumerate(outs):
            if t is x:
                del outs[i]
                return x
        if x.dtype != torch.float32:
            return self.original(x)
        if needs_input_grad(x):  # the same values, with the GELU's derivative
            return NativeGelu.apply(x, PackedLinear._activate)
        return PackedLinear._activate(x.clone())

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
    if not isinstance(lin, PackedLinear) or lin.activation is not None or lin.fused or not _is_exact_gelu(act):
        return False
    lin.fused = True
    setattr(parent, act_name, FusedActivation(act))
    arm = next((h for h in parent._forward_pre_hooks.values() if isinstance(h, _Arm)), None)
    if arm is None:
        arm = _Arm([])
        parent.register_forward_pre_hook(arm)
        parent.register_forward_hook(_Disarm(arm.names), always_call=True)
    arm.names.append(lin_name)
    return True


def _unhook(parent: nn.Module) -> None:
    """Removes the fusion hooks of `parent` (those of a copy too: found by type)."""
    for hooks in (parent._forward_pre_hooks, parent._forward_hooks):
        for k in [k for k, h in hooks.items() if isinstance(h, _Arm)]:
            del hooks[k]
            getattr(parent, "_forward_hooks_always_called", {}).pop(k, None)


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
                prev.fused, prev.activation = False, None
            setattr(m, name, f.original)
            _unhook(m)
            n += 1
    return n
