"""soniq.ops.quantize: the per-channel quantizer (exact rounding, or Philox noise of one step).

Math (design.md sections 1-2). Per channel c with scale s_c and bits b_c, t = x * (1/s_c):
  exact:   v = clamp(round_half_even(t), lo, hi)   (signed 1-bit: v = 2*round((t+1)/2) - 1)
  uniform: v = clamp(t + alpha * (u - 1/2), lo, hi), u ~ U[0, 1) from Philox4x32-10 keyed by
           (seed, flat element index), so CPU, CUDA and the torch reference agree bit for bit.
  out = v * s_c (fake-quantized), or v (values_only=True).
Levels: unsigned [0, 2^b - 1]; signed [-2^(b-1), 2^(b-1) - 1]; signed 1-bit {-1, +1}
(alpha = 2: the grid step is 2). Noise mode takes real-valued bits in [1, 8] and extends
the bounds continuously (signed 1 <= b < 2: hi = 1, alpha = 2^(2-b)).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._checks import check_inverse, check_scales
from .._native import _C
from .._op_kernels import no_kernel, register

NOISE_MODES = {"none": 0, "uniform": 1}
_M32 = 0xFFFFFFFF


# ---- level bounds (differentiable in bits: used by the autograd layer too) ---------------
def level_bounds(bits: Tensor, signed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(lo, hi, alpha) of each channel's integer grid for (possibly real-valued) bits."""
    two = torch.full_like(bits, 2.0)
    if not signed:
        return torch.zeros_like(bits), torch.pow(two, bits) - 1, torch.ones_like(bits)
    lo = -torch.pow(two, bits - 1)
    hi = torch.where(bits >= 2, torch.pow(two, bits - 1) - 1, torch.ones_like(bits))
    alpha = torch.where(bits >= 2, torch.ones_like(bits), torch.pow(two, 2 - bits.clamp(max=2)))
    return lo, hi, alpha


# ---- pure-torch reference (any device; the native kernels are tested equal to it) --------
def philox_bits_torch(n: int, seed: int, device=None) -> Tensor:
    """32 random bits per element index 0..n-1 (int64 holding uint32), Philox4x32-10."""
    blocks = (n + 3) // 4
    ctr = torch.arange(blocks, dtype=torch.int64, device=device)
    c = [ctr & _M32, (ctr >> 32) & _M32, torch.zeros_like(ctr), torch.zeros_like(ctr)]
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        p0 = c[0] * 0xD2511F53  # wraps mod 2^64 like uint64; >> then & recovers the high word
        p1 = c[2] * 0xCD9E8D57
        c = [((p1 >> 32) & _M32) ^ c[1] ^ k0, p1 & _M32, ((p0 >> 32) & _M32) ^ c[3] ^ k1, p0 & _M32]
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return torch.stack(c, 1).reshape(-1)[:n]


def philox_uniform_torch(n: int, seed: int, dtype=torch.float32, device=None) -> Tensor:
    return (philox_bits_torch(n, seed, device) >> 8).to(dtype) * (1.0 / 16777216.0)


def quantize_reference(x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, alpha: Tensor, axis: int,
                       noise: int, seed: int, values_only: bool) -> Tensor:
    shape = [1] * x.dim()
    shape[axis] = -1
    s, lo, hi, al = (t.view(shape) for t in (scale, lo, hi, alpha))
    t = x * torch.div(torch.ones_like(s), s)
    if noise:
        u = philox_uniform_torch(x.numel(), seed, x.dtype, x.device).view(x.shape)
        v = t + al * (u - 0.5)
    else:
        v = torch.where(al == 1, torch.round(t), torch.round((t + 1) * 0.5) * 2 - 1)
    v = torch.maximum(torch.minimum(v, hi), lo)
    return v if values_only else v * s


# ---- the registered op --------------------------------------------------------------------
@torch.library.custom_op("soniq::quantize_raw", mutates_args=())
def quantize_raw(x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, alpha: Tensor, axis: int, noise: int,
                 seed: int, values_only: bool) -> Tensor:
    """Checked inputs only (soniq.ops.quantize does the checking): x contiguous float32/64,
    per-channel vectors of x's dtype and device along `axis`. The body runs only on a device
    type with no kernel (registered below)."""
    raise no_kernel(quantize_raw, "soniq::quantize_raw", x.device)


def _quantize_native(on_cuda: bool, x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, alpha: Tensor, axis: int,
                     noise: int, seed: int, values_only: bool) -> Tensor:
    """cpp/quantize.cpp or cuda/quantize.cu (one binding; the stream is the current one)."""
    # what keeps the kernel in bounds when the op is called directly (ops.quantize checks the rest)
    if x.dtype not in (torch.float32, torch.float64) or x.dim() == 0 or not 0 <= axis < x.dim():
        raise ValueError(f"soniq::quantize_raw: x must be float32/float64 with an axis in range, got {x.dtype}, "
                         f"shape {tuple(x.shape)}, axis {axis}")
    for name, t in (("scale", scale), ("lo", lo), ("hi", hi), ("alpha", alpha)):
        if t.dtype != x.dtype or t.numel() != x.shape[axis] or t.device != x.device:
            raise ValueError(f"soniq::quantize_raw: {name} must be {x.dtype} with {x.shape[axis]} entries on "
                             f"{x.device}, got {t.dtype} with {t.numel()} on {t.device}")
    if noise not in (0, 1):
        raise ValueError(f"soniq::quantize_raw: noise must be 0 (round) or 1 (uniform), got {noise}")
    x = x.contiguous()
    out = torch.empty_like(x)
    outer = int(np.prod(x.shape[:axis])) if axis > 0 else 1
    inner = int(np.prod(x.shape[axis + 1:])) if axis + 1 < x.dim() else 1
    vecs = [t.contiguous() for t in (scale, lo, hi, alpha)]
    stream = torch.cuda.current_stream(x.device).cuda_stream if on_cuda else 0
    _C.quantize(on_cuda, x.element_size(), x.data_ptr(), outer, x.shape[axis], inner,
                *(t.data_ptr() for t in vecs), noise, seed, values_only, out.data_ptr(), stream)
    return out


