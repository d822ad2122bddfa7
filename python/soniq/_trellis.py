"""Trellis-coded weights: a bitshift trellis (QTIP, Tseng et al. 2024) over int8 codebook values.

A sequence of T weights at k bits each is a path through 2^L states: the state after weight t is
the last L bits of the path's bits, s_t = ((s_{t-1} << k) | b_t) mod 2^L, and the weight is
codebook[s_t] x the row's step. The path starts from zero history (s_0 < 2^k), so a sequence
is exactly k x T bits. Viterbi finds the least-squares path (2^L states per weight), which at
the same bits cuts the rounding error of the uniform grid by more than half
(docs/DESIGN_NOTES.md, "Trellis-coded weights").

The codebook entries are int8 (Gaussian values x CODEBOOK_SCALE), so a decoded weight is an
8-bit code of soniq's usual grid: the kernels run it as an 8-bit row, integer-exact. The file
holds the k-bit streams (soniq.save format 5); loading decodes them back to those codes.
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


def viterbi(x: Tensor, states_log2: int, bits: int, values: Tensor) -> Tensor:
    """x [R, T]: R independent sequences; values [2^L] float. The states [R, T] (int64) of each
    sequence's least-squares path, starting from zero history (s_0 < 2^bits). Computed in
    float32 by the native search (cpp/trellis.h: the active ISA's step, sequences over the
    kernel threads), which gives viterbi_ref's paths."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"viterbi: x must be a float [R, T] tensor, got {x.dtype} {tuple(x.shape)}")
    if not 1 <= bits <= min(8, states_log2) or states_log2 > STATES_LOG2[1]:
        raise ValueError(f"viterbi: need 1 <= bits <= min(8, states_log2) and states_log2 <= {STATES_LOG2[1]}, "
                         f"got states_log2={states_log2}, bits={bits}")
    if tuple(values.shape) != (2 ** states_log2,):
        raise ValueError(f"viterbi: values must have 2^{states_log2} entries, got {tuple(values.shape)}")
    R, T = x.shape
    out = torch.empty(R, T, dtype=torch.int64)
    if R == 0 or T == 0:
        return out
    xf = x.detach().to("cpu", torch.float32).contiguous()
    vf = values.detach().to("cpu", torch.float32).contiguous()
    if not (bool(torch.isfinite(xf).all()) and bool(torch.isfinite(vf).all())):
        raise ValueError("viterbi: x and values must be finite")
    _C.trellis_viterbi(xf.data_ptr(), R, T, states_log2, bits, vf.data_ptr(), out.data_ptr())
    return out


@torch.no_grad()
def viterbi_ref(x: Tensor, states_log2: int, bits: int, values: Tensor) -> Tensor:
    """The torch reference of viterbi (the same float32 operations, ties to the smaller state)."""
    R, T = x.shape
    S, K = 2 ** states_log2, 2 ** bits
    H = S // K
    x, values = x.float(), values.float()
    cost = (x[:, :1] - values[None, :]) ** 2
    cost[:, K:] = float("inf")
    back = torch.empty(max(T - 1, 0), R, H, dtype=torch.uint8)  # bits <= 8: K <= 256 predecessors
    vv = values.view(H, K)[None]
    for t in range(1, T):
        # the predecessors of state s are (h << (L - bits)) | (s >> bits), h in [0, 2^bits): the K
        # states whose low L - bits bits are s's top ones; view(R, K, H) groups exactly those
        m, a = cost.view(R, K, H).min(1)
        back[t - 1] = a.to(back.dtype)
        cost = (m[:, :, None] + (x[:, t, None, None] - vv) ** 2).reshape(R, S)
    s = cost.argmin(1)
    out, rows = torch.empty(R, T, dtype=torch.int64), torch.arange(R)
    for t in range(T - 1, -1, -1):
        out[:, t] = s
        if t:
            low = s >> bits
            s = (back[t - 1][rows, low].long() << (states_log2 - bits)) | low
    return out


