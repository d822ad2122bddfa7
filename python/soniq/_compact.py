"""Compact on-disk form of a PackedTensor's metadata (soniq.save format versions 2 and 3).

In memory the kernels take int64 metadata; on disk that is up to 8x the bytes it needs and,
for a layer at ~4 bits, several percent of the layer. So the file keeps the bit planes
(`data`) as they are and stores: permutations as int16 (int32 when a dimension exceeds
32767), desc/ksegs as int32, and no code sums (they are popcounts of the planes: recomputed
on load). Version 2 also stores the bit widths (uint8 per channel); version 3 drops them
(each block's width is in `desc`, so the widths follow from desc, ksegs and the
permutations) and drops a permutation that is the identity. Loading widens everything back
to int64.
"""
from __future__ import annotations

import torch
from torch import Tensor

_M1, _M2, _M4, _H01 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101


def _index_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 32767 else torch.int32


def compact(state: dict) -> dict:
    """PackedTensor.state_dict() -> the tensors format version 3 stores."""
    out = {}
    for k, t in state.items():
        if k in ("sums", "bits"):
            continue
        if k in ("row_perm", "k_perm") and torch.equal(t, torch.arange(t.numel(), dtype=t.dtype, device=t.device)):
            continue
        if k in ("row_perm", "k_perm"):
            t = t.to(_index_dtype(t.numel()))
        elif k in ("desc", "ksegs"):
            t = t.to(torch.int32)
        elif k == "bits":
            t = t.to(torch.uint8)
        out[k] = t
    return out


def _popcount(t: Tensor) -> Tensor:
    """Bits set per int64 word (SWAR; the masks drop the sign bits an arithmetic shift brings)."""
    t = t - ((t >> 1) & _M1)
    t = (t & _M2) + ((t >> 2) & _M2)
    t = (t + (t >> 4)) & _M4
    return ((t * _H01) >> 56) & 0xFF


def code_sums(data: Tensor, desc: Tensor, ksegs: Tensor) -> Tensor:
    """sums [R, S] from the planes: blocks in (group, segment) order, each [bits][rows][kw]."""
    S = ksegs.shape[0]
    if data.dtype != torch.int64 or data.dim() != 1:
        raise ValueError(f"packed data must be 1-D int64 words, got {data.dtype} {tuple(data.shape)}")
    R = int(desc[:, 1].sum())
    sums = torch.zeros(R, S, dtype=torch.int64)
    off, covered = 0, 0
    kws = ksegs[:, 1].tolist()
    for gi, g in enumerate(desc.tolist()):
        r0, n = g[0], g[1]
        # the rows this group's sums go to: a malformed desc would index sums out of range
        if r0 != covered or n <= 0 or any(not 1 <= b <= 8 for b in g[2:]):
            raise ValueError(f"packed desc row group {gi} is malformed: {g}")
        covered += n
        for s in range(S):
            b, kw = g[2 + s], kws[s]
            size = b * n * kw
            if size <= 0 or off + size > data.numel():
                raise ValueError("packed data is shorter than its layout says")
            pc = _popcount(data[off:off + size].view(b, n, kw)).sum(-1)  # [bits, rows]
            sums[r0:r0 + n, s] = (pc << torch.arange(b).view(-1, 1)).sum(0)
            off += size
    if off != data.numel():
        raise ValueError("packed data is longer than its layout says")
    return sums


def channel_bits(desc: Tensor, ksegs: Tensor, row_perm: Tensor, k_perm: Tensor, axis: int) -> Tensor:
    """The per-channel bit widths (`bits`) a packed tensor's blocks hold: along rows (axis 0)
    group g's rows have its width; along K (axis 1) segment s's columns have its width. A
    channel no block covers stays 0, so validation refuses a malformed layout."""
    if axis == 0:
        bits = torch.zeros(row_perm.numel(), dtype=torch.int64)
        for g in desc.tolist():
            bits[row_perm[g[0]:g[0] + g[1]]] = g[2]
        return bits
    bits = torch.zeros(k_perm.numel(), dtype=torch.int64)
    k0 = 0
    for s, klen in enumerate(ksegs[:, 0].tolist()):
        bits[k_perm[k0:k0 + klen]] = int(desc[0, 2 + s])
        k0 += klen
    return bits


def widen(stored: dict, meta: dict) -> dict:
    """The stored tensors of format version 2 or 3 -> PackedTensor.state_dict() (int64
    metadata, code sums recomputed; version 3's identity permutations and bit widths rebuilt
    from `meta` (the PackedTensor's metadata: shape, axis) and the blocks)."""
    out = {k: (t if k in ("data", "scale") else t.to(torch.int64)) for k, t in stored.items()}
    shape = meta.get("shape") if isinstance(meta, dict) else None
    if isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(n, int) and n >= 0 for n in shape):
        for k, n in (("row_perm", shape[0]), ("k_perm", shape[1])):
            out.setdefault(k, torch.arange(n, dtype=torch.int64))
    if all(k in out for k in ("data", "desc", "ksegs")) and out["desc"].dim() == 2 and out["ksegs"].dim() == 2:
        if out["desc"].shape[0] >= 1 and out["desc"].shape[1] == 2 + out["ksegs"].shape[0]:
            out["sums"] = code_sums(out["data"], out["desc"], out["ksegs"])
            if "bits" not in out and all(k in out for k in ("row_perm", "k_perm")) and meta.get("axis") in (0, 1):
                try:
                    out["bits"] = channel_bits(out["desc"], out["ksegs"], out["row_perm"], out["k_perm"], meta["axis"])
                except (IndexError, RuntimeError) as e:  # a permutation shorter than desc says
                    raise ValueError(f"packed desc/ksegs do not fit the permutations: {e}") from None
    return out
