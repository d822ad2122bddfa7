"""oneDNN INT8 through PyTorch (torch._int_mm) as a model baseline: the encoder's Linear
layers with int8 weights per output channel and activations quantized per token on every
call, the int32 products scaled back to float (the recipe of torchao's dynamic int8 path).
On a CPU with AMX, _int_mm runs on the tile unit: the strongest INT8 GEMM PyTorch offers."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class IntMMLinear(nn.Module):
    """y = (round(x / sx) @ round(w / sw).T) * sx * sw + b, with sx per row of x (absmax / 127,
    each call) and sw per output channel; int8 products summed in int32 by torch._int_mm."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        sw = w.abs().amax(1).clamp_min(1e-12) / 127
        self.register_buffer("w_t", torch.round(w / sw[:, None]).clamp(-127, 127).to(torch.int8).t().contiguous())
        self.register_buffer("w_scale", sw)
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        sx = rows.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        xq = torch.round(rows / sx).clamp_(-127, 127).to(torch.int8)
        y = torch._int_mm(xq, self.w_t).float().mul_(sx).mul_(self.w_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def onednn_int8(teacher):
    """A deepcopy of the SentenceTransformer with every encoder nn.Linear an IntMMLinear
    (the 36 layers soniq packs). Raises RuntimeError where torch._int_mm is missing."""
    torch._int_mm(torch.zeros(32, 64, dtype=torch.int8), torch.zeros(64, 32, dtype=torch.int8))
    m = copy.deepcopy(teacher)
    enc = m[0].auto_model
    for name, lin in [(n, x) for n, x in enc.named_modules() if isinstance(x, nn.Linear) and "encoder." in n]:
        parent, attr = name.rsplit(".", 1)
        setattr(enc.get_submodule(parent), attr, IntMMLinear(lin))
    return m.eval()
