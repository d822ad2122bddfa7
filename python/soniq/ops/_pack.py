"""soniq.ops.pack / unpack: integer matrices <-> PackedTensor (design.md sections 2-3)."""
from __future__ import annotations

import numpy as np
import torch

from .. import _checks as C
from .._packed_check import block_walk, validate_packed  # noqa: F401  (validate_packed: re-exported)
from ..packed import KLayout, PackedTensor
from . import _library as L


def _group_by_bits(bits: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """Stable permutation putting equal bit widths together (low tier first), plus the
    run lengths and the bit width of each run."""
    perm = torch.sort(bits, stable=True).indices
    vals, counts = torch.unique_consecutive(bits[perm], return_counts=True)
    return perm, [int(c) for c in counts.tolist()], [int(v) for v in vals.tolist()]


def _check_k_layout(k_layout, K: int, device) -> KLayout:
    if isinstance(k_layout, PackedTensor):
        k_layout = k_layout.k_layout
    if not isinstance(k_layout, KLayout):
        raise TypeError(f"k_layout must be a soniq.KLayout or a PackedTensor, got {type(k_layout).__name__}")
    perm = k_layout.perm.to(device=device, dtype=torch.int64)
    if perm.dim() != 1 or perm.numel() != K:
        raise ValueError(f"k_layout.perm must have K={K} entries, got shape {tuple(perm.shape)}")
    if not torch.equal(torch.sort(perm).values, torch.arange(K, device=device)):
        raise ValueError("k_layout.perm must be a permutation of range(K)")
    lens = tuple(int(x) for x in k_layout.seg_lens)
    if not lens or min(lens) <= 0 or sum(lens) != K:
        raise ValueError(f"k_layout.seg_lens must be positive and sum to K={K}, got {list(lens)}")
    return KLayout(perm, lens)


def _report_out_of_range(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ch_axis: int,
                         bits: torch.Tensor, signed: bool, name: str) -> None:
    shape = [-1, 1] if ch_axis == 0 else [1, -1]
    lo2, hi2 = lo.view(shape), hi.view(shape)
    bad = (v < lo2) | (v > hi2)
    if signed:  # signed 1-bit holds {-1, +1}: 0 lies inside [lo, hi] but is not a code
        bad |= (bits.view(shape) == 1) & (v == 0)
    if bool(bad.any()):
        r, k = (int(i) for i in bad.nonzero()[0])
        ch = (r, k)[ch_axis]
        b = int(bits[ch])
        kind = "signed" if signed else "unsigned"
        allowed = "{-1, +1}" if (signed and b == 1) else f"{int(lo[ch])}..{int(hi[ch])}"
        where = "row" if ch_axis == 0 else "column"
        raise ValueError(f"{name}[{r}, {k}] = {int(v[r, k])} is out of range for {where} {ch}'s "
                         f"{b}-bit {kind} encoding (expected {allowed})")


def pack(values, bits, *, signed: bool, axis: int = 0, scale=None, k_layout=None) -> PackedTensor:
    """Packs an integer matrix [R, K] into bit planes for soniq.ops.mpgemm.

    values: integer torch tensor or numpy array [R, K] (any strides).
    bits:   int in 1..8, or 1-D per-channel bit widths along `axis` (axis=0: per row,
            as for weights; axis=1: per K column, as for activations).
    signed: two's-complement range for b >= 2 bits, {-1, +1} for 1 bit; else 0..2**b-1.
    scale:  optional positive float or 1-D per-channel scales along `axis`. Along K,
            scales must be constant within each bit width (a GEMM can only factor out
            one scale per K segment).
    k_layout: K permutation/segmentation to use (a KLayout, or another PackedTensor whose
            layout to share) -- needed when the other operand has per-K-column bits.
    """
    if not isinstance(signed, (bool, np.bool_)):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    signed = bool(signed)
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or axis not in (0, 1):
        raise ValueError(f"axis must be 0 (per row) or 1 (per K column), got {axis!r}")
    v, kind = C.as_int_tensor(values, "values")
    C.check_2d_nonempty(v, "values")
    dtype = torch.int64 if kind == "numpy" else v.dtype
    R, K = v.shape
    dev = v.device
    if v.dtype in (torch.int8, torch.uint8):  # int16 holds every code and offset exactly
        v = v.to(torch.int16)
    bits_v = C.bits_vector(bits, (R, K)[axis], "bits", dev)

    lo, hi = C.value_range(bits_v, signed)
    if v.dtype == torch.int16:
        lo, hi = lo.to(torch.int16), hi.to(torch.int16)
    _report_out_of_range(v, lo, hi, axis, bits_v, signed, "values")  # before any narrowing: no wrap-around

    # codes in int16 (in range now): a quarter of the memory traffic of int64 on large activations
    alpha, offset = C.code_affine(bits_v, signed)
    shape = [-1, 1] if axis == 0 else [1, -1]
    shift = (alpha - 1).to(torch.int16).view(shape)  # alpha is 1 or 2 (signed 1-bit)
    codes = ((v.to(torch.int16) - offset.to(torch.int16).view(shape)) >> shift).to(torch.uint8)

    # K layout: identity unless bits vary along K or the caller gives one
    if k_layout is not None:
        kl = _check_k_layout(k_layout, K, dev)
    elif axis == 1:
        perm, lens, _ = _group_by_bits(bits_v)
        kl = KLayout(perm, tuple(lens))
    else:
        kl = KLayout(torch.arange(K, device=dev), (K,))
    seg_starts = np.concatenate([[0], np.cumsum(kl.seg_lens)[:-1]]).astype(int).tolist()

    if axis == 0:
        row_perm, group_lens, group_bits = _group_by_bits(bits_v)
        block_bits = [[b] * len(kl.seg_lens) for b in group_bits]
    else:
        row_perm, group_lens = torch.arange(R, device=dev), [R]
        kbits = bits_v[kl.perm]
        segb = []
        for s0, n in zip(seg_starts, kl.seg_lens):
            seg = kbits[s0:s0 + n]
            if bool((seg != seg[0]).any()):
                raise ValueError("k_layout does not match bits: each K segment must hold a single bit width")
            segb.append(int(seg[0]))
        block_bits = [segb]

    scale_v = C.scale_vector(scale, (R, K)[axis], "scale", dev)
    if scale_v is not None and axis == 1:
        C.check_constant_per_segment(scale_v, kl.perm, kl.seg_lens, "scale")

    # index_select: advanced indexing runs an OpenMP region that costs milliseconds on a busy machine
    for dim, perm in ((0, row_perm), (1, kl.perm)):
        if not torch.equal(perm, torch.arange(perm.numel(), device=dev)):
            codes = codes.index_select(dim, perm)
    kws = [(n + 63) // 64 for n in kl.seg_lens]
    words, desc, sums = [], [], torch.empty(R, len(kl.seg_lens), dtype=torch.int64, device=dev)
    r0 = 0
    for g, rows in enumerate(group_lens):
        desc.append([r0, rows] + block_bits[g])
        for s, (s0, n) in enumerate(zip(seg_starts, kl.seg_lens)):
            blk = codes[r0:r0 + rows, s0:s0 + n].contiguous()
            words.append(L.pack_block(blk, block_bits[g][s], kws[s]))
            sums[r0:r0 + rows, s] = blk.sum(1, dtype=torch.int64)
        r0 += rows

    return PackedTensor(
        shape=(R, K), axis=axis, signed=signed, bits=bits_v,
        data=torch.cat(words), desc=torch.tensor(desc, dtype=torch.int64, device=dev),
        sums=sums, row_perm=row_perm.contiguous(), k_perm=kl.perm.contiguous(),
        ksegs=torch.tensor([[n, w] for n, w in zip(kl.seg_lens, kws)], dtype=torch.int64, device=dev),
        scale=scale_v, dtype=dtype, kind=kind)


def unpack(p: PackedTensor):
    """Returns the integer matrix that was packed (same kind and dtype as pack's input)."""
    if not isinstance(p, PackedTensor):
        raise TypeError(f"p must be a soniq.PackedTensor, got {type(p).__name__}")
    R, K = p.shape
    codes = torch.empty(R, K, dtype=torch.int64, device=p.device)
    data = p.data  # once: a weight kept as its layout rebuilds its planes on access
    for _, _, r0, rows, k0, klen, kw, b, off in block_walk(p):
        blk = L.unpack_block(data[off:off + b * rows * kw], b, rows, klen, kw)
        codes[r0:r0 + rows, k0:k0 + klen] = blk.to(torch.int64)
    out = torch.empty_like(codes)
    # undo the permutations: packed (i, j) holds original (row_perm[i], k_perm[j])
    out[p.row_perm.view(-1, 1), p.k_perm.view(1, -1)] = codes
    alpha, offset = C.code_affine(p.bits, p.signed)
    shape = [-1, 1] if p.axis == 0 else [1, -1]
    out = out * alpha.view(shape) + offset.view(shape)
    out = out.to(p.dtype)
    return out.numpy() if p.kind == "numpy" else out
