"""SONIQ QAT on torch.distributed (DistributedDataParallel): a small MLP trained on every rank
with its own data, then frozen, fine-tuned, converted and saved by rank 0.

    torchrun --nproc-per-node 2 -m soniq.demos.ddp_qat --out mlp.safetensors

What keeps the ranks in step (see docs/DESIGN_NOTES.md, "QAT on torch.distributed"):
- DDP averages the gradients of every parameter, bit logits and clips included;
- activation calibration (first forward) and freeze_precision take rank 0's result;
- QATConfig(seed=...) makes phase-1 noise a function of (seed, rank, layer, step).
Phase 2 trains fewer parameters (the bit logits are frozen), so the model is wrapped in a
new DDP after freeze_precision. Runs on the CPU with gloo (use nccl and .cuda() on GPUs).
"""
from __future__ import annotations

import argparse
import os
from datetime import timedelta

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import soniq
from soniq.qat import QATConfig

IN, HIDDEN, CLASSES, BATCH = 20, 32, 10, 16


def config() -> QATConfig:
    return QATConfig(w_palette=(1, 4), a_palette=(2, 8), w_bits_target=2.0, a_bits_target=4.0, seed=1234)


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same start on every rank (DDP would broadcast rank 0's anyway)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def batches(rank: int, steps: int, offset: int = 0) -> list:
    """This rank's data: `steps` batches (x, y) from a generator keyed by rank (and offset)."""
    g = torch.Generator().manual_seed(1000 * (offset + 1) + rank)
    w = torch.randn(IN, CLASSES, generator=torch.Generator().manual_seed(7))  # one task for all ranks
    out = []
    for _ in range(steps):
        x = torch.randn(BATCH, IN, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


def probe_input() -> torch.Tensor:
    return torch.randn(4, IN, generator=torch.Generator().manual_seed(99))


def train(rank: int, phase1: int = 6, phase2: int = 4, lr: float = 0.05) -> dict:
    """The training loop every rank runs (torch.distributed must be initialized). Returns the
    prepared model (phase 2), a phase-1 output on a fixed probe input (noise of this rank),
    and the tiers freeze_precision gives a copy whose bit logits this rank perturbed."""
    model = soniq.qat.prepare(make_model(), config())
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with torch.no_grad():
        ddp(batches(rank, 1, offset=9)[0][0])  # calibration: every rank takes rank 0's ranges
    for x, y in batches(rank, phase1):  # phase 1: noise, learned bits
        opt.zero_grad()
        (F.cross_entropy(ddp(x), y) + soniq.qat.bit_penalty(model)).backward()
        opt.step()
    with torch.no_grad():
        probe = model(probe_input())
    spoiled = copy.deepcopy(model)  # freeze_precision must give every rank rank 0's tiers
    with torch.no_grad():
        for q in soniq.qat.quant_layers(spoiled).values():
            q.w_quant.bits_logit.add_(torch.randn(q.w_quant.channels, generator=torch.Generator().manual_seed(rank)))
    soniq.qat.freeze_precision(spoiled)
    soniq.qat.freeze_precision(model)
    ddp = DDP(model)  # phase 2 trains fewer parameters (bit logits frozen): wrap again
    for x, y in batches(rank, phase2, offset=1):
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    tiers = [q.w_quant.frozen_bits.clone() for q in soniq.qat.quant_layers(spoiled).values()]
    return {"model": model, "probe": probe, "spoiled_tiers": tiers}


def init_from_env(timeout_s: float = 120.0) -> tuple[int, int]:
    """torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) -> a gloo group."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="ddp_qat.safetensors", help="where rank 0 saves the packed model")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun, e.g.: torchrun --nproc-per-node 2 -m soniq.demos.ddp_qat")
    torch.set_num_threads(1)
    rank, world = init_from_env()
    res = train(rank)
    # the ranks must hold the same model: compare every parameter and buffer with rank 0's
    sd = res["model"].state_dict()
    same = True
    for t in sd.values():
        ref = t.detach().clone()
        dist.broadcast(ref, src=0)
        same &= bool(torch.equal(ref, t))
    flags = torch.tensor([int(same)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if rank == 0:
        packed = soniq.convert(res["model"])
        soniq.save(packed, args.out)
        rep = soniq.qat.precision_report(res["model"])
        print(f"{world} ranks, identical models on every rank: {bool(flags)}; "
              f"avg W bits {rep['avg_w_bits']:.2f}, avg A bits {rep['avg_a_bits']:.2f}; saved {args.out}")
    dist.destroy_process_group()
    return 0 if bool(flags) else 1


if __name__ == "__main__":
    raise SystemExit(main())
