"""Bit-plane packing of one uniform block: the pure-torch reference (any device) the native
kernels are tested against, and unpacking as the ops run it (native on the CPU). A leaf
module (torch and soniq._C only), so the ops and the validation of loaded tensors share it."""
from __future__ import annotations

import torch
from torch import Tensor

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


def unpack_block_impl(planes: Tensor, bits: int, rows: int, klen: int, kw: int) -> Tensor:
    """int64 words -> uint8 codes [rows, klen]: the native kernel on the CPU, the torch
    reference elsewhere (the body of the soniq::unpack_block op)."""
    if planes.device.type != "cpu":
        return unpack_block_torch(planes, bits, rows, klen, kw)
    planes = planes.contiguous()
    out = torch.empty(rows, klen, dtype=torch.uint8)
    _C.unpack_block(planes.data_ptr(), rows, klen, bits, kw, out.data_ptr(), klen)
    return out