def encode(states: Tensor, states_log2: int, bits: int) -> Tensor:
    """The k-bit stream of paths [R, T] (R x T x k bits, MSB first, as uint8). Raises if a
    row is not a path of this trellis."""
    s = states.to(torch.int64)
    if s.numel() and (int(s.min()) < 0 or int(s.max()) >= 2 ** states_log2):
        raise ValueError(f"trellis states must lie in [0, 2^{states_log2})")
    hist = (1 << (states_log2 - bits)) - 1
    if s.numel() and (bool((s[:, 0] >> bits != 0).any())
                      or bool(((s[:, 1:] >> bits) != (s[:, :-1] & hist)).any())):
        raise ValueError("trellis states do not form bitshift paths from zero history")
    step = (s & ((1 << bits) - 1)).numpy()
    bit_rows = (step[..., None] >> np.arange(bits - 1, -1, -1)) & 1  # [R, T, k]
    return torch.from_numpy(np.packbits(bit_rows.astype(np.uint8).reshape(-1)))


def stream_bytes(rows: int, steps: int, bits: int) -> int:
    return (rows * steps * bits + 7) // 8


# sequences decoded per chunk: bounds decode's scratch memory (~12 bytes per weight of a chunk)
# whatever size a stored layer claims
_DECODE_CHUNK = 1 << 22


def decode(stream: Tensor, rows: int, steps: int, states_log2: int, bits: int) -> Tensor:
    """Inverse of encode: the states [rows, steps] (int64)."""
    need = stream_bytes(rows, steps, bits)
    if stream.dtype != torch.uint8 or stream.dim() != 1 or stream.numel() != need:
        raise ValueError(f"trellis stream must be {need} uint8 bytes for {rows} sequences of {steps} "
                         f"{bits}-bit steps, got {stream.dtype} {tuple(stream.shape)}")
    out = torch.empty(rows, steps, dtype=torch.int64)
    raw = stream.numpy()
    per = max(1, _DECODE_CHUNK // max(1, steps))
    pw = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    mask, hist = (1 << states_log2) - 1, -(-states_log2 // bits)  # steps a state's L bits span
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        b0, b1 = r0 * steps * bits, r1 * steps * bits
        bitv = np.unpackbits(raw[b0 // 8:(b1 + 7) // 8])[b0 % 8:b0 % 8 + b1 - b0]
        step = bitv.reshape(r1 - r0, steps, bits) @ pw  # [chunk, steps]: each step's k bits
        s = np.zeros_like(step)
        for j in range(min(hist, steps)):  # s_t = OR of step_{t-j} << k j over the steps it holds
            s[:, j:] |= step[:, :steps - j] << (bits * j)
        out[r0:r1] = torch.from_numpy(s & mask)
    return out


@dataclass
class TrellisWeights:
    """A weight [N, K] (rows = output channels) as trellis streams: the rows of each bit width,
    in ascending order, form one sequence per input column (a column's T_k weights of width k
    are T_k steps), streams[k] holds those K sequences. codebook: int8 [2^L]."""

    shape: tuple
    row_bits: Tensor          # uint8 [N]: each row's width k
    streams: dict             # k -> uint8 stream of K sequences of (row_bits == k).sum() steps
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

    def codes(self) -> Tensor:
        """int8 codes [N, K] the streams decode to."""
        N, K = self.shape
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
    def from_states(shape, row_bits: Tensor, states: Tensor, codebook_: Tensor) -> "TrellisWeights":
        """states [N, K]: each weight's state, rows of a width forming column sequences."""
        L = states_log2_of(codebook_)
        rb = row_bits.to(torch.uint8)
        streams = {int(k): encode(states[rb == k].T.contiguous(), L, int(k)) for k in torch.unique(rb).tolist()}
        return TrellisWeights(tuple(shape), rb, streams, codebook_)


def states_log2_of(codebook_: Tensor) -> int:
    return int(codebook_.numel()).bit_length() - 1


def check_record(shape, row_bits: Tensor, streams: dict, codebook_: Tensor, states_log2: int, where: str) -> None:
    """Validates the tensors of a stored trellis weight (untrusted input) with errors naming them."""
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
    if not widths <= set(range(1, 9)) or widths != set(streams):
        raise ValueError(f"{where}: trellis widths {sorted(widths)} must be in 1..8 with one stream each, "
                         f"streams for {sorted(streams)}")
    for k, st in streams.items():
        need = stream_bytes(K, int((row_bits == k).sum()), k)
        if st.dtype != torch.uint8 or st.dim() != 1 or st.numel() != need:
            raise ValueError(f"{where}: trellis stream for {k}-bit rows must be {need} uint8 bytes, got "
                             f"{st.dtype} {tuple(st.shape)}")
