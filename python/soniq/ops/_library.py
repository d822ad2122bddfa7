"""torch.library custom ops over the native core (schemas, fake kernels, device kernels).

The core never links libtorch: these wrappers hand it raw pointers (and, on CUDA, the
current stream). Fake implementations let torch.compile and opcheck trace the ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._bitplanes import pack_block, pack_block_torch, unpack_block, unpack_block_torch  # noqa: F401 (block ops; tests use the references)
from .._native import _C
from .._op_kernels import no_kernel, register
from . import _int8mm

KIND_INT32, KIND_INT64, KIND_FLOAT32 = 0, 1, 2
_KIND_DTYPE = {KIND_INT32: torch.int32, KIND_INT64: torch.int64, KIND_FLOAT32: torch.float32}


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


# ---- mixed-precision GEMM ---------------------------------------------------------------
@torch.library.custom_op("soniq::mpgemm_packed", mutates_args=())
def mpgemm_packed(a_data: Tensor, a_desc: Tensor, a_sums: Tensor, a_perm: Tensor, a_signed: bool,
                  b_data: Optional[Tensor], b_desc: Tensor, b_sums: Tensor, b_perm: Tensor, b_signed: bool,
                  ksegs: Tensor, a_row_scale: Optional[Tensor], b_row_scale: Optional[Tensor],
                  a_seg_scale: Optional[Tensor], b_seg_scale: Optional[Tensor], kind: int,
                  b_layout: Optional[Tensor] = None) -> Tensor:
    """out[M, N] = a_int @ b_int.T over packed operands (int32/int64), or scaled float32.
    b_layout (CPU): b's execution layout (PackedTensor.exec_layout), read by the layout
    kernels; when it is None the call builds one, unless every block pair runs bit-serially
    (the planes are then all it reads). b_data may be None when b_layout is given (a weight
    kept as its layout only, CPU).

    a_desc, b_desc and ksegs (the small layout metadata) are read on the host: pass CPU
    tensors (PackedTensor.host_meta()) so a CUDA call never syncs; device copies work
    but cost a device-to-host copy. Everything else lives on the data's device.
    The body runs only on a device type with no kernel (registered below)."""
    raise no_kernel(mpgemm_packed, "soniq::mpgemm_packed", a_data.device)


def _check_bounds(a_data, a_desc, a_sums, a_perm, b_data, b_desc, b_sums, b_perm, ksegs,
                  a_row_scale, b_row_scale, a_seg_scale, b_seg_scale, b_layout) -> None:
    """What keeps the kernels within the buffers when the op is called directly (soniq.ops.mpgemm
    has checked the operands already): dtypes and sizes against desc and ksegs, on the host."""
    def bad(msg):
        raise ValueError(f"soniq::mpgemm_packed: {msg}")

    if ksegs.dtype != torch.int64 or ksegs.dim() != 2 or ksegs.shape[1] != 2 or ksegs.shape[0] < 1:
        bad("ksegs must be int64 [S, 2]")
    S = ksegs.shape[0]
    kw = [k[1] for k in ksegs.tolist()]
    for side, data, desc, sums, perm, row_scale, layout in (("a", a_data, a_desc, a_sums, a_perm, a_row_scale, None),
                                                            ("b", b_data, b_desc, b_sums, b_perm, b_row_scale, b_layout)):
        for what, t in (("data", data), ("desc", desc), ("sums", sums), ("perm", perm)):
            if t is not None and (t.dtype != torch.int64 or not t.is_contiguous()):
                bad(f"{side}_{what} must be a contiguous int64 tensor, got {t.dtype}")
        if desc.dim() != 2 or desc.shape[1] != 2 + S:
            bad(f"{side}_desc must be [G, {2 + S}] for {S} K segments, got {tuple(desc.shape)}")
        groups, rows = desc.tolist(), perm.numel()
        if any(g[1] < 0 or any(not 1 <= b <= 8 for b in g[2:]) for g in groups) or sum(g[1] for g in groups) != rows:
            bad(f"{side}_desc row groups must cover the {rows} rows of {side}_perm with widths in 1..8")
        words = sum(g[2 + s] * g[1] * kw[s] for g in groups for s in range(S))
        if data is not None and data.numel() < words:
            bad(f"{side}_data has {data.numel()} words, its desc and ksegs need {words}")
        if data is None and layout is None:
            bad(f"{side}_data is None without an execution layout")
        if sums.numel() < rows * S:
            bad(f"{side}_sums has {sums.numel()} entries, expected {rows} x {S}")
        if row_scale is not None and (row_scale.dtype != torch.float32 or row_scale.numel() != rows):
            bad(f"{side}_row_scale must be float32 with {rows} entries")
        if layout is not None:
            need = sum(g[2 + s] * ((g[1] + 15) // 16 * 16) * kw[s] * 8 for g in groups for s in range(S))
            if layout.numel() * layout.element_size() < need or not layout.is_contiguous():
                bad(f"{side}_layout holds {layout.numel() * layout.element_size()} bytes, the layout needs {need}")
    for name, t in (("a_seg_scale", a_seg_scale), ("b_seg_scale", b_seg_scale)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != S):
            bad(f"{name} must be float32 with {S} entries")


def _checked(kernel):
    """kernel as torch's dispatcher runs it (torch.ops.soniq.mpgemm_packed called directly, or a
    compiled graph): bounds checked first. soniq.ops.mpgemm and the packed layers validated
    their operands and call the kernel itself (_op_kernels.eager_kernel): ~13 us less a call."""
    def run(a_data, a_desc, a_sums, a_perm, a_signed, b_data, b_desc, b_sums, b_perm, b_signed, ksegs,
            a_row_scale, b_row_scale, a_seg_scale, b_seg_scale, kind, b_layout=None):
        _check_bounds(a_data, a_desc.cpu(), a_sums, a_perm, b_data, b_desc.cpu(), b_sums, b_perm, ksegs.cpu(),
                      a_row_scale, b_row_scale, a_seg_scale, b_seg_scale,
                      b_layout if a_data.device.type == "cpu" else None)  # CUDA ignores a CPU layout
        return kernel(a_data, a_desc, a_sums, a_perm, a_signed, b_data, b_desc, b_sums, b_perm, b_signed, ksegs,
                      a_row_scale, b_row_scale, a_seg_scale, b_seg_scale, kind, b_layout)
    return run


def _operands(a_data, a_desc, a_sums, a_perm, a_signed, b_data, b_desc, b_sums, b_perm, b_signed,
              a_row_scale, b_row_scale, a_seg_scale, b_seg_scale) -> tuple:
    """The operand and scale tuples the native drivers take (raw pointers)."""
    M, N = a_perm.numel(), b_perm.numel()
    A = (_ptr(a_data), M, a_desc.shape[0], _ptr(a_desc), _ptr(a_sums), _ptr(a_perm), a_signed)
    B = (_ptr(b_data), N, b_desc.shape[0], _ptr(b_desc), _ptr(b_sums), _ptr(b_perm), b_signed)
    S = (_ptr(a_row_scale), _ptr(b_row_scale), _ptr(a_seg_scale), _ptr(b_seg_scale))
    return A, B, S


def mpgemm_packed_cpu(a_data, a_desc, a_sums, a_perm, a_signed, b_data, b_desc, b_sums, b_perm, b_signed, ksegs,
                      a_row_scale, b_row_scale, a_seg_scale, b_seg_scale, kind, b_layout=None):
    out = torch.empty(a_perm.numel(), b_perm.numel(), dtype=_KIND_DTYPE[kind])
    A, B, S = _operands(a_data, a_desc, a_sums, a_perm, a_signed, b_data, b_desc, b_sums, b_perm, b_signed,
                        a_row_scale, b_row_scale, a_seg_scale, b_seg_scale)
    _C.mpgemm(A, B, _ptr(ksegs), ksegs.shape[0], S, kind, out.data_ptr(), _ptr(b_layout))
    return out


def mpgemm_packed_cuda(a_data, a_desc, a_sums, a_perm, a_signed, b_data, b_desc, b_sums, b_perm, b_signed, ksegs,
                       a_row_scale, b_row_scale, a_seg_scale, b_seg_scale, kind, b_layout=None):
    """b_layout is a CPU execution layout: unused here."""
    out = torch.empty(a_perm.numel(), b_perm.numel(), dtype=_KIND_DTYPE[kind], device=a_data.device)
    a_desc, b_desc, ksegs = a_desc.cpu(), b_desc.cpu(), ksegs.cpu()  # a sync only if given on the device
    A, B, S = _operands(a_data, a_desc, a_sums, a_perm, a_signed, b_data, b_desc, b_sums, b_perm, b_signed,
                        a_row_scale, b_row_scale, a_seg_scale, b_seg_scale)
    nsegs = ksegs.shape[0]
    with torch.cuda.device(a_data.device):  # the kernels launch on the current device
        if _C.cuda_choose_kernel(A, B, _ptr(ksegs), nsegs) == "int8mm" and _int8mm.supported(ksegs):
            _int8mm.mpgemm_int8mm(a_data, a_desc, a_sums, a_perm, a_signed, b_data, b_desc, b_sums, b_perm,
                                  b_signed, ksegs, a_row_scale, b_row_scale, a_seg_scale, b_seg_scale, out)
            return out
        stream = torch.cuda.current_stream(a_data.device).cuda_stream
        _C.cuda_mpgemm(A, B, _ptr(ksegs), nsegs, S, kind, out.data_ptr(), stream)
    return out


register(mpgemm_packed, "cpu", mpgemm_packed_cpu, dispatched=_checked(mpgemm_packed_cpu))
register(mpgemm_packed, "cuda", mpgemm_packed_cuda, dispatched=_checked(mpgemm_packed_cuda))


@mpgemm_packed.register_fake
def _(a_data, a_desc, a_sums, a_perm, a_signed, b_data, b_desc, b_sums, b_perm, b_signed, ksegs,
      a_row_scale, b_row_scale, a_seg_scale, b_seg_scale, kind, b_layout=None):
    return a_data.new_empty((a_perm.shape[0], b_perm.shape[0]), dtype=_KIND_DTYPE[kind])


# ---- fused activation quantize + pack ------------------------------------------------
@torch.library.custom_op("soniq::quantize_pack_raw", mutates_args=())
def quantize_pack_raw(x: Tensor, k_perm: Tensor, segs: Tensor, seg_scale: Tensor, signed: bool,
                      row_words: int, noise: int = 0, seed: int = 0, nan_rows: bool = False,
                      dynamic: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x: float32 [M, K] on the CPU or a GPU; k_perm int64 [K]; segs int64 [S, 3] (klen, kw, bits);
    seg_scale float32 [S]; row_words = sum of bits * kw; noise 0 (round) or 1 (Philox noise of
    `seed`, then round). Returns (data int64 [M * row_words], sums int64 [M, S], rows): the
    blocks of ops.pack(ops.quantize(x, ...)) with one row group. A NaN in x raises, unless
    nan_rows: then rows (bool [M]) marks the rows holding one, with no check and no sync
    (the packed layers make those output rows NaN); else rows is empty. dynamic: per-token
    scales (cpp/actpack.h): row r is quantized with seg_scale * a_r, and the fourth output
    (float32 [M], else empty) holds a_r. soniq.ops.quantize_pack checks the layout; the
    kernels only what keeps them in bounds. The body runs only on a device type with no
    kernel (registered below)."""
    raise no_kernel(quantize_pack_raw, "soniq::quantize_pack_raw", x.device)


