"""Trellis-coded weights: a bitshift trellis (QTIP, Tseng et al. 2024) over int8 codebook values.

A sequence of T weights is a path through 2^L states: step t shifts in k_t bits, and the state
after it is the last L bits of the path's bits, s_t = ((s_{t-1} << k_t) | b_t) mod 2^L; the weight
is codebook[s_t] x the row's step. The path starts from zero history (s_0 < 2^k_0), so a
sequence is exactly sum(k_t) bits. Viterbi finds the least-squares path (2^L states per weight),
which at the same bits cuts the rounding error of the uniform grid by more than half
(docs/DESIGN_NOTES.md, "Trellis-coded weights"). In a layer, each input column is one path down
the output rows, each row's steps at its tier's width (joint paths, save format 7; formats 5 and
6 held one path per width), its errors weighted by the row's step^2 so that the column's bits go
where they cut the layer's error most.

The codebook entries are int8 (Gaussian values x CODEBOOK_SCALE), so a decoded weight is an
8-bit code of soniq's usual grid: the kernels run it as an 8-bit row, integer-exact. The file
holds the streams; loading decodes them back to those codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ._native import _C

# codebook entries are round(g x 32), g unit Gaussian: the row's step is its scale / 32, and
# +-127 holds every entry of a 2^12 codebook (|g| < 4)
CODEBOOK_SCALE = 32
# scale of a row's codebook values: its RMS x 1.12 (the least error on Gaussian rows, k = 4, 5)
ROW_GAIN = 1.12
STATES_LOG2 = (8, 16)  # the range PTQConfig(trellis_states_log2=...) takes


def codebook(states_log2: int) -> Tensor:
    """The int8 codebook of 2^L entries soniq's trellis rounding uses (fixed seed; files store
    it, so loading never depends on the generator)."""
    g = torch.randn(2 ** states_log2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.clamp(torch.round(g * CODEBOOK_SCALE), -127, 127).to(torch.int8)


_MAX_ABS = 1e18  # |x|, |values| bound: (x - v)^2 stays finite in float32


def _step_bits(bits, T: int, states_log2: int, where: str) -> Tensor:
    """bits (an int, or one width per step) as uint8 [T], checked."""
    b = torch.full((T,), bits, dtype=torch.int64) if isinstance(bits, int) else torch.as_tensor(bits).to(torch.int64)
    if b.dim() != 1 or b.numel() != T:
        raise ValueError(f"{where}: bits must be an int or one width per step ({T}), got shape {tuple(b.shape)}")
    if T and (int(b.min()) < 1 or int(b.max()) > min(8, states_log2)):
        raise ValueError(f"{where}: need 1 <= bits <= min(8, states_log2) = {min(8, states_log2)}, got "
                         f"{int(b.min())}..{int(b.max())}")
    return b.to(torch.uint8).contiguous()


def viterbi(x: Tensor, states_log2: int, bits, values: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """x [R, T]: R independent sequences; bits: the width of every step (an int) or of each step
    ([T], shared by the sequences); weights [T] (None: 1): each step's weight in the squared
    error; values [2^L] float. The states [R, T] (int64) of each sequence's least-squares path,
    starting from zero history (s_0 < 2^bits[0]). Computed in float32 by the native search
    (cpp/trellis.h: the active ISA's step, sequences over the kernel threads), which gives
    viterbi_ref's paths."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"viterbi: x must be a float [R, T] tensor, got {x.dtype} {tuple(x.shape)}")
    if isinstance(states_log2, bool) or not 1 <= states_log2 <= STATES_LOG2[1]:
        raise ValueError(f"viterbi: need 1 <= states_log2 <= {STATES_LOG2[1]}, got {states_log2}")
    R, T = x.shape
    b = _step_bits(bits, T, states_log2, "viterbi")
    if tuple(values.shape) != (2 ** states_log2,):
        raise ValueError(f"viterbi: values must have 2^{states_log2} entries, got {tuple(values.shape)}")
    wf = None
    if weights is not None:
        wf = weights.detach().to("cpu", torch.float32).contiguous()
        if tuple(wf.shape) != (T,) or not (bool(torch.isfinite(wf).all()) and bool((wf >= 0).all())):
            raise ValueError(f"viterbi: weights must be {T} finite values >= 0, got {tuple(weights.shape)}")
    out = torch.empty(R, T, dtype=torch.int64)
    if R == 0 or T == 0:
        return out
    xf = x.detach().to("cpu", torch.float32).contiguous()
    vf = values.detach().to("cpu", torch.float32).contiguous()
    if not all(bool((t.abs() <= _MAX_ABS).all()) for t in (xf, vf)):  # also refuses NaN
        raise ValueError(f"viterbi: x and values must be finite, at most {_MAX_ABS:g} in magnitude (a squared "
                         "difference must not overflow float32: w x inf would be NaN)")
    _C.trellis_viterbi(xf.data_ptr(), R, T, states_log2, b.data_ptr(), 0 if wf is None else wf.data_ptr(),
                       vf.data_ptr(), out.data_ptr())
    return out


@torch.no_grad()
def viterbi_ref(x: Tensor, states_log2: int, bits, values: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """The torch reference of viterbi (the same float32 operations, ties to the smaller state)."""
    R, T = x.shape
    ks = _step_bits(bits, T, states_log2, "viterbi_ref").tolist()
    if R == 0 or T == 0:
        return torch.empty(R, T, dtype=torch.int64)
    w = torch.ones(T) if weights is None else weights.float()
    S = 2 ** states_log2
    x, values = x.float(), values.float()
    cost = w[0] * ((x[:, :1] - values[None, :]) ** 2)
    cost[:, 2 ** ks[0]:] = float("inf")
    backs = []  # bits <= 8: at most 256 predecessors, a uint8 each
    for t in range(1, T):
        # the predecessors of state s are (h << (L - k)) | (s >> k), h in [0, 2^k): the 2^k states
        # whose low L - k bits are s's top ones; view(R, 2^k, H) groups exactly those
        K = 2 ** ks[t]
        m, a = cost.view(R, K, S // K).min(1)
        backs.append(a.to(torch.uint8))
        cost = (m[:, :, None] + w[t] * ((x[:, t, None, None] - values.view(S // K, K)[None]) ** 2)).reshape(R, S)
    s = cost.argmin(1)
    out, rows = torch.empty(R, T, dtype=torch.int64), torch.arange(R)
    for t in range(T - 1, -1, -1):
        out[:, t] = s
        if t:
            low = s >> ks[t]
            s = (backs[t - 1][rows, low].long() << (states_log2 - ks[t])) | low
    return out


def encode(states: Tensor, states_log2: int, bits) -> Tensor:
    """The stream of paths [R, T] whose steps are bits wide (an int, or one width per step): each
    path's steps in turn, each step's k bits MSB first, the R paths back to back (R x sum(k)
    bits, as uint8). Raises if a row is not a path of this trellis."""
    s = states.to(torch.int64)
    R, T = s.shape
    k = _step_bits(bits, T, states_log2, "encode").to(torch.int64)
    if s.numel() and (int(s.min()) < 0 or int(s.max()) >= 2 ** states_log2):
        raise ValueError(f"trellis states must lie in [0, 2^{states_log2})")
    hist = (1 << (states_log2 - k[1:])) - 1  # the L - k_t bits step t keeps of the previous state
    if s.numel() and (bool((s[:, 0] >> k[0] != 0).any())
                      or bool(((s[:, 1:] >> k[1:]) != (s[:, :-1] & hist)).any())):
        raise ValueError("trellis states do not form bitshift paths from zero history")
    low8 = ((s & 255).numpy()[..., None] >> np.arange(7, -1, -1)) & 1  # [R, T, 8]: the low 8 bits
    keep = np.arange(8)[None, :] >= 8 - k.numpy()[:, None]             # [T, 8]: a step's last k bits
    return torch.from_numpy(np.packbits(low8[:, keep].astype(np.uint8).reshape(-1)))


def stream_bytes(rows: int, steps: int, bits) -> int:
    """Bytes of rows paths of steps steps, bits wide (an int, or one width per step)."""
    per = steps * bits if isinstance(bits, int) else int(torch.as_tensor(bits).to(torch.int64).sum())
    return (rows * per + 7) // 8


# weights decoded per chunk: bounds decode's scratch memory (~40 bytes per weight of a chunk)
# whatever size a stored layer claims
_DECODE_CHUNK = 1 << 21


def decode(stream: Tensor, rows: int, steps: int, states_log2: int, bits) -> Tensor:
    """Inverse of encode: the states [rows, steps] (int64) of rows paths whose steps are bits
    wide (an int, or one width per step)."""
    k = _step_bits(bits, steps, states_log2, "decode").numpy().astype(np.int64)
    need = stream_bytes(rows, steps, bits)
    if stream.dtype != torch.uint8 or stream.dim() != 1 or stream.numel() != need:
        raise ValueError(f"trellis stream must be {need} uint8 bytes for {rows} sequences of {steps} "
                         f"steps of {int(k.sum())} bits in all, got {stream.dtype} {tuple(stream.shape)}")
    out = torch.empty(rows, steps, dtype=torch.int64)
    if rows == 0 or steps == 0:
        return out
    raw, B = stream.numpy(), int(k.sum())  # B: bits per path
    end = np.cumsum(k)                     # a step's bits end here (exclusive) in its path
    window = end[:, None] - 8 + np.arange(8)[None, :]  # [steps, 8]: the 8 bits that end there
    keep = np.arange(8)[None, :] >= 8 - k[:, None]
    mask = (1 << states_log2) - 1
    per = max(1, _DECODE_CHUNK // steps)
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        b0, b1 = r0 * B, r1 * B
        bitv = np.unpackbits(raw[b0 // 8:(b1 + 7) // 8])[b0 % 8:b0 % 8 + b1 - b0].reshape(r1 - r0, B)
        bitv = np.concatenate([np.zeros((r1 - r0, 8), np.uint8), bitv], axis=1)  # bits before a path: 0
        step = np.packbits(bitv[:, window + 8] * keep, axis=-1)[..., 0].astype(np.int64)  # each step's k bits
        s = np.zeros_like(step)
        for j in range(steps):  # s_t = OR of step_{t-j} << (bits since it), over the steps it still holds
            shift = end[j:] - end[:steps - j]
            if j and int(shift.min()) >= states_log2:
                break
            s[:, j:] |= np.where(shift < states_log2, step[:, :steps - j] << np.minimum(shift, 63), 0)
        out[r0:r1] = torch.from_numpy(s & mask)
    return out


@dataclass
class TrellisWeights:
    """A weight [N, K] (rows = output channels) as trellis streams, one path per input column:
    joint: streams[0] holds the K paths down all N rows, each row's steps row_bits wide (save
    format 7); else streams[k] holds the K paths down the rows of width k (in row order), one
    stream per width (formats 5 and 6). codebook: int8 [2^L]."""

    shape: tuple
    row_bits: Tensor          # uint8 [N]: each row's width k
    streams: dict             # joint: {0: stream}; else k -> stream of K paths of (row_bits == k).sum() steps
    codebook: Tensor          # int8 [2^L]
    stamp: Optional[tuple] = None  # the fake-quantized layer's weight and clip sums when coded

    @staticmethod
    def _stamp_of(q) -> tuple:
        return (tuple(q.weight.shape), float(q.weight.detach().double().sum()),
                float(q.w_quant.clip.detach().double().sum()))

    def bind(self, q) -> None:
        """Remembers the QLinear / QConv2d whose codes these streams are (cheaply: its weight and
        clip sums), so that current(q) tells when training has moved them since."""
        self.stamp = self._stamp_of(q)

    def current(self, q) -> bool:
        return self.stamp is not None and self._stamp_of(q) == self.stamp

    @property
    def states_log2(self) -> int:
        return states_log2_of(self.codebook)

    @property
    def joint(self) -> bool:
        """Whether the columns are paths down all rows (the one stream under key 0)."""
        return 0 in self.streams

    def codes(self) -> Tensor:
        """int8 codes [N, K] the streams decode to."""
        N, K = self.shape
        if self.joint:
            return self.codebook[decode(self.streams[0], K, N, self.states_log2, self.row_bits)].T.contiguous()
        out = torch.empty(N, K, dtype=torch.int8)
        for k, st in sorted(self.streams.items()):
            sel = self.row_bits == k
            states = decode(st, K, int(sel.sum()), self.states_log2, k)  # [K, T_k]
            out[sel] = self.codebook[states].T
        return out

    def matches(self, codes: Tensor) -> bool:
        """Whether the streams still decode to these codes [N, K] (a layer trained or replaced
        since it was coded no longer does)."""
        return tuple(codes.shape) == self.shape and torch.equal(self.codes().to(torch.int64),
                                                                codes.detach().cpu().to(torch.int64))

    @staticmethod
    def from_states(shape, row_bits: Tensor, states: Tensor, codebook_: Tensor, joint: bool = False) -> "TrellisWeights":
        """states [N, K]: each weight's state; the columns are paths down all rows (joint) or down
        the rows of each width."""
        L = states_log2_of(codebook_)
        rb = row_bits.to(torch.uint8)
        if joint:
            return TrellisWeights(tuple(shape), rb, {0: encode(states.T.contiguous(), L, rb)}, codebook_)
        streams = {int(k): encode(states[rb == k].T.contiguous(), L, int(k)) for k in torch.unique(rb).tolist()}
        return TrellisWeights(tuple(shape), rb, streams, codebook_)


def states_log2_of(codebook_: Tensor) -> int:
    return int(codebook_.numel()).bit_length() - 1


def check_record(shape, row_bits: Tensor, streams: dict, codebook_: Tensor, states_log2: int, where: str,
                 joint: bool = False) -> None:
    """Validates the tensors of a stored trellis weight (untrusted input) with errors naming them;
    joint: streams is {0: the one stream of paths down all rows}."""
    lo, hi = STATES_LOG2
    if isinstance(states_log2, bool) or not isinstance(states_log2, int) or not lo <= states_log2 <= hi:
        raise ValueError(f"{where}: trellis states_log2 must be an integer in {lo}..{hi}, got {states_log2!r}")
    if codebook_.dtype != torch.int8 or tuple(codebook_.shape) != (2 ** states_log2,):
        raise ValueError(f"{where}: trellis codebook must be int8 of 2^{states_log2} entries, got "
                         f"{codebook_.dtype} {tuple(codebook_.shape)}")
    N, K = shape
    if row_bits.dtype != torch.uint8 or tuple(row_bits.shape) != (N,):
        raise ValueError(f"{where}: trellis row_bits must be uint8 [{N}], got {row_bits.dtype} {tuple(row_bits.shape)}")
    widths = set(torch.unique(row_bits).tolist())
    if not widths <= set(range(1, min(8, states_log2) + 1)) or (not joint and widths != set(streams)):
        raise ValueError(f"{where}: trellis widths {sorted(widths)} must be in 1..{min(8, states_log2)}"
                         + ("" if joint else f" with one stream each, streams for {sorted(streams)}"))
    need = {0: stream_bytes(K, N, row_bits)} if joint else \
        {k: stream_bytes(K, int((row_bits == k).sum()), k) for k in streams}
    for k, st in streams.items():
        if st.dtype != torch.uint8 or st.dim() != 1 or st.numel() != need[k]:
            what = "joint stream" if joint else f"stream for {k}-bit rows"
            raise ValueError(f"{where}: trellis {what} must be {need[k]} uint8 bytes, got {st.dtype} {tuple(st.shape)}")
