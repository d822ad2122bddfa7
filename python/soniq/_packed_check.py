"""Walking and validating a PackedTensor's blocks: the structural and content checks a
PackedTensor built from untrusted data (a loaded file, a state dict) must pass before any
kernel reads it. Takes the tensor by its attributes (no import of soniq.packed), so the
PackedTensor class and the ops can both use it."""
from __future__ import annotations

import numpy as np
import torch

from ._op_kernels import eager_kernel
from ._bitplanes import unpack_block


def block_walk(p):
    """Yields (group, segment, row_start, rows, k_start, klen, kw, bits, word_offset)."""
    off, S = 0, p.ksegs.shape[0]
    ks = p.ksegs.cpu().tolist()
    k_starts = np.concatenate([[0], np.cumsum([k[0] for k in ks])[:-1]]).astype(int).tolist()
    for g, d in enumerate(p.desc.cpu().tolist()):
        for s in range(S):
            klen, kw = ks[s]
            b = d[2 + s]
            yield g, s, d[0], d[1], k_starts[s], klen, kw, b, off
            off += b * d[1] * kw


def validate_packed(p, name: str) -> None:
    """Structural checks for a PackedTensor built from untrusted data (e.g. a loaded file),
    so a corrupted one raises here instead of reading out of bounds in a kernel."""
    def bad(msg):
        raise ValueError(f"{name}: invalid packed tensor: {msg}")

    if len(p.shape) != 2:
        bad(f"shape {p.shape} is not 2-D")
    R, K = p.shape
    if R <= 0 or K <= 0 or p.axis not in (0, 1):
        bad(f"shape {p.shape} / axis {p.axis}")
    for key, t in p._tensors().items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            bad(f"{key} is a {type(t).__name__}, not a tensor")
        if t.dtype != (torch.float32 if key == "scale" else torch.int64):
            bad(f"{key} has dtype {t.dtype}")
        if t.device != p.data.device:  # kernels get raw pointers: one device for all
            bad(f"{key} is on {t.device} but data is on {p.data.device}")
        if not t.is_contiguous():  # kernels assume dense buffers
            bad(f"{key} is not contiguous")
    if p.ksegs.dim() != 2 or p.ksegs.shape[1] != 2 or p.ksegs.shape[0] < 1:
        bad("ksegs must be [S, 2]")
    S = p.ksegs.shape[0]
    kl, kw = p.ksegs[:, 0], p.ksegs[:, 1]
    if bool((kl <= 0).any()) or int(kl.sum()) != K or bool((kw * 64 < kl).any()):
        bad("K segments do not cover K")
    # kw is what pack makes it: mpgemm walks both operands with one operand's (klen, kw), so
    # a segment of extra (zero) words would shift the other operand's blocks (wrong products,
    # reads past its data)
    if not torch.equal(kw, (kl + 63) // 64):
        bad(f"ksegs words per segment {kw.tolist()} must be ceil(klen / 64) = {((kl + 63) // 64).tolist()}")
    for perm, n, what in ((p.row_perm, R, "row_perm"), (p.k_perm, K, "k_perm")):
        if perm.shape != (n,) or not torch.equal(torch.sort(perm).values, torch.arange(n, device=perm.device)):
            bad(f"{what} is not a permutation of range({n})")
    if p.bits.shape != ((R, K)[p.axis],) or bool(((p.bits < 1) | (p.bits > 8)).any()):
        bad("bits must hold one width in 1..8 per channel")
    if p.desc.dim() != 2 or p.desc.shape[1] != 2 + S or p.desc.shape[0] < 1:
        bad(f"desc must be [G, {2 + S}]")
    if p.sums.shape != (R, S):
        bad(f"sums must be [{R}, {S}]")
    expect, r0 = 0, 0
    for g, d in enumerate(p.desc.cpu().tolist()):
        if d[0] != r0 or d[1] <= 0 or any(not 1 <= b <= 8 for b in d[2:]):
            bad(f"row group {g} is malformed")
        r0 += d[1]
        expect += sum(b * d[1] * w for b, w in zip(d[2:], kw.tolist()))
    if r0 != R:
        bad("row groups do not cover the rows")
    if p.data.dim() != 1 or p.data.numel() != expect:
        bad(f"data has {p.data.numel()} words, expected {expect}")
    if p.scale is not None and (p.scale.shape != ((R, K)[p.axis],) or not bool(torch.isfinite(p.scale).all())
                                or bool((p.scale <= 0).any())):
        bad("scale must be finite, positive, one per channel")
    _validate_contents(p, bad)


def _validate_contents(p, bad) -> None:
    """Checks that the blocks agree with the metadata, so a corrupted tensor cannot give a
    silently wrong product: padding bits are zero (kernels count them), each block's bit
    width matches `bits`, scales along K are constant per segment, and the stored code sums
    equal the codes."""
    R, K = p.shape
    ks = p.ksegs.cpu().tolist()
    k_starts = np.concatenate([[0], np.cumsum([k[0] for k in ks])[:-1]]).astype(int).tolist()
    bits_c, rperm, kperm = p.bits.cpu(), p.row_perm.cpu(), p.k_perm.cpu()
    for g, s, r0, rows, k0, klen, kw, b, off in block_walk(p):
        if p.axis == 0:
            owner = bits_c[rperm[r0:r0 + rows]]
        else:
            owner = bits_c[kperm[k0:k0 + klen]]
        if bool((owner != b).any()):
            bad(f"block ({g}, {s}) holds {b}-bit codes but bits disagrees")
        words = p.data[off:off + b * rows * kw].view(b, rows, kw)
        pos = torch.arange(kw * 64, device=p.data.device).view(kw, 64)
        pad = ((pos >= klen).to(torch.int64) << torch.arange(64, device=p.data.device)).sum(-1)
        if bool(((words & pad) != 0).any()):
            bad(f"block ({g}, {s}) has nonzero padding bits beyond K")
        words = words.reshape(-1)
        codes = eager_kernel(unpack_block, words.device)(words, b, rows, klen, kw)
        if not torch.equal(codes.to(torch.int64).sum(1), p.sums[r0:r0 + rows, s]):
            bad(f"sums of block ({g}, {s}) do not match its codes")
    if p.scale is not None and p.axis == 1:
        sk = p.scale.cpu()[kperm]
        for k0, (klen, _) in zip(k_starts, ks):
            if bool((sk[k0:k0 + klen] != sk[k0]).any()):
                bad("scale along K is not constant within a K segment")
