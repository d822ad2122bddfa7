"""Bit-plane packing of one uniform block: the ops soniq::pack_block / soniq::unpack_block
(native kernels on the CPU; the pure-torch reference, which the native kernels are tested
against, on every other device). A leaf module (torch, soniq._C and the kernel table), so the
ops and the validation of loaded tensors share it."""
from __future__ import annotations

import torch
from torch import Tensor

from ._op_kernels import register
from ._native import _C


def pack_block_torch(codes: Tensor, bits: int, kw: int) -> Tensor:
    """Pure-torch packing (any device); the native kernel is checked against it."""
    rows, klen = codes.shape
    padded = torch.zeros(rows, kw * 64, dtype=torch.int64, device=codes.device)
    padded[:, :klen] = codes.to(torch.int64)
    padded = padded.view(rows, kw, 64)
    shifts = torch.arange(64, device=codes.device, dtype=torch.int64)
    # each word is a sum of distinct powers of two, i.e. their OR (bit 63 wraps to the sign)
    planes = [(((padded >> p) & 1) << shifts).sum(-1) for p in range(bits)]
    return torch.stack(planes).reshape(-1)


def unpack_block_torch(planes: Tensor, bits: int, rows: int, klen: int, kw: int) -> Tensor:
    shifts = torch.arange(64, device=planes.device, dtype=torch.int64)
    words = planes.view(bits, rows, kw, 1)
    bitv = (words >> shifts) & 1  # [bits, rows, kw, 64]
    weights = (1 << torch.arange(bits, device=planes.device, dtype=torch.int64)).view(bits, 1, 1, 1)
    codes = (bitv * weights).sum(0).reshape(rows, kw * 64)[:, :klen]
    return codes.to(torch.uint8).contiguous()


def _check_block(op: str, ok: bool, msg: str) -> None:
    """What keeps the native kernels in bounds when the op is called directly."""
    if not ok:
        raise ValueError(f"soniq::{op}: {msg}")


@torch.library.custom_op("soniq::pack_block", mutates_args=())
def pack_block(codes: Tensor, bits: int, kw: int) -> Tensor:
    """codes: uint8 [rows, klen] (< 2**bits) -> int64 words [bits * rows * kw] (bit planes).
    A device type without a kernel of its own runs the torch reference."""
    return pack_block_torch(codes, bits, kw)


@register(pack_block, "cpu")
def pack_block_cpu(codes: Tensor, bits: int, kw: int) -> Tensor:
    _check_block("pack_block", codes.dtype == torch.uint8 and codes.dim() == 2, "codes must be uint8 [rows, klen]")
    rows, klen = codes.shape
    _check_block("pack_block", 1 <= bits <= 8 and 0 <= klen <= kw * 64, f"bits {bits} / kw {kw} for klen {klen}")
    codes = codes.contiguous()
    out = torch.empty(bits * rows * kw, dtype=torch.int64)
    _C.pack_block(codes.data_ptr(), rows, klen, klen, bits, kw, out.data_ptr())
    return out


@pack_block.register_fake
def _(codes, bits, kw):
    return codes.new_empty((bits * codes.shape[0] * kw,), dtype=torch.int64)


@torch.library.custom_op("soniq::unpack_block", mutates_args=())
def unpack_block(planes: Tensor, bits: int, rows: int, klen: int, kw: int) -> Tensor:
    """Inverse of pack_block: int64 words -> uint8 codes [rows, klen]. A device type without
    a kernel of its own runs the torch reference."""
    return unpack_block_torch(planes, bits, rows, klen, kw)


@register(unpack_block, "cpu")
def unpack_block_cpu(planes: Tensor, bits: int, rows: int, klen: int, kw: int) -> Tensor:
    _check_block("unpack_block", 1 <= bits <= 8 and rows >= 0 and 0 <= klen <= kw * 64,
                 f"bits {bits} / rows {rows} / klen {klen} / kw {kw}")
    _check_block("unpack_block", planes.dtype == torch.int64 and planes.numel() >= bits * rows * kw,
                 f"planes must be int64 with {bits} x {rows} x {kw} words, got {planes.dtype} with {planes.numel()}")
    planes = planes.contiguous()
    out = torch.empty(rows, klen, dtype=torch.uint8)
    _C.unpack_block(planes.data_ptr(), rows, klen, bits, kw, out.data_ptr(), klen)
    return out


@unpack_block.register_fake
def _(planes, bits, rows, klen, kw):
    return planes.new_empty((rows, klen), dtype=torch.uint8)
