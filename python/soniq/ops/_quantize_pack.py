"""soniq.ops.quantize_pack: float activations -> PackedTensor in one native pass (issue #4).

Equal, word for word, to ops.pack(ops.quantize(x, scale, bits, signed=..., axis=1,
values_only=True).to(torch.int64), bits, signed=..., axis=1, scale=scale, k_layout=...):
same rounding (round half to even, clamped), same K permutation, planes and code sums.
With noise="uniform" the codes are ops.quantize(x, ..., noise="uniform", seed=seed)'s noisy
values rounded the same way (stochastic rounding with the same Philox draws).
The layout checks run once per ActPlan, so the packed modules pay them once per layer.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _checks as C
from .._op_kernels import eager_kernel
from ..packed import KLayout, PackedTensor
from . import _library
from ._pack import _check_k_layout
from ._quantize import NOISE_MODES, resolve_seed

_SAME = object()


class ActPlan:
    """A checked activation layout: bits and scales per K column, the K permutation and
    its segments. Calling it with float32 rows [M, K] quantizes and packs them."""

    def __init__(self, bits: Tensor, scale: Tensor, signed: bool, kl: KLayout, out_scale: Tensor | None,
                 layout_of: PackedTensor | None = None, dynamic: bool = False):
        self.K, self.signed, self.bits, self.out_scale = int(bits.numel()), signed, bits, out_scale
        self.dynamic = bool(dynamic)  # per-token scales: row r uses scale * a_r (cpp/actpack.h)
        self.layout_of = layout_of  # the operand whose K layout this plan was checked against
        self.k_perm = kl.perm.contiguous()
        # numpy for the small per-layer vectors: torch's advanced indexing starts an OpenMP
        # region that costs milliseconds on a busy machine
        first = self.k_perm.numpy()[np.concatenate([[0], np.cumsum(kl.seg_lens)[:-1]]).astype(np.int64)]
        self.seg_bits = [int(b) for b in bits.numpy()[first]]
        kws = [(n + 63) // 64 for n in kl.seg_lens]
        self.segs = torch.tensor([[n, w, b] for n, w, b in zip(kl.seg_lens, kws, self.seg_bits)], dtype=torch.int64)
        self.ksegs = self.segs[:, :2].contiguous()
        self.seg_scale = torch.from_numpy(scale.numpy()[first].copy())
        self.out_seg_scale = None if out_scale is None else torch.from_numpy(out_scale.numpy()[first].copy())
        self.row_words = sum(b * w for b, w in zip(self.seg_bits, kws))
        self._devices = {}  # device -> the layout tensors there
        self._rows = {}     # (M, device) -> desc on the host, desc and row_perm on the device

    def _on(self, device: torch.device) -> dict:
        got = self._devices.get(device)
        if got is None:  # .to() of a tensor already there returns it
            mv = lambda t: None if t is None else t.to(device)  # noqa: E731
            got = self._devices[device] = {
                "k_perm": mv(self.k_perm), "ksegs": mv(self.ksegs), "bits": mv(self.bits),
                "out_scale": mv(self.out_scale), "out_seg_scale": mv(self.out_seg_scale)}
        return got

    def _rows_meta(self, M: int, device: torch.device) -> tuple:
        """desc and row_perm depend on M only; kept per (M, device), so a CUDA graph captured
        for several batch sizes after a warm-up copies nothing from the host."""
        got = self._rows.get((M, device))
        if got is None:
            if len(self._rows) >= 64:
                self._rows.clear()
            desc = torch.tensor([[0, M] + self.seg_bits], dtype=torch.int64)
            got = self._rows[(M, device)] = (desc, desc.to(device), torch.arange(M, device=device))
        return got

    def __call__(self, x: Tensor, kind: str = "torch", noise: int = 0, seed: int = 0,
                 nan_rows: bool = False) -> PackedTensor:
        """noise: 0 (round to nearest) or 1 (Philox noise of `seed`, then round). A NaN in x
        raises, unless nan_rows: then the result's `_nan_rows` (bool [M]) marks the rows
        holding one, found without a host sync (the packed layers make those outputs NaN);
        None on the CPU when no row does (known there at no cost: the layer skips the fill,
        an OpenMP region that fights soniq's own pool for the cores)."""
        M = x.shape[0]
        if x.requires_grad:  # not differentiable (as ops.quantize): the kernel reads the values only
            x = x.detach()
        dev = self._on(x.device)  # the layout tensors on x's device (cached)
        args = (x, dev["k_perm"], self.segs, self.seg_scale, self.signed, self.row_words, noise, seed, nan_rows,
                self.dynamic)
        if type(x) is Tensor and not torch.compiler.is_compiling():
            # eager: the device's kernel straight from the op's table (skips ~15 us of op dispatch)
            data, sums, rows, rscale = eager_kernel(_library.quantize_pack_raw, x.device)(*args)
            if nan_rows and x.device.type == "cpu" and not bool(rows.any()):
                nan_rows = False
        else:  # tracing (dynamo, fake tensors): the registered op, opaque with its fake kernel
            data, sums, rows, rscale = torch.ops.soniq.quantize_pack_raw(*args)
        desc, desc_d, row_perm_d = self._rows_meta(M, x.device)
        # host_meta: the CPU copies (a GPU mpgemm needs no sync); seg_scale known already (mpgemm
        # need not gather it); k_layout_of: mpgemm against that operand skips the layout comparison;
        # token_scale: per-token scales (dynamic), mpgemm's row scale of A unless an integer operand
        pt = PackedTensor(shape=(M, self.K), axis=1, signed=self.signed, bits=dev["bits"], data=data,
                          desc=desc_d, sums=sums, row_perm=row_perm_d, k_perm=dev["k_perm"], ksegs=dev["ksegs"],
                          scale=dev["out_scale"], dtype=torch.int64, kind=kind,
                          host_meta=(desc, self.ksegs, self.k_perm), seg_scale=dev["out_seg_scale"],
                          k_layout_of=self.layout_of, nan_rows=rows if nan_rows else None,
                          token_scale=rscale if self.dynamic and self.out_scale is not None else None)
        return pt


def make_plan(bits, scale, K: int, *, signed: bool, k_layout=None, out_scale=_SAME, dynamic: bool = False) -> ActPlan:
    """Checks bits/scale/k_layout for K columns (messages name the argument). out_scale is
    the scale the PackedTensor carries (default: `scale`; None for integer operands).
    dynamic: per-token scales (see quantize_pack)."""
    if not isinstance(dynamic, (bool, np.bool_)):
        raise TypeError(f"dynamic must be a bool, got {type(dynamic).__name__}")
    if not isinstance(signed, (bool, np.bool_)):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    if scale is None:
        raise TypeError("scale must be a positive float or one per K column (quantize_pack quantizes with it), got None")
    bits_v = C.bits_vector(bits, K, "bits", "cpu")
    scale_v = C.scale_vector(scale, K, "scale", "cpu")
    C.check_inverse(scale_v, "scale")  # float32: the inverse the kernels multiply by
    out_v = scale_v if out_scale is _SAME else C.scale_vector(out_scale, K, "out_scale", "cpu")
    if k_layout is not None:
        kl = _check_k_layout(k_layout, K, "cpu")
    else:  # tiers grouped, low first, stable (as ops.pack's axis=1 default)
        perm = np.argsort(bits_v.numpy(), kind="stable")
        _, counts = np.unique(bits_v.numpy()[perm], return_counts=True)
        kl = KLayout(torch.from_numpy(perm.astype(np.int64)), tuple(int(c) for c in counts))
    lens = np.asarray(kl.seg_lens)
    first = np.repeat(np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)  # each position's segment start
    perm_np = kl.perm.numpy()
    kb = bits_v.numpy()[perm_np]
    if not np.array_equal(kb, kb[first]):
        raise ValueError("k_layout does not match bits: each K segment must hold a single bit width")
    for name, v in (("scale", scale_v), ("out_scale", None if out_v is None or out_v is scale_v else out_v)):
        if v is not None:
            C.check_constant_per_segment(v, kl.perm, kl.seg_lens, name)
    return ActPlan(bits_v, scale_v, bool(signed), kl, out_v,
                   layout_of=k_layout if isinstance(k_layout, PackedTensor) else None, dynamic=bool(dynamic))


def _as_float32_rows(x, name: str = "x") -> tuple[Tensor, str]:
    if isinstance(x, np.ndarray):
        if x.dtype != np.float32:
            raise TypeError(f"{name} must be float32, got numpy {x.dtype} (convert with x.astype(np.float32))")
        if any(s < 0 or s % 4 for s in x.strides):  # torch.from_numpy cannot view these
            x = np.ascontiguousarray(x)
        t, kind = torch.from_numpy(x), "numpy"
    elif isinstance(x, Tensor):
        if x.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {x.dtype} (convert with x.float(); "
                            "quantize_pack rounds in float32 like ops.quantize on float32)")
        t, kind = x.detach(), "torch"
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, K], got {t.dim()}-D with shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    return t, kind


