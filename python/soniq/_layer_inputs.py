"""The inputs sequential GPTQ needs per group of layers, without one prefix forward per group.

Sequential GPTQ rounds the layers group by group, each on the inputs the partly rounded model
feeds it. Run from the model's input, that is one forward up to the group per group: groups x
depth layer passes (24 groups of MiniLM: ~3x the work of going block by block). When the group's
first layer sits in a block, a child of an nn.ModuleList such as one transformer layer, the
block's own inputs (args, kwargs) are taken once per block and each group's input by running only
the block on them. The same ops on the same tensors: the inputs are the same, bit for bit.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from ._recon import _Stop, _block_inputs


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

    def _from_model(self, layer: nn.Module, batch) -> Optional[Tensor]:
        got = _block_inputs(self.model, layer, [batch], self.forward)
        return got[0][0][0] if got else None

    def first_args(self, layer: nn.Module) -> Iterator[Optional[Tensor]]:
        blk = self.block_of(layer)
        if blk is not None and blk != self._block:
            self._block, self._cached = blk, _block_inputs(self.model, self.blocks[blk], self.batches, self.forward)
        if blk is None or len(self._cached) != len(self.batches):  # not in a block run once per batch
            for b in self.batches:
                yield self._from_model(layer, b)
            return
        module = self.blocks[blk]
        for i, (args, kwargs) in enumerate(self._cached):
            got = []

            def pre(m, a):
                got.append(a[0].detach())
                raise _Stop

            h = layer.register_forward_pre_hook(pre)
            try:
                with torch.no_grad():
                    module(*args, **kwargs)
            except _Stop:
                pass
            finally:
                h.remove()
            if not got:  # the block ran but not this layer: take it from the whole model
                yield self._from_model(layer, self.batches[i])
            else:
                yield got[0]
