"""Large-M CUDA mpgemm through cuBLAS INT8: every uniform block is expanded once to
int8 bytes c = u - 128 (cuda/expand_codes.cu), multiplied with torch._int_mm, and the
exact integer result is recovered with the code sums:

    sum_k u_a u_b = sum_k c_a c_b + 128 (sum u_a + sum u_b) - 128^2 klen
    sum_k v_a v_b = aa ab sum u_a u_b + aa ob sum u_a + ab oa sum u_b + klen oa ob

|sum c_a c_b| <= klen * 2^14 stays below 2^31 for klen <= MAX_KLEN, so the int32
accumulators are exact. Float outputs follow the CPU driver's rounding exactly
(float64: v * seg scale, accumulated in segment order, times the row scales, one
rounding to float32). All metadata is host-side: no sync, CUDA-graph capturable.
The expansion has a pure-torch twin, so this path is tested on the CPU too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._bitplanes import unpack_block_torch
from .._checks import ENCODING
from .._native import _C

MAX_KLEN = 131071
SHIFT = 128


def _pad(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def expand_block(data: Tensor, off: int, bits: int, rows: int, klen: int, kw: int, rows_pad: int,
                 kpad: int) -> Tensor:
    """int8 [rows_pad, kpad]: c = u - 128 for the block's codes, 0 in the padding."""
    out = torch.empty(rows_pad, kpad, dtype=torch.int8, device=data.device)
    if data.device.type == "cuda":
        stream = torch.cuda.current_stream(data.device).cuda_stream
        _C.cuda_expand_codes(data.data_ptr() + 8 * off, bits, rows, kw, klen, out.data_ptr(), rows_pad, kpad, stream)
    else:  # the torch reference of the kernel
        codes = unpack_block_torch(data[off:off + bits * rows * kw], bits, rows, klen, kw)
        out.zero_()
        out[:rows, :klen] = (codes.to(torch.int16) - SHIFT).to(torch.int8)
    return out


def _blocks(desc: Tensor, ksegs: list) -> list:
    """(row_start, rows, bits per segment, word offset per segment) of every row group."""
    res, off = [], 0
    for d in desc.tolist():
        offs = []
        for s, (_, kw) in enumerate(ksegs):
            offs.append(off)
            off += d[2 + s] * d[1] * kw
        res.append((d[0], d[1], d[2:], offs))
    return res


def supported(ksegs: Tensor) -> bool:
    return bool(all(k <= MAX_KLEN for k, _ in ksegs.tolist()))


def mpgemm_int8mm(a_data: Tensor, a_desc: Tensor, a_sums: Tensor, a_perm: Tensor, a_signed: bool,
                  b_data: Tensor, b_desc: Tensor, b_sums: Tensor, b_perm: Tensor, b_signed: bool,
                  ksegs: Tensor, a_row_scale: Optional[Tensor], b_row_scale: Optional[Tensor],
                  a_seg_scale: Optional[Tensor], b_seg_scale: Optional[Tensor], out: Tensor) -> Tensor:
    """Fills out [M, N] (int32, int64 or float32); a_desc, b_desc, ksegs are CPU tensors."""
    ks = [tuple(x) for x in ksegs.tolist()]
    is_float = out.dtype == torch.float32
    acc_dtype = torch.float64 if is_float else torch.int64
    b_blocks = _blocks(b_desc, ks)
    b_cache = {}  # each b block is expanded once, not once per row group of a
    for ra0, ra, abits, aoffs in _blocks(a_desc, ks):
        a_cache = {}
        for gb, (rb0, rb, bbits, boffs) in enumerate(b_blocks):
            total = torch.zeros(ra, rb, dtype=acc_dtype, device=out.device)
            for s, (klen, kw) in enumerate(ks):
                pa, pb = abits[s], bbits[s]
                kpad, ra_pad, rb_pad = _pad(klen, 16), max(32, _pad(ra, 16)), _pad(rb, 16)
                if s not in a_cache:
                    a_cache[s] = expand_block(a_data, aoffs[s], pa, ra, klen, kw, ra_pad, kpad)
                if (gb, s) not in b_cache:
                    b_cache[gb, s] = expand_block(b_data, boffs[s], pb, rb, klen, kw, rb_pad, kpad)
                ea, eb = a_cache[s], b_cache[gb, s]
                cc = torch._int_mm(ea, eb.t())[:ra, :rb].to(torch.int64)
                sa = a_sums[ra0:ra0 + ra, s].view(-1, 1)
                sb = b_sums[rb0:rb0 + rb, s].view(1, -1)
                dot = cc + SHIFT * (sa + sb) - SHIFT * SHIFT * klen
                (aa, oa), (ab, ob) = ENCODING[a_signed][pa][:2], ENCODING[b_signed][pb][:2]
                v = aa * ab * dot + aa * ob * sa + ab * oa * sb + klen * oa * ob
                if is_float:
                    one = torch.ones((), dtype=torch.float64, device=out.device)
                    ss = ((a_seg_scale[s].double() if a_seg_scale is not None else one)
                          * (b_seg_scale[s].double() if b_seg_scale is not None else one))
                    total = total + v.double() * ss
                else:
                    total = total + v
            rows_m, cols_n = a_perm[ra0:ra0 + ra], b_perm[rb0:rb0 + rb]
            if is_float:
                if a_row_scale is not None:
                    total = total * a_row_scale[rows_m].double().view(-1, 1)
                if b_row_scale is not None:
                    total = total * b_row_scale[cols_n].double().view(1, -1)
            out[rows_m.view(-1, 1), cols_n.view(1, -1)] = total.to(out.dtype)
    return out
