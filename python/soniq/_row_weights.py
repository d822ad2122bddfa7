"""Output-guided row weights for GPTQ (PTQConfig(row_weighting=p)): how much each calibration
row of a layer's input matters to the model's output.

GPTQ fits each layer to its calibration rows (tokens, image patches) all alike: H = mean of
r r^T. The model's output does not care for them alike: a padding token or an attention-sink
token moves a mean-pooled sentence embedding far less than a content word of a short sentence.
Row t of layer l gets w_t = E_z |d(z . y) / d o_t|^2, o_t the layer's output at that row, y the
model's output (each float tensor scaled to unit mean square, as the relative MSE the layer
gains use), z ~ N(0, I): the expected change of the output under unit noise on that row's
outputs, estimated with a few draws of z (one forward, one backward per draw). H and the
asymmetric target's cross moment then become sums of w_t^p r r^T (GuidedQuant, Kim et al. 2025,
with one weight per row instead of per output group). Rows that cannot reach the output (padding
under an attention mask) get weight 0 and drop out.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ._recon import float_tensors


def _out_rows(m: nn.Module, out: Tensor, g: Tensor) -> Tensor:
    """|gradient|^2 per row of the layer's input as ptq._rows lays them out: Linear [..., N] ->
    one per leading index; Conv2d [B, C, H, W] -> one per (image, output position)."""
    if isinstance(m, nn.Conv2d):
        return g.float().pow(2).sum(1).reshape(-1)
    return g.float().pow(2).reshape(-1, out.shape[-1]).sum(1)


def measure(model: nn.Module, layers: dict, batches, forward: Callable, output: Optional[Callable],
            power: float, draws: int, seed: int = 0) -> dict:
    """{layer name: [per batch, float32 weights of its rows (first call of the layer), mean 1
    over the rows that reach the output, to the power `power`]}."""
    names = {id(m): n for n, m in layers.items()}
    outs: dict = {}

    def hook(m, args, out):
        n = names[id(m)]
        if n in outs or not isinstance(out, Tensor) or not out.is_floating_point():
            return
        if not out.requires_grad:  # frozen parameters: the graph starts at the layer's output
            out.requires_grad_(True)
        outs[n] = out

    handles = [m.register_forward_hook(hook) for m in layers.values()]
    gen = torch.Generator().manual_seed(seed)
    acc = {n: [] for n in layers}
    was = model.training
    model.eval()
    try:
        for batch in batches:
            with torch.enable_grad():
                y = forward(model, batch)
                ys = float_tensors(y if output is None else output(y))
                ys = [t for t in ys if t.requires_grad]
                if not ys:
                    raise ValueError("row_weighting: the model's output (after output=) holds no float tensor that "
                                     "depends on the quantized layers; pass output=lambda out: <the tensor to keep>")
                got = list(outs)
                sums = {n: _out_rows(layers[n], outs[n], torch.zeros_like(outs[n])).cpu() for n in got}
                rms = [t.detach().float().pow(2).mean().clamp_min(1e-30).sqrt() for t in ys]
                for d in range(draws):
                    s = sum((t.float() * torch.randn(t.shape, generator=gen).to(t.device) / r).sum()
                            for t, r in zip(ys, rms))
                    grads = torch.autograd.grad(s, [outs[n] for n in got], retain_graph=d + 1 < draws,
                                                allow_unused=True)
                    for n, g in zip(got, grads):
                        if g is not None:
                            sums[n] += _out_rows(layers[n], outs[n], g).cpu()
            for n in layers:
                acc[n].append(sums[n] / draws if n in sums else None)
            outs.clear()  # frees the batch's graph
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    weights = {}
    for n, per in acc.items():
        live = torch.cat([w for w in per if w is not None] or [torch.zeros(0)])
        live = live[live > 0]
        if not live.numel():  # the layer never reaches the output: every row alike
            weights[n] = [None] * len(per)
            continue
        mean = live.pow(power).mean()
        weights[n] = [None if w is None else (w.pow(power) / mean) for w in per]
    return weights