def quantize_pack(x, scale, bits, *, signed: bool, k_layout=None, noise: str = "none", seed=None,
                  dynamic: str | None = None) -> PackedTensor:
    """Quantizes float32 activations x [M, K] per K column and packs them (axis=1) in one pass.

    scale: positive float or one per K column, constant within each bit width (K segment);
    bits: int in 1..8 or one per K column; signed: design.md encodings (signed 1-bit is
    {-1, +1}); k_layout: a KLayout or PackedTensor whose K layout to use (e.g. the weights',
    from KLayout.from_bits), else K columns are grouped by bit width. noise: "none" rounds
    to the nearest level; "uniform" adds ops.quantize's Philox noise of one step for `seed`
    (None: drawn from torch's generator) before rounding, i.e. stochastic rounding, the same
    codes on the CPU and CUDA. Values beyond the range clamp; NaN raises. Returns the
    PackedTensor ops.pack would (with scale attached).

    dynamic="token": per-token scales. Row r's scale a_r is its largest finite |x| (NaN and
    +-inf skipped), and the row is quantized with the float32 scale `scale * a_r` (float32
    inverse 1 / (scale * a_r)): `scale` is then relative to the row's range (e.g. 1/127 for
    signed 8-bit). A row of zeros, or one whose scale or inverse would be 0 or inf, gets
    a_r = 1. The result's `token_scale` (float32 [M]) holds a_r; mpgemm multiplies row r of
    its output by it. soniq.qat.dynamic_codes computes the same codes in torch.
    """
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {sorted(NOISE_MODES)}, got {noise!r}")
    if dynamic not in (None, "token"):
        raise ValueError(f"dynamic must be None (static scales) or 'token' (one scale per row), got {dynamic!r}")
    mode = NOISE_MODES[noise]
    seed = resolve_seed(seed) if mode else 0
    t, kind = _as_float32_rows(x)
    plan = make_plan(bits, scale, t.shape[1], signed=signed, k_layout=k_layout, dynamic=dynamic == "token")
    return plan(t, kind, mode, seed)  # CPU kernel, or the CUDA one (cuda/quantize_pack.cu) for a CUDA x