@register(quantize_raw, "cpu")
def quantize_cpu(x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, alpha: Tensor, axis: int, noise: int,
                 seed: int, values_only: bool) -> Tensor:
    return _quantize_native(False, x, scale, lo, hi, alpha, axis, noise, seed, values_only)


@register(quantize_raw, "cuda")
def quantize_cuda(x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, alpha: Tensor, axis: int, noise: int,
                  seed: int, values_only: bool) -> Tensor:
    return _quantize_native(True, x, scale, lo, hi, alpha, axis, noise, seed, values_only)


@quantize_raw.register_fake
def _(x, scale, lo, hi, alpha, axis, noise, seed, values_only):
    return torch.empty_like(x)


def philox_uniform(n: int, seed: int, *, dtype=torch.float32, device="cpu") -> Tensor:
    """The noise stream u[0..n) of `seed` (u in [0, 1)), as the quantizer draws it."""
    if dtype not in (torch.float32, torch.float64):  # the native streams write 4- or 8-byte floats
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    out = torch.empty(n, dtype=dtype, device=device)
    cuda = out.device.type == "cuda"
    stream = torch.cuda.current_stream(out.device).cuda_stream if cuda else 0
    _C.philox_uniform(cuda, out.element_size(), n, seed, out.data_ptr(), stream)
    return out


# ---- public entry point -------------------------------------------------------------------
def _channel_vector(v, C: int, name: str, like: Tensor, dtype=None) -> Tensor:
    dtype = dtype or like.dtype
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(np.asarray(v, dtype=np.float64))
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        try:
            return torch.full((C,), float(v), dtype=dtype, device=like.device)
        except (RuntimeError, OverflowError):  # e.g. 1e300 does not fit float32
            raise ValueError(f"{name} = {v!r} cannot be represented as {dtype}") from None
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a number or a 1-D tensor/array with one entry per channel, "
                        f"got {type(v).__name__}")
    if v.dim() == 0:
        v = v.reshape(1).expand(C)
    if v.dim() != 1 or v.numel() != C:
        raise ValueError(f"{name} must be a scalar or 1-D with {C} entries (one per channel), got shape {tuple(v.shape)}")
    return v.detach().to(device=like.device, dtype=dtype).contiguous()


def check_bits(bits: Tensor, exact: bool, name: str = "bits") -> None:
    bad = ~torch.isfinite(bits) | (bits < 1) | (bits > 8)
    if exact:
        bad |= bits != torch.round(bits)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        want = "integers in 1..8 in exact mode (noise='none')" if exact else "real values in [1, 8]"
        raise ValueError(f"{name}[{i}] = {float(bits[i])}: bit widths must be {want}")


def quantizer_params(s: Tensor, b: Tensor, signed: bool, *, exact: bool, names=("scale", "bits")) -> tuple:
    """(scale, lo, hi, alpha) in s's dtype for soniq::quantize_raw, from per-channel scales s
    and bits b (float64), checked (the messages name them as `names`)."""
    check_scales(s, names[0])
    check_inverse(s, names[0])
    check_bits(b, exact=exact, name=names[1])
    return (s, *(t.to(s.dtype) for t in level_bounds(b, bool(signed))))


def resolve_seed(seed) -> int:
    if seed is None:  # reproducible under torch.manual_seed
        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def quantize(x, scale, bits, *, signed: bool, noise: str = "none", seed=None, axis: int = 0,
             values_only: bool = False):
    """Per-channel quantizer along `axis` of a float tensor/array (see module docstring).

    scale: positive float or one per channel; bits: int 1..8 or one per channel (real values
    allowed with noise="uniform"); signed: design.md encodings; noise: "none" (round, clamp)
    or "uniform" (Philox noise of one step; seed=None draws one from torch's generator).
    Returns the fake-quantized tensor (scale * v), or the integer values v (as floats)
    with values_only=True. Numpy in, numpy out. Not differentiable: use soniq.nn / qat.
    """
    if not isinstance(signed, (bool, np.bool_)):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {sorted(NOISE_MODES)}, got {noise!r}")
    is_numpy = isinstance(x, np.ndarray)
    if is_numpy:
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    if x.dim() == 0:
        x = x.reshape(1)
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis must be an int in [{-x.dim()}, {x.dim()}), got {axis!r} for x of shape {tuple(x.shape)}")
    axis = int(axis) % x.dim()
    C = x.shape[axis]
    s = _channel_vector(scale, C, "scale", x)
    b = _channel_vector(bits, C, "bits", x, torch.float64)
    s, lo, hi, alpha = quantizer_params(s, b, signed, exact=noise == "none")
    sd = resolve_seed(seed) if noise == "uniform" else 0
    if x.device.type == "cuda" and not _C.built_with_cuda:
        raise RuntimeError("soniq was built without CUDA kernels; move x to the CPU or reinstall with nvcc")
    out = torch.ops.soniq.quantize_raw(x.detach(), s, lo, hi, alpha, axis, NOISE_MODES[noise], sd, bool(values_only))
    return out.numpy() if is_numpy else out
