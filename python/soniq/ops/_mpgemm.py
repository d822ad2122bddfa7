"""soniq.ops.mpgemm: exact mixed-precision GEMM over PackedTensors."""
from __future__ import annotations

import torch

from .._checks import max_abs_value
from .._native import _C
from .._op_kernels import eager_kernel
from ..packed import PackedTensor
from . import _library as L

INT32_MAX = 2**31 - 1


def int32_limit(a: PackedTensor, b: PackedTensor) -> int:
    """Largest |a_int @ b_int.T| entry the bit widths allow: sum over K segments of
    klen * max|a| * max|b|, maximized over every pair of row groups."""
    for name, p in (("a", a), ("b", b)):
        if not isinstance(p, PackedTensor):
            raise TypeError(f"{name} must be a soniq.PackedTensor (from soniq.ops.pack), got {type(p).__name__}")
    if not a.k_layout.same_as(b.k_layout):  # as mpgemm multiplies them: the one-segment operand re-laid
        a, b = _common_k_layout(a, b)
    klens = a.host_meta()[1][:, 0].tolist()
    worst = 0
    for da in a.host_meta()[0].tolist():
        for db in b.host_meta()[0].tolist():
            tot = sum(n * max_abs_value(ba, a.signed) * max_abs_value(bb, b.signed)
                      for n, ba, bb in zip(klens, da[2:], db[2:]))
            worst = max(worst, tot)
    return worst


def _common_k_layout(a: PackedTensor, b: PackedTensor) -> tuple:
    """The kernels multiply K segment by K segment, each of one bit width in both operands,
    so a and b must permute and cut K alike. An operand with a single K segment has one
    width along all of K and fits any layout: its codes are unpacked and repacked in the
    other's (costs about a pack of that operand on every call; pack it with k_layout= to
    pay it once)."""
    if len(b.k_layout.seg_lens) == 1:
        return a, _relayout(b, a)
    if len(a.k_layout.seg_lens) == 1:
        return _relayout(a, b), b
    raise ValueError(
        "a and b have different K layouts (a: " + a.k_layout.describe() + "; b: " + b.k_layout.describe()
        + "). The kernels multiply K segment by K segment, each of one bit width in both operands, so "
        "both must order and cut K the same way; with per-K-column bits on both sides, pack them with "
        "k_layout=soniq.KLayout.from_bits(a_bits, b_bits).")


def _relayout(p: PackedTensor, like: PackedTensor) -> PackedTensor:
    """p (one K segment) with like's K permutation and segments, moved at the code level:
    each row group's codes are unpacked once, their columns reordered, and every target
    segment packed with the group's width (values, ranges and scales are unchanged)."""
    _, like_ksegs, like_perm = like.host_meta()
    desc, ksegs, k_perm = p.host_meta()
    K, kw = p.shape[1], int(ksegs[0, 1])
    data = p.data  # once: a weight kept as its layout rebuilds all its planes on each access
    dev = data.device
    inv = torch.empty_like(k_perm)
    inv[k_perm] = torch.arange(K)
    cols = inv[like_perm].to(dev)  # target position -> column of p's codes
    lens = [int(n) for n in like_ksegs[:, 0].tolist()]
    kws = [int(w) for w in like_ksegs[:, 1].tolist()]
    words, new_desc, sums, off = [], [], torch.empty(p.shape[0], len(lens), dtype=torch.int64, device=dev), 0
    for r0, rows, b in desc[:, :3].tolist():
        codes = L.unpack_block(data[off:off + b * rows * kw], b, rows, K, kw).index_select(1, cols)
        off += b * rows * kw
        new_desc.append([r0, rows] + [b] * len(lens))
        s0 = 0
        for s, (n, w) in enumerate(zip(lens, kws)):
            blk = codes[:, s0:s0 + n].contiguous()
            words.append(L.pack_block(blk, b, w))
            sums[r0:r0 + rows, s] = blk.sum(1, dtype=torch.int64)
            s0 += n
    new_desc = torch.tensor(new_desc, dtype=torch.int64)
    return PackedTensor(shape=p.shape, axis=p.axis, signed=p.signed, bits=p.bits, data=torch.cat(words),
                        desc=new_desc.to(dev), sums=sums, row_perm=p.row_perm, k_perm=like.k_perm.to(dev),
                        ksegs=like_ksegs.to(dev), scale=p.scale, dtype=p.dtype, kind=p.kind,
                        host_meta=(new_desc, like_ksegs, like_perm), k_layout_of=like,
                        token_scale=p.token_scale)  # per-token scales of a dynamic operand


