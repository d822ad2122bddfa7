"""Rounding math for soniq.ptq: per-channel integer grids, round-to-nearest, GPTQ-style error
feedback (Frantar et al. 2022) with a different grid per output row, and the H-metric
output error a rounding causes.

A layer computes y = x @ W.T with W [N, K]; over calibration inputs X [T, K], H = X.T X / T.
Replacing W by Q changes the mean squared output of row n by (w_n - q_n) H (w_n - q_n).T.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _trellis
from .ops._quantize import level_bounds


def grid(bits: Tensor):
    """(lo, hi, alpha) per output row for signed weights, as soniq's quantizer uses them
    (signed 1-bit: levels {-1, +1}, alpha = 2)."""
    return level_bounds(bits.double(), True)


def round_codes(w: Tensor, step: Tensor, lo: Tensor, hi: Tensor, alpha: Tensor) -> Tensor:
    """Nearest integer code of each entry of w [N, ...] on its row's grid (round half to even,
    as soniq.ops.quantize; 1-bit rows: the sign)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    s, lo, hi, al = (t.reshape(shape) for t in (step, lo, hi, alpha))
    t = w / s
    v = torch.where(al == 1, torch.round(t), torch.round((t + 1) * 0.5) * 2 - 1)
    return torch.maximum(torch.minimum(v, hi), lo)


def mse_step(w: Tensor, bits: int, points: int = 12) -> Tensor:
    """Per-row step of the signed grid at `bits` whose clip (a fraction 0.3..1 of max|w|)
    gives the least rounding MSE: a coarser search than the quantizer's own clip refit, used
    only to rank channels."""
    w = w.float()
    amax = w.abs().amax(1).clamp_min(1e-8)
    b = torch.full_like(amax, float(bits))
    lo, hi, al = grid(b)
    best, best_err = amax / 2 ** (bits - 1), torch.full_like(amax, float("inf"))
    for f in torch.linspace(0.3, 1.0, points).tolist():
        step = amax * f / 2 ** (bits - 1)
        err = ((round_codes(w, step, lo.float(), hi.float(), al.float()) * step[:, None] - w) ** 2).mean(1)
        better = err < best_err
        best, best_err = torch.where(better, step, best), torch.where(better, err, best_err)
    return best


def h_error(w: Tensor, q: Tensor, h: Tensor) -> Tensor:
    """Per-row mean squared output change (w - q) H (w - q).T, w and q [N, K] (float32 math:
    these rank channels, float64 would cost 4x the time at MiniLM's sizes)."""
    d = (w - q).float()
    return ((d @ h.float()) * d).sum(1).double()


def _prepared(w: Tensor, h: Tensor, damp: float, act_order: bool) -> tuple:
    """GPTQ's prologue: float64 copies with dead columns (H_kk = 0) zeroed, columns in
    act-order (largest H_kk first) when asked, and the upper Cholesky factor of (H + damping)^-1.
    Returns (w, hinv, perm); column i of the returned w is column perm[i] of the input."""
    k = w.shape[1]
    w = w.detach().double().clone()
    h = h.detach().double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * float(torch.diagonal(h).mean()) * torch.eye(k, dtype=h.dtype)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError as e:  # not positive definite even after damping
        raise ValueError(f"H is not positive definite after damping {damp} (raise damp): {e}") from None
    return w, hinv, perm


def _check_args(w: Tensor, h: Tensor, damp: float) -> None:
    k = w.shape[1]
    if h.shape != (k, k):
        raise ValueError(f"H must be [{k}, {k}] for a weight with {k} input columns, got {tuple(h.shape)}")
    if not (0 < damp < 1):
        raise ValueError(f"damp must be in (0, 1), got {damp!r}")


def gptq_codes(w: Tensor, h: Tensor, step: Tensor, bits: Tensor, *, damp: float = 0.01,
               block_size: int = 128, act_order: bool = True) -> Tensor:
    """Integer codes [N, K] for w [N, K] on per-row grids (step, bits per row), chosen column
    by column with the rounding error of each column pushed onto the columns not yet rounded
    through the inverse of H (the OBS update GPTQ uses). Columns that never see input
    (H_kk = 0) get the code of 0. Returns float64 integers."""
    _check_args(w, h, damp)
    n, k = w.shape
    lo, hi, al = grid(bits)
    step = step.detach().double()
    w, hinv, perm = _prepared(w, h, damp, act_order)
    codes = torch.zeros_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            v = round_codes(col, step, lo, hi, al)
            codes[:, i1 + i] = v
            e = (col - v * step) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


def trellis_codes(w: Tensor, h: Tensor, row_bits: Tensor, codebook: Tensor, *, damp: float = 0.01,
                  block_size: int = 8, act_order: bool = True, joint: bool = True) -> tuple:
    """Trellis-coded rounding of w [N, K] (soniq._trellis) with GPTQ's error feedback in blocks
    of columns (LDLQ): each block's columns are rounded as sequences down the rows, and the
    block's error E = (W_b - Q_b) U_bb^-1 moves the later columns by -E U_b,rest (U: the upper
    Cholesky factor of H^-1; a block of 1 is GPTQ's column update). A row's values are codebook
    entries x its step, step = RMS(row) x ROW_GAIN / CODEBOOK_SCALE rounded to a bfloat16 value.
    joint: a column is one path over all rows, each row's step row_bits wide, its squared error
    weighted by step^2 (the error in weight units: Viterbi shares the column's bits among its
    rows where they cut the layer's error most); else one path per width (the rows of each
    width in turn). Returns (codes int8 [N, K], states int64 [N, K], step float64 [N])."""
    _check_args(w, h, damp)
    n, k = w.shape
    L = int(codebook.numel()).bit_length() - 1
    step = (w.detach().double().pow(2).mean(1).sqrt() * _trellis.ROW_GAIN / _trellis.CODEBOOK_SCALE).clamp_min(1e-12)
    # bfloat16 values, chosen before the codes: soniq.save stores them in 2 bytes, losslessly
    step = step.to(torch.bfloat16).double()
    values = codebook.double()
    w, hinv, perm = _prepared(w, h, damp, act_order)
    states = torch.zeros(n, k, dtype=torch.int64)
    weight = step.pow(2) / step.pow(2).mean()  # joint paths' error weights, scaled near 1: float32 path costs
    widths = [(b, row_bits == b) for b in torch.unique(row_bits).tolist()]  # the paths per width otherwise
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        x = w[:, i1:i2]
        if joint:
            states[:, i1:i2] = _trellis.viterbi((x / step[:, None]).T, L, row_bits, values, weight).T
        else:
            for b, sel in widths:
                states[sel, i1:i2] = _trellis.viterbi((x[sel] / step[sel, None]).T, L, int(b), values).T
        err = torch.linalg.solve_triangular(hinv[i1:i2, i1:i2], x - values[states[:, i1:i2]] * step[:, None],
                                            upper=True, left=False)
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    out = torch.empty_like(states)
    out[:, perm] = states
    return codebook[out], out, step
