"""Measurement script (not part of the package): joint trellis paths (a column's rows at their
own widths in one path, errors weighted by the row's step^2) against one path per width.
docs/DESIGN_NOTES.md, "Trellis-coded weights" (session 47).

    python docs/experiments/trellis_joint_paths.py [--states-log2 12]

1. Unit-Gaussian sequences of 768 steps, 48% of them 5 bits wide (the rest 4): squared error of
   one path per width, of one joint path, and with the 5-bit steps weighted 4x.
2. MiniLM's rows: each Linear layer's row RMS from the FP32 weights, the largest 48% at 5 bits,
   unit-Gaussian columns in RMS units; error weighted by RMS^2 (the error in weight units) of the
   joint weighted path, the joint unweighted one, against one path per width. A few seconds.
"""
import argparse

import torch

from soniq import _trellis as T
from soniq.demos import minilm as D


def per_width(x: torch.Tensor, bits: torch.Tensor, L: int, v: torch.Tensor) -> torch.Tensor:
    q = torch.empty_like(x)
    for k in torch.unique(bits).tolist():
        sel = bits == k
        q[:, sel] = v[T.viterbi(x[:, sel], L, int(k), v)]
    return q


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--states-log2", type=int, default=12)
    L = ap.parse_args().states_log2
    v = T.codebook(L).double() / T.CODEBOOK_SCALE * T.ROW_GAIN  # values in units of a row's RMS
    g = torch.Generator().manual_seed(0)
    n = 768
    bits = torch.where(torch.randperm(n, generator=g) < int(0.48 * n), 5, 4)
    x = torch.randn(32, n, generator=g, dtype=torch.float64)
    sep = (x - per_width(x, bits, L, v)) ** 2
    joint = (x - v[T.viterbi(x, L, bits, v)]) ** 2
    print(f"L = {L}, unit Gaussians, 48% of the steps 5 bits: per width {sep.mean():.5f} (4-bit steps "
          f"{sep[:, bits == 4].mean():.5f}, 5-bit {sep[:, bits == 5].mean():.5f}); joint {joint.mean():.5f} "
          f"({joint.mean() / sep.mean():.3f}x)")
    w = torch.where(bits == 5, 4.0, 1.0).double()
    jw = (x - v[T.viterbi(x, L, bits, v, w)]) ** 2
    print(f"  5-bit steps weighted 4x: per width {(w * sep).mean():.5f}, joint {(w * jw).mean():.5f} "
          f"({(w * jw).mean() / (w * sep).mean():.3f}x)")
    teacher = D.load_teacher()
    for name, lin in teacher.named_modules():
        if not (isinstance(lin, torch.nn.Linear) and ".encoder.layer." in name):
            continue
        rms = lin.weight.detach().double().pow(2).mean(1).sqrt()
        rb = torch.where(torch.argsort(torch.argsort(rms, descending=True)) < int(0.48 * rms.numel()), 5, 4)
        w = rms ** 2 / (rms ** 2).mean()
        x = torch.randn(16, rms.numel(), generator=g, dtype=torch.float64)
        e = {"per width": (w * (x - per_width(x, rb, L, v)) ** 2).mean(),
             "joint": (w * (x - v[T.viterbi(x, L, rb, v, w)]) ** 2).mean(),
             "joint unweighted": (w * (x - v[T.viterbi(x, L, rb, v)]) ** 2).mean()}
        print(f"{name.split('encoder.')[-1]:32s} RMS max/min {float(rms.max() / rms.min()):5.2f}: joint "
              f"{e['joint'] / e['per width']:.3f}x, unweighted {e['joint unweighted'] / e['per width']:.3f}x")


if __name__ == "__main__":
    main()
