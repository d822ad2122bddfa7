"""The inputs sequential GPTQ needs per group of layers, without one prefix forward per group.

Sequential GPTQ rounds the layers group by group, each on the inputs the partly rounded model
feeds it. Run from the model's input, that is one forward up to the group per group: groups x
depth layer passes (24 groups of MiniLM: ~3x the work of going block by block). When the group's
first layer sits in a block, a child of an nn.ModuleList such as one transformer layer, the
block's own inputs (args, kwargs) are taken once per block and each group's input by running only
the block on them (a fresh copy of them each time). The same ops on the same tensors: the inputs
are the same, bit for bit. A block is not re-run alone where that could differ: inputs that are
not plain data (a key/value cache object grows on every call), forward pre-hooks of its own, or
autocast turned on by the caller's `forward`; nor one that does not run on every batch. Those
groups are reached from the model's input, as before.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from ._recon import _Stop, _block_inputs, _detach, map_tensors, run_to_hook


_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _plain(v) -> bool:
    """Data a block can be called with again and again: tensors, scalars, strings and tuples /
    lists / dicts of them. Anything else (a key/value cache object that grows on every call, a
    callable) may carry state between calls, so the block is then not re-run."""
    if isinstance(v, (Tensor,) + _PLAIN):
        return True
    if isinstance(v, (tuple, list)):
        return all(_plain(t) for t in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(t) for k, t in v.items())
    return False


def _fresh(v):
    """Tensors cloned (a block that writes its input in place would change the kept inputs)."""
    return map_tensors(v, Tensor.clone)


def _first_arg(model: nn.Module, layer: nn.Module, batch, forward) -> Optional[Tensor]:
    """The first positional input of layer's first call when forward(model, batch) runs, or None."""
    got = _block_inputs(model, layer, [batch], forward)
    return got[0][0][0] if got else None


def _call_on_copy(block: nn.Module, kept) -> None:
    """A block on its kept (args, kwargs), copied (a block may write its input in place)."""
    args, kwargs = kept
    block(*_fresh(args), **_fresh(kwargs))


def _autocast_on() -> bool:
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


def _list_children(model: nn.Module) -> dict:
    """{module name: module} of every child of an nn.ModuleList in model."""
    return {f"{n}.{k}" if n else k: c for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
            for k, c in m.named_children()}


class LayerInputs:
    """first_args(layer): per calibration batch, the first positional input `layer` receives on
    its first call in model (partly rounded as it is now), None where it does not run. The
    inputs of the last block asked about are kept, so take the layers in the order they run
    and round a block's layers only after the blocks before it (as sequential GPTQ does)."""

    def __init__(self, model: nn.Module, batches, forward):
        self.model, self.batches, self.forward = model, batches, forward
        self.names = {id(m): n for n, m in model.named_modules()}
        self.blocks = _list_children(model)
        self._block: Optional[str] = None
        self._cached: list = []

    def block_of(self, layer: nn.Module) -> Optional[str]:
        """The innermost ModuleList child holding layer (not layer itself), or None."""
        name = self.names[id(layer)]
        best = None
        for b in self.blocks:
            if name.startswith(b + ".") and (best is None or len(b) > len(best)):
                best = b
        return best

    def _capture(self, blk: str) -> list:
        """The block's (args, kwargs) per batch, or [] where re-running it alone would not
        repeat what the whole model does: inputs that may carry state, forward pre-hooks of its
        own (they would see their own output again), or autocast set up by `forward`."""
        module = self.blocks[blk]
        if module._forward_pre_hooks:  # (hooks taking kwargs are in it too)
            return []
        got, amp = [], []

        def keep(m, args, kwargs):
            got.append((_detach(args), _detach(kwargs)))
            amp.append(_autocast_on())
            raise _Stop

        run_to_hook(self.model, self.batches, self.forward, module, keep, with_kwargs=True)
        if any(amp) or not all(_plain(a) and _plain(k) for a, k in got):
            return []
        return got

    def first_args(self, layer: nn.Module) -> Iterator[Optional[Tensor]]:
        blk = self.block_of(layer)
        if blk != self._block:
            self._block, self._cached = blk, []  # free the last block's inputs first
            if blk is not None:
                self._cached = self._capture(blk)
        if blk is None or len(self._cached) != len(self.batches):  # not in a block re-run alone
            for b in self.batches:
                yield _first_arg(self.model, layer, b, self.forward)
            return
        module = self.blocks[blk]
        for b, kept in zip(self.batches, self._cached):
            x = _first_arg(module, layer, kept, _call_on_copy)
            # the block ran but not this layer: take it from the whole model
            yield x if x is not None else _first_arg(self.model, layer, b, self.forward)
