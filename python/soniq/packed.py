"""PackedTensor: an integer matrix with per-channel bits, stored as tier-grouped bit planes."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from . import _checks
from ._native import _C
from ._packed_check import validate_packed

LAYOUT = "bitplanes-v1"
_UNPACK_DTYPES = {"int8", "int16", "int32", "int64", "uint8"}
_LAYOUT_VERSION = 1                                        # LAYOUT as a number (metadata_tensor)
_META_DTYPES = ("int64", "int32", "int16", "int8", "uint8")  # index = code in metadata_tensor


@dataclass(frozen=True)
class KLayout:
    """How K is arranged: K columns are permuted (`perm[i]` = original column at position i)
    and cut into segments of uniform precision. Two operands of one mpgemm must share it."""

    perm: torch.Tensor       # int64 [K]
    seg_lens: tuple          # lengths of the K segments, in order

    def __post_init__(self):
        # a list / numpy array of integers is taken; anything else is a clear error here, not
        # an AttributeError (or a silently truncated float) later in pack
        p = self.perm
        if not isinstance(p, torch.Tensor):
            try:
                p = torch.as_tensor(np.asarray(p))
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"perm must be a 1-D integer tensor or array (a permutation of range(K)), "
                                 f"got {type(self.perm).__name__}") from None
        if p.dim() != 1 or p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
            raise ValueError(f"perm must be a 1-D integer tensor or array, got {p.dtype} of shape {tuple(p.shape)}")
        if p is not self.perm or p.dtype != torch.int64:  # (an int64 tensor, as soniq makes them, is
            p = p.to(torch.int64)                         # checked where it is used: pack validates)
            if not torch.equal(torch.sort(p.cpu()).values, torch.arange(p.numel())):
                raise ValueError(f"perm must be a permutation of range({p.numel()})")
        lens = self.seg_lens
        if (not isinstance(lens, (tuple, list)) or not lens
                or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in lens)):
            raise ValueError(f"seg_lens must be positive integer segment lengths, got {lens!r}")
        object.__setattr__(self, "perm", p)
        object.__setattr__(self, "seg_lens", tuple(int(n) for n in lens))

    @staticmethod
    def from_bits(*bits_along_k) -> "KLayout":
        """The layout grouping K by bit width -- by the tuple of widths when several operands
        (e.g. per-input-channel weights and activations) vary along K together."""
        raw = [torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b) for b in bits_along_k]
        for i, r in enumerate(raw):
            if r.dim() > 1 or r.dtype.is_floating_point and bool((r != r.round()).any()):
                raise ValueError(f"bits_along_k[{i}] must be a 1-D array of integer widths, got {r.dtype} "
                                 f"of shape {tuple(r.shape)}")
        cols = [r.to(torch.int64).reshape(-1) for r in raw]
        if not cols or any(c.numel() != cols[0].numel() for c in cols):
            raise ValueError("bits_along_k must be one or more 1-D arrays of the same length K")
        for i, c in enumerate(cols):
            if c.numel() == 0 or bool(((c < 1) | (c > 8)).any()):
                raise ValueError(f"bits_along_k[{i}] must hold widths in 1..8, got {c.tolist()[:8]}")
        key = torch.zeros_like(cols[0])
        for c in cols:  # lexicographic key over the widths (each in 1..8, so base 16)
            key = key * 16 + c
        perm = torch.sort(key, stable=True).indices
        _, counts = torch.unique_consecutive(key[perm], return_counts=True)
        return KLayout(perm, tuple(int(c) for c in counts.tolist()))

    def same_as(self, other: "KLayout") -> bool:
        return (self.seg_lens == other.seg_lens and self.perm.shape == other.perm.shape
                and bool(torch.equal(self.perm.cpu(), other.perm.cpu())))

    def describe(self) -> str:
        K = int(self.perm.numel())
        identity = bool(torch.equal(self.perm.cpu(), torch.arange(K)))
        return f"{'identity' if identity else 'permuted'} K={K}, segments {list(self.seg_lens)}"


# Layouts from this size on get their own 2 MiB-aligned mapping advised for transparent huge
# pages (cpp/layout_alloc.h): GEMV streams them from memory, and on 4 KiB pages each tile
# stream pays a TLB miss per 4 KiB (Zen 4, 2 threads, weights from DRAM: W4 14336x4096
# 1.55 -> 1.39 ms). Smaller ones stay ordinary tensors (they sit in cache).
HUGE_LAYOUT_BYTES = 4 << 20


def _layout_memory(nbytes: int) -> torch.Tensor:
    if nbytes < HUGE_LAYOUT_BYTES:
        return torch.empty(nbytes, dtype=torch.int8)
    return torch.frombuffer(_C.layout_alloc(nbytes), dtype=torch.int8)


class PackedTensor:
    """An integer matrix [R, K] packed for soniq.ops.mpgemm (see design.md section 3).

    Rows (axis=0, per-row bits as for weights) or K columns (axis=1, per-column bits as
    for activations) are grouped by bit width through a stored permutation, so the data
    is a grid of uniform-precision blocks (row groups x K segments), each stored as bit
    planes [bits][rows][ceil(klen/64)] of uint64 words (kept in an int64 tensor).
    Made by soniq.ops.pack; read back with soniq.ops.unpack.
    """

    def __init__(self, *, shape, axis, signed, bits, data, desc, sums, row_perm, k_perm, ksegs,
                 scale=None, dtype=torch.int64, kind="torch", layout=LAYOUT,
                 host_meta=None, seg_scale=None, k_layout_of=None, nan_rows=None, token_scale=None):
        self.shape = tuple(int(s) for s in shape)
        self.axis = int(axis)
        self.signed = bool(signed)
        self.bits = bits            # int64, one per channel along `axis`, original order
        self._data = data           # int64 words of all blocks, (group, segment) order (see .data)
        self.desc = desc            # int64 [G, 2 + S]: row_start, row_count, bits per segment
        self.sums = sums            # int64 [R, S]: code sums per packed row and K segment
        self.row_perm = row_perm    # int64 [R]: packed row -> original row
        self.k_perm = k_perm        # int64 [K]: packed K position -> original column
        self.ksegs = ksegs          # int64 [S, 2]: (klen, kw) per K segment
        self.scale = scale          # float32 along `axis`, or None
        self.dtype = dtype          # dtype unpack() returns
        self.kind = kind            # 'torch' or 'numpy': what the ops hand back
        self.layout = layout
        # Derived state a maker that knows it passes in (ops.quantize_pack's ActPlan), else
        # computed on first use. host_meta: CPU copies of (desc, ksegs, k_perm), so a GPU mpgemm
        # never synchronizes after its first call (the CUDA kernels take desc/ksegs by value;
        # needed for CUDA graph capture). seg_scale: the scale per K segment.
        if host_meta is None and all(t.device.type == "cpu" for t in (desc, ksegs, k_perm)):
            host_meta = (desc, ksegs, k_perm)
        self._host = host_meta
        self._seg_scale = seg_scale
        self._k_layout_of = k_layout_of  # the operand this one is known to share its K layout with
        self._nan_rows = nan_rows        # bool [M]: rows of the quantized input holding a NaN (ActPlan)
        # axis=1 operands from quantize_pack(dynamic="token"): float32 [R] per-row (token) scales,
        # applied by mpgemm as A's row scale; not part of the stored layout
        self.token_scale = token_scale
        self._exec = {}  # execution layouts by device kind (exec_layout), shared with with_scale copies

    # ---- properties -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.sums.device

    @property
    def data(self) -> torch.Tensor:
        """The bit planes (int64 words of all blocks, (group, segment) order). After
        release_planes() they are rebuilt from the execution layout on each access (saving,
        moving to another device, unpacking): exact, and not kept."""
        if self._data is not None:
            return self._data
        desc, ksegs, _ = self.host_meta()
        desc, ksegs = desc.contiguous(), ksegs.contiguous()
        words = int((desc[:, 1:2] * desc[:, 2:] * ksegs[:, 1]).sum())
        data = torch.empty(words, dtype=torch.int64)
        lay = self._exec["cpu"]
        _C.layout_to_planes(lay.data_ptr(), desc.data_ptr(), desc.shape[0], ksegs.data_ptr(), ksegs.shape[0],
                            data.data_ptr())
        return data

    @property
    def planes_resident(self) -> bool:
        return self._data is not None

    def release_planes(self) -> None:
        """Keeps one copy of the weight: its CPU execution layout (built here if needed); the
        bit planes are dropped and rebuilt from the layout when needed (see .data). Every
        block pair then runs on the layout kernels (every ISA has them). Refused (ValueError)
        off the CPU."""
        if self.device.type != "cpu":
            raise ValueError(f"release_planes: the tensor is on {self.device}; only CPU tensors have an "
                             "execution layout to keep instead of the bit planes")
        self.exec_layout()  # built from the planes before they go
        self._data = None

    def host_meta(self) -> tuple:
        """(desc, ksegs, k_perm) as CPU tensors; copied once from the device, then cached."""
        if self._host is None:
            self._host = (self.desc.cpu(), self.ksegs.cpu(), self.k_perm.cpu())
        return self._host

    @property
    def k_layout(self) -> KLayout:
        _, ksegs, k_perm = self.host_meta()
        return KLayout(k_perm, tuple(int(x) for x in ksegs[:, 0].tolist()))

    @property
    def nbytes(self) -> int:
        """Resident bytes: planes (if kept), metadata, scales and the execution layouts."""
        t = self._tensors(resident=True).values()
        return sum(v.numel() * v.element_size() for v in t if v is not None) + self.exec_nbytes

    @property
    def row_scale(self) -> torch.Tensor | None:
        """Scale per row (original order) when scales run along rows, or the per-token
        scales of a dynamically quantized activation operand."""
        return self.scale if self.axis == 0 else self.token_scale

    @property
    def seg_scale(self) -> torch.Tensor | None:
        """Scale per K segment when scales run along K (constant within a segment)."""
        if self.axis != 1 or self.scale is None:
            return None
        if self._seg_scale is None:
            _, ksegs, k_perm = self.host_meta()
            starts = torch.cumsum(ksegs[:, 0], 0) - ksegs[:, 0]
            self._seg_scale = self.scale[k_perm[starts].to(self.scale.device)].contiguous()
        return self._seg_scale

    def exec_layout(self) -> torch.Tensor | None:
        """The CPU execution layout of this operand as the B side of mpgemm (cpp/wlayout.h:
        tiles of 16 rows in VNNI group order, codes at their bit width; the same on every ISA),
        built once and cached; None off the CPU. Packed modules build it when made."""
        lay = self._exec.get("cpu")
        if lay is not None or torch.compiler.is_compiling():  # traced: the layout built with the module
            return lay
        if self.device.type != "cpu":
            return None
        desc, ksegs, _ = self.host_meta()
        desc, ksegs = desc.contiguous(), ksegs.contiguous()
        nbytes = _C.layout_nbytes(desc.data_ptr(), desc.shape[0], ksegs.data_ptr(), ksegs.shape[0])
        lay = _layout_memory(nbytes)
        data = self._data.contiguous()
        _C.layout_build(data.data_ptr(), self.shape[0], desc.shape[0], desc.data_ptr(), ksegs.data_ptr(),
                        ksegs.shape[0], lay.data_ptr())
        self._exec["cpu"] = lay
        return lay

    @property
    def exec_nbytes(self) -> int:
        """Resident bytes of the cached execution layouts (0 when none is built)."""
        return sum(t.numel() * t.element_size() for t in self._exec.values())

    def bit_histogram(self) -> dict:
        vals, counts = torch.unique(self.bits.cpu(), return_counts=True)
        return {int(v): int(c) for v, c in zip(vals.tolist(), counts.tolist())}

    # ---- movement ---------------------------------------------------------------------
    def _tensors(self, resident: bool = False) -> dict:
        return {"data": self._data if resident else self.data, "desc": self.desc, "sums": self.sums,
                "row_perm": self.row_perm, "k_perm": self.k_perm, "ksegs": self.ksegs, "bits": self.bits, "scale": self.scale}

    def to(self, device) -> "PackedTensor":
        """Moves every buffer to `device` (no repacking: the layout is device-independent)."""
        if isinstance(device, torch.dtype) or not isinstance(device, (str, int, torch.device)):
            raise TypeError(f"PackedTensor.to moves to a device (a str, int or torch.device); its integer words have "
                            f"no other dtype, got {device!r}")
        host = self.host_meta()
        moved = {k: (v.to(device) if v is not None else None) for k, v in self._tensors().items()}
        return PackedTensor(shape=self.shape, axis=self.axis, signed=self.signed, dtype=self.dtype,
                            kind=self.kind, layout=self.layout, host_meta=host,
                            token_scale=None if self.token_scale is None else self.token_scale.to(device), **moved)

    def with_scale(self, scale: "torch.Tensor | None") -> "PackedTensor":
        """The same packed data with another scale (None: plain integer operand): a positive
        float or one per channel, checked as pack(scale=) checks it."""
        scale = _checks.scale_vector(scale, (self.shape[0], self.shape[1])[self.axis], "scale", self.device)
        if scale is not None and self.axis == 1:  # the kernels take one scale per K segment
            _, ksegs, k_perm = self.host_meta()
            _checks.check_constant_per_segment(scale, k_perm, ksegs[:, 0].tolist(), "scale")
        pt = PackedTensor(shape=self.shape, axis=self.axis, signed=self.signed, dtype=self.dtype,
                          kind=self.kind, layout=self.layout, scale=scale, host_meta=self._host,
                          token_scale=None if scale is None else self.token_scale,  # per-token scales stay
                          **{k: v for k, v in self._tensors(resident=True).items() if k != "scale"})
        pt._exec = self._exec  # the same words: the same layouts
        return pt

    def cuda(self, device=None) -> "PackedTensor":
        return self.to(device if device is not None else "cuda")

    def cpu(self) -> "PackedTensor":
        return self.to("cpu")

    # ---- serialization (soniq.save uses this) -------------------------------------------
    def state_dict(self) -> dict:
        return {k: v for k, v in self._tensors().items() if v is not None}

    def metadata(self) -> dict:
        return {"shape": list(self.shape), "axis": self.axis, "signed": self.signed,
                "dtype": str(self.dtype).replace("torch.", ""), "layout": self.layout}

    def metadata_tensor(self) -> torch.Tensor:
        """metadata() as int64 [layout version, R, K, axis, signed, dtype index]: a module's
        state_dict holds only tensors, so safetensors and torch.save both keep it."""
        return torch.tensor([_LAYOUT_VERSION, *self.shape, self.axis, int(self.signed),
                             _META_DTYPES.index(str(self.dtype).replace("torch.", ""))], dtype=torch.int64)

    @staticmethod
    def metadata_from_tensor(t) -> dict:
        """Inverse of metadata_tensor(); a malformed tensor raises ValueError."""
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (6,):
            raise ValueError(f"packed metadata must be an int64 tensor of 6 entries, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        ver, R, K, axis, signed, dt = t.tolist()
        if ver != _LAYOUT_VERSION:
            raise ValueError(f"unsupported packed layout version {ver}; this soniq reads {_LAYOUT_VERSION} ({LAYOUT})")
        if signed not in (0, 1) or not 0 <= dt < len(_META_DTYPES):
            raise ValueError(f"packed metadata malformed: signed={signed}, dtype index={dt}")
        return {"shape": [R, K], "axis": axis, "signed": bool(signed), "dtype": _META_DTYPES[dt], "layout": LAYOUT}

    @classmethod
    def from_state_dict(cls, tensors: dict, meta: dict) -> "PackedTensor":
        if not isinstance(meta, dict) or meta.get("layout") != LAYOUT:
            got = meta.get("layout") if isinstance(meta, dict) else meta
            raise ValueError(f"unsupported packed layout {got!r}; this soniq reads {LAYOUT!r}")
        # untrusted input: every malformed field ends in a ValueError naming it
        need = ("data", "desc", "sums", "row_perm", "k_perm", "ksegs", "bits")
        missing = [k for k in need if not isinstance(tensors, dict) or k not in tensors]
        missing += [k for k in ("shape", "axis", "signed", "dtype") if k not in meta]
        if missing:
            raise ValueError(f"packed tensor is missing {missing}")
        shape, dt = meta["shape"], meta["dtype"]
        if (not isinstance(shape, (list, tuple)) or len(shape) != 2
                or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape)):
            raise ValueError(f"packed tensor shape must be two ints, got {shape!r}")
        if meta["axis"] not in (0, 1) or isinstance(meta["axis"], bool) or meta["signed"] not in (True, False):
            raise ValueError(f"packed tensor axis/signed malformed: {meta['axis']!r}, {meta['signed']!r}")
        if dt not in _UNPACK_DTYPES:
            raise ValueError(f"packed tensor dtype must be one of {sorted(_UNPACK_DTYPES)}, got {dt!r}")
        pt = cls(shape=shape, axis=meta["axis"], signed=meta["signed"],
                 dtype=getattr(torch, dt), scale=tensors.get("scale"), **{k: tensors[k] for k in need})
        validate_packed(pt, "tensors")
        return pt

    # ---- display ---------------------------------------------------------------------
    def __repr__(self) -> str:
        along = "per row" if self.axis == 0 else "per K column"
        hist = ", ".join(f"{b}b: {n}" for b, n in sorted(self.bit_histogram().items()))
        if self.scale is None:
            sc = "none"
        else:
            sc = "per row" if self.axis == 0 else "per K segment"
        kb = self.nbytes / 1024
        return (f"soniq.PackedTensor(shape={self.shape}, bits {along} {{{hist}}}, "
                f"signed={self.signed}, scale={sc}, K segments={[int(x) for x in self.ksegs[:, 0].tolist()]}, "
                f"layout={self.layout}, device={self.device}, {kb:.1f} KiB)")