def _checked_quantize_pack_args(x: Tensor, k_perm: Tensor, segs: Tensor, seg_scale: Tensor, noise: int,
                                seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """What keeps every device's kernel in bounds; returns x, segs, seg_scale laid out for it."""
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"x must be a 2-D float32 tensor, got {x.dtype} {tuple(x.shape)} on {x.device}")
    K = x.shape[1]
    S = segs.shape[0]
    if (k_perm.dtype != torch.int64 or k_perm.shape != (K,) or segs.dtype != torch.int64 or segs.shape != (S, 3)
            or seg_scale.dtype != torch.float32 or seg_scale.shape != (S,)):
        raise ValueError("k_perm, segs, seg_scale must be int64 [K], int64 [S, 3], float32 [S]")
    if x.stride(1) != 1 and K > 1:
        x = x.contiguous()
    if noise not in (0, 1) or not 0 <= seed < 2**63:
        raise ValueError(f"noise must be 0 or 1 and seed in [0, 2**63), got noise={noise}, seed={seed}")
    return x, segs.contiguous(), seg_scale.contiguous()


@register(quantize_pack_raw, "cpu")
def quantize_pack_cpu(x, k_perm, segs, seg_scale, signed, row_words, noise=0, seed=0, nan_rows=False,
                      dynamic=False):
    """The native pass (cpp/actpack.cpp)."""
    x, segs, seg_scale = _checked_quantize_pack_args(x, k_perm, segs, seg_scale, noise, seed)
    M, K = x.shape
    S = segs.shape[0]
    k_perm = k_perm.contiguous()
    data = torch.empty(M * row_words, dtype=torch.int64)
    sums = torch.empty(M, S, dtype=torch.int64)
    rows = torch.empty(M if nan_rows else 0, dtype=torch.bool)
    rscale = torch.empty(M if dynamic else 0, dtype=torch.float32)
    _C.quantize_pack(x.data_ptr(), M, K, x.stride(0), k_perm.data_ptr(), segs.data_ptr(), S,
                     seg_scale.data_ptr(), signed, row_words, data.data_ptr(), sums.data_ptr(), noise, seed,
                     rows.data_ptr() if nan_rows else 0, rscale.data_ptr() if dynamic else 0)
    return data, sums, rows, rscale