def mpgemm(a: PackedTensor, b: PackedTensor, *, out_dtype: torch.dtype | None = None):
    """out[M, N] = a_int @ b_int.T for packed a [M, K] and b [N, K].

    Without scales the result is exact: int32 by default, int64 with out_dtype=torch.int64.
    int32 is refused (OverflowError) when K and the bit widths could exceed 2**31-1; the
    limit is K * max|a| * max|b|, e.g. K <= 33,025 for unsigned 8-bit x unsigned 8-bit,
    K <= 131,071 for signed 8-bit x signed 8-bit. With scales on either operand the
    result is float32: sum over K segments of acc * seg scales, times row scales of a
    and b (accumulated exactly in int64, scaled in float64, rounded once).
    Returns a numpy array when both operands were packed from numpy.
    """
    for name, p in (("a", a), ("b", b)):
        if not isinstance(p, PackedTensor):
            raise TypeError(f"{name} must be a soniq.PackedTensor (pack it with soniq.ops.pack), "
                            f"got {type(p).__name__}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same K: a is {a.shape} (K={a.shape[1]}), "
                         f"b is {b.shape} (K={b.shape[1]})")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got a on {a.device} and b on {b.device}")
    # operands from a plan checked against the other one (packed layers) share its layout
    shared = a._k_layout_of is b or b._k_layout_of is a
    if not shared and not a.k_layout.same_as(b.k_layout):
        a, b = _common_k_layout(a, b)

    scaled = any(t is not None for t in (a.scale, b.scale, a.row_scale, b.row_scale))
    if scaled:
        if out_dtype not in (None, torch.float32):
            raise ValueError(f"out_dtype must be None or torch.float32 when scales are set, got {out_dtype}")
        kind = L.KIND_FLOAT32
    elif out_dtype in (None, torch.int32):
        limit = int32_limit(a, b)
        if limit > INT32_MAX:
            raise OverflowError(
                f"int32 output could overflow: K={a.shape[1]} with these bit widths allows |out| up to "
                f"{limit} > 2**31-1. Pass out_dtype=torch.int64 for a wider accumulator.")
        kind = L.KIND_INT32
    elif out_dtype == torch.int64:
        kind = L.KIND_INT64
    else:
        raise ValueError(f"out_dtype must be None, torch.int32 or torch.int64 (or float32 with scales), got {out_dtype}")
    if a.device.type == "cuda":
        if not _C.built_with_cuda:
            raise RuntimeError("soniq was built without CUDA kernels; move the operands to the CPU "
                               "or reinstall with nvcc available (SONIQ_CUDA=ON)")

    # desc and ksegs go as their cached CPU copies: the CUDA kernels take them by value,
    # so no device-to-host copy (and no sync) happens here after the first call.
    a_desc, a_ksegs, _ = a.host_meta()
    b_desc = b.host_meta()[0]
    b_layout = b.exec_layout() if b.device.type == "cpu" else None
    # a weight kept as its layout only passes no planes (every ISA's kernels read the layout)
    b_data = b.data if b._data is not None or b_layout is None else None
    try:
        eager = type(a.sums) is torch.Tensor and type(b.sums) is torch.Tensor and not torch.compiler.is_compiling()
        # eager: the device's kernel straight from the op's table (skips ~35 us of op dispatch per
        # call); tracing (dynamo, fake tensors): the registered op
        op = eager_kernel(L.mpgemm_packed, a.device) if eager else torch.ops.soniq.mpgemm_packed
        out = op(
            a.data, a_desc, a.sums, a.row_perm, a.signed,
            b_data, b_desc, b.sums, b.row_perm, b.signed,
            a_ksegs, a.row_scale, b.row_scale, a.seg_scale, b.seg_scale, kind, b_layout)
    except RuntimeError as e:  # the [M, N] output did not fit: say so as MemoryError
        if "alloc" not in str(e):
            raise
        raise MemoryError(f"the [{a.shape[0]}, {b.shape[0]}] output of mpgemm does not fit in memory: {e}") from None
    if a.kind == "numpy" and b.kind == "numpy":
        return out.cpu().numpy()
    return out
