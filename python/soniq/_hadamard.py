"""Block Hadamard rotation of a Linear layer's input (QATConfig(hadamard_block=...)).

A layer computes x @ W.T = (x H) @ (W H / b).T with H block-diagonal: one unnormalized
Walsh-Hadamard matrix (Sylvester order, entries +-1, H H.T = b I) per b input features, so
dividing by the power of two b is exact. The activation quantizer sees x H: an outlier
feature is spread over its block, so a per-token 8-bit scale loses far less (MiniLM with float
weights and 8-bit per-token activations: top-1 agreement 93.4% -> 98.8%; docs/DESIGN_NOTES.md),
and the rotated weight W H / b rounds better too. The weight is stored rotated and quantized
as it is, so the packed layer needs only the input's rotation.

x H is computed by butterflies, log2(b) stages, each element one float add or subtract of
two others (stage h pairs feature i with i + h in groups of 2h: a + b to i, a - b to i + h).
The packed layers' native forward (cpp/hadamard.h) runs the same operations in the same
order, so the rotated row, and with it every activation code, is bit-identical to this torch
version (no FMA, no reassociation). Random signs before H (QuaRot) measured no better on
MiniLM, so there are none: a layer's rotation is its block size alone.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_block(block, name: str = "hadamard_block") -> int:
    """0 (off) or a power of two >= 2; returns it as an int."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 0 or block == 1 or block & (block - 1):
        raise ValueError(f"{name} must be 0 (off) or a power of two >= 2, got {block!r}")
    return block


def layer_block(block: int, in_features: int) -> int:
    """The block a layer of in_features inputs uses under a requested block: the largest power
    of two <= block dividing in_features (0, no rotation, when that is 1)."""
    b = block
    while b > 1 and in_features % b:
        b //= 2
    return b if b > 1 else 0


def rotate(x: Tensor, block: int) -> Tensor:
    """x [..., K] -> x @ H per block of `block` features (unnormalized); block 0: x."""
    if not block:
        return x
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(shape)


def rotate_weight(w: Tensor, block: int) -> Tensor:
    """W [N, K] -> W H / block, the weight that multiplies the rotated input (H / block is
    H's inverse: H is symmetric and H H = block I)."""
    return rotate(w, block) / block if block else w


def unrotate_weight(w: Tensor, block: int) -> Tensor:
    """The inverse of rotate_weight: W' [N, K] -> W' H."""
    return rotate(w, block)


def rotate_moment(h: Tensor, block: int) -> Tensor:
    """H_x = X.T X / T of the input -> H H_x H, that of the rotated input X H."""
    return rotate(rotate(h, block).T.contiguous(), block) if block else h