def quantize_pack_cuda(x, k_perm, segs, seg_scale, signed, row_words, noise=0, seed=0, nan_rows=False,
                       dynamic=False):
    """The CUDA kernel (cuda/quantize_pack.cu): x and k_perm on the GPU, segs and seg_scale
    (the layout, read on the host) on the CPU. A NaN in x or a k_perm entry outside [0, K)
    raises after the kernel (one sync; skipped while a CUDA graph is being captured), unless
    nan_rows: then nothing syncs and the NaN rows are returned marked (k_perm comes from a
    checked ActPlan there), as a view of the kernel's flag buffer."""
    x, segs, seg_scale = _checked_quantize_pack_args(x, k_perm, segs, seg_scale, noise, seed)
    M, K = x.shape
    S = segs.shape[0]
    if segs.device.type != "cpu" or seg_scale.device.type != "cpu":
        raise ValueError("segs and seg_scale must be CPU tensors (the layout is read on the host)")
    dev = x.device
    k_perm = k_perm.to(dev).contiguous()
    data = torch.empty(M * row_words, dtype=torch.int64, device=dev)
    sums = torch.zeros(M, S, dtype=torch.int64, device=dev)
    flags = torch.zeros(1 + (M + 3) // 4 if nan_rows else 1, dtype=torch.int32, device=dev)  # one memset
    rows = flags[1:].view(torch.bool)[:M] if nan_rows else flags.new_empty(0, dtype=torch.bool)
    rscale = torch.empty(M if dynamic else 0, dtype=torch.float32, device=dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        _C.cuda_quantize_pack(x.data_ptr(), M, x.stride(0), k_perm.data_ptr(), K, segs.data_ptr(), S,
                              seg_scale.data_ptr(), signed, row_words, data.data_ptr(), sums.data_ptr(),
                              flags.data_ptr(), rows.data_ptr() if nan_rows else 0, noise, seed, stream,
                              rscale.data_ptr() if dynamic else 0)
        if not nan_rows and not torch.cuda.is_current_stream_capturing():
            f = int(flags.item())
            if f & 2:
                raise ValueError(f"k_perm must hold positions in [0, {K}), got {int(k_perm.min())}..{int(k_perm.max())}")
            if f & 1:
                r, k = (int(i) for i in torch.isnan(x).nonzero()[0].tolist())
                raise ValueError(f"x[{r}, {k}] is NaN: activations must not be NaN to be quantized")
    return data, sums, rows, rscale


def _quantize_pack_cuda_op(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """quantize_pack_cuda as the dispatcher runs it: an op's outputs must not be views."""
    data, sums, rows, rscale = quantize_pack_cuda(*args, **kwargs)
    return data, sums, rows.clone() if rows._base is not None else rows, rscale


register(quantize_pack_raw, "cuda", quantize_pack_cuda, dispatched=_quantize_pack_cuda_op)


@quantize_pack_raw.register_fake
def _(x, k_perm, segs, seg_scale, signed, row_words, noise=0, seed=0, nan_rows=False, dynamic=False):
    M = x.shape[0]
    return (x.new_empty((M * row_words,), dtype=torch.int64), x.new_empty((M, segs.shape[0]), dtype=torch.int64),
            x.new_empty((M if nan_rows else 0,), dtype=torch.bool),
            x.new_empty((M if dynamic else 0,), dtype=torch.float32))
