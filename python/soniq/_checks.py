"""Argument checking shared by the ops: every message names the argument and what was expected."""
from __future__ import annotations

import math

import numpy as np
import torch

from ._native import _C

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT_DTYPES = {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8}


def as_int_tensor(x, name: str) -> tuple[torch.Tensor, str]:
    """Returns (contiguous int64-safe torch tensor, 'numpy'|'torch'). Accepts numpy or torch."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iu":
            raise TypeError(f"{name} must have an integer dtype, got numpy {x.dtype}"
                            + (" (quantize floats first, e.g. with soniq.ops.quantize)" if x.dtype.kind == "f" else ""))
        # a private, aligned, C-contiguous copy: user memory never reaches native code.
        # Copy before scanning: a huge broadcast view fails here at once instead of hanging.
        x = np.array(x, order="C", copy=True)
        if x.dtype.kind == "u" and x.dtype.itemsize >= 8 and x.size and x.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name} holds values above 2**63-1, out of range for any bit width")
        return torch.from_numpy(x.astype(np.int64, copy=False)), "numpy"
    if isinstance(x, torch.Tensor):
        if x.dtype not in _INT_DTYPES:
            hint = " (quantize floats first, e.g. with soniq.ops.quantize)" if x.is_floating_point() else ""
            if x.dtype == torch.bool:
                hint = " (convert with .to(torch.uint8) for 0/1 codes)"
            raise TypeError(f"{name} must have an integer dtype (int8/16/32/64 or uint8), got {x.dtype}{hint}")
        try:
            return x.contiguous(), "torch"
        except RuntimeError as e:  # e.g. a huge expanded view: report it as what it is
            if "alloc" not in str(e):
                raise
            raise MemoryError(f"{name} of shape {tuple(x.shape)} does not fit in memory: {e}") from None
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def check_2d_nonempty(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, K], got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")


def bits_vector(bits, length: int, name: str, device) -> torch.Tensor:
    """Bit widths as an int64 vector of `length`, each in 1..8."""
    if isinstance(bits, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int in 1..8 or a 1-D integer array, got bool")
    if isinstance(bits, (int, np.integer)):
        b = int(bits)
        if not 1 <= b <= 8:
            raise ValueError(f"{name} must be in 1..8, got {b}")
        return torch.full((length,), b, dtype=torch.int64, device=device)
    if isinstance(bits, (list, tuple)):
        bits = np.asarray(bits)
    if isinstance(bits, np.ndarray):
        if bits.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {bits.dtype}")
        bits = torch.from_numpy(bits.astype(np.int64))
    if not isinstance(bits, torch.Tensor):
        raise TypeError(f"{name} must be an int or a 1-D integer tensor/array, got {type(bits).__name__}")
    if bits.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must hold integers, got dtype {bits.dtype}")
    if bits.dim() != 1 or bits.numel() != length:
        raise ValueError(f"{name} must be 1-D with {length} entries (one per channel), got shape {tuple(bits.shape)}")
    bits = bits.to(device=device, dtype=torch.int64)
    bad = (bits < 1) | (bits > 8)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {int(bits[i])}: bit widths must be in 1..8")
    return bits.contiguous()


# The b-bit code encoding from its one definition, cpp/code_encoding.h (the C++ and CUDA kernels
# compile the same function): value = alpha * code + offset, values lo..hi.
# ENCODING[signed][bits] = (alpha, offset, lo, hi) for bits 1..8.
ENCODING = {s: {b: tuple(_C.code_encoding(b, s)) for b in range(1, 9)} for s in (False, True)}
# the same as int64 [4, 9] tables (column = bits; column 0 unused) for per-channel lookups
_ENCODING_TABLE = {s: torch.tensor([(0, 0, 0, 0)] + [ENCODING[s][b] for b in range(1, 9)], dtype=torch.int64).T
                   .contiguous() for s in (False, True)}
_ENCODING_ON = {}  # (signed, device) -> the table there


def encoding_of(bits: torch.Tensor, signed: bool) -> torch.Tensor:
    """int64 [4, C]: (alpha, offset, lo, hi) of each channel's bits (int64 in 1..8)."""
    signed = bool(signed)
    table = _ENCODING_TABLE[signed]
    if bits.device != table.device:
        key = (signed, bits.device)
        table = _ENCODING_ON.get(key)
        if table is None:
            table = _ENCODING_ON[key] = _ENCODING_TABLE[signed].to(bits.device)
    return table.index_select(1, bits)


def value_range(bits: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive [lo, hi] of each channel's values (signed 1-bit: {-1, +1})."""
    enc = encoding_of(bits, signed)
    return enc[2], enc[3]


def code_affine(bits: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, offset) with value = alpha * code + offset (design.md section 2)."""
    enc = encoding_of(bits, signed)
    return enc[0], enc[1]


def max_abs_value(bits: int, signed: bool) -> int:
    _, _, lo, hi = ENCODING[bool(signed)][bits]
    return max(-lo, hi)


def scale_vector(scale, length: int, name: str, device) -> torch.Tensor | None:
    """None, a positive finite scalar, or a 1-D float vector of `length` -> float32 vector."""
    if scale is None:
        return None
    if isinstance(scale, (int, float, np.floating, np.integer)) and not isinstance(scale, bool):
        v = float(scale)
        if not (math.isfinite(v) and 0 < v <= _FLOAT32_MAX):
            raise ValueError(f"{name} = {v!r}: scales must be finite, > 0 and fit float32")
        s = torch.full((length,), v, dtype=torch.float32, device=device)
    else:
        if isinstance(scale, (list, tuple)):
            scale = np.asarray(scale)
        if isinstance(scale, np.ndarray):
            if scale.dtype.kind not in "fiu":
                raise TypeError(f"{name} must hold floats, got dtype {scale.dtype}")
            scale = torch.from_numpy(np.array(scale, dtype=np.float64))  # float32 cast checked below
        if not isinstance(scale, torch.Tensor):
            raise TypeError(f"{name} must be None, a float or a 1-D float tensor/array, got {type(scale).__name__}")
        if scale.dim() == 0:
            scale = scale.reshape(1).expand(length)
        if scale.dim() != 1 or scale.numel() != length:
            raise ValueError(f"{name} must be a scalar or 1-D with {length} entries, got shape {tuple(scale.shape)}")
        s = scale.detach().to(device=device, dtype=torch.float32).contiguous()
    check_scales(s, name)
    return s


def check_inverse(s: torch.Tensor, name: str) -> None:
    """The inverse the kernels multiply by (1 / s, in s's dtype) must be finite."""
    inv = torch.ones_like(s) / s
    if not bool(torch.isfinite(inv).all()):
        i = int((~torch.isfinite(inv)).nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {float(s[i])!r} is too small: its {str(s.dtype)[6:]} inverse overflows")


def check_constant_per_segment(v: torch.Tensor, perm: torch.Tensor, seg_lens, name: str) -> None:
    """Values along K (v, original column order) must be one per K segment of the layout (perm,
    seg_lens): the kernels factor a scale out of each segment's products."""
    vk = v.cpu()[perm.cpu()]
    lens = torch.as_tensor(tuple(seg_lens), dtype=torch.int64)
    if not torch.equal(vk, vk[torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)]):
        raise ValueError(f"{name} along K must be constant within each K segment (bit width); "
                         "fold per-column scales into the other operand instead")


def check_scales(s: torch.Tensor, name: str) -> None:
    """Every entry of a scale vector must be finite and > 0."""
    bad = ~torch.isfinite(s) | (s <= 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {float(s[i])}: scales must be finite and > 0")
