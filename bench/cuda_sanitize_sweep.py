"""Small sweep of every CUDA mpgemm kernel and the fused quantize + pack for
compute-sanitizer (memcheck, racecheck, synccheck): odd shapes, two tiers, scales. Exits non-zero on any mismatch with the CPU.
    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/cuda_sanitize_sweep.py
"""
import sys

import numpy as np
import torch

from soniq import ops
from soniq._native import _C


def vals(rng, shape, bits, signed):
    if signed:
        lo = -(1 << (bits - 1))
        v = rng.integers(lo, -lo, size=shape) if bits > 1 else rng.choice([-1, 1], size=shape)
    else:
        v = rng.integers(0, 1 << bits, size=shape)
    return torch.from_numpy(v.astype(np.int64))


def main() -> int:
    rng = np.random.default_rng(0)
    bad = 0
    cases = [(1, 1, 1, 1, 1), (3, 70, 65, 2, 4), (16, 33, 200, 8, 2), (65, 67, 129, 1, 1), (70, 64, 300, 4, 8)]
    for kernel in ("ref", "popc", "gemv", "mma", "mma4", "bmma", "int8mm"):
        _C.cuda_set_kernel(kernel)
        for M, N, K, wa, wb in cases:
            if kernel == "gemv" and M > 16:
                continue
            a, b = vals(rng, (M, K), wa, False), vals(rng, (N, K), wb, True)
            pa = ops.pack(a, wa, signed=False, scale=torch.rand(M) + 0.5)
            pb = ops.pack(b, wb, signed=True)
            for sa in (pa, ops.pack(a, wa, signed=False)):
                want = ops.mpgemm(sa, pb)
                got = ops.mpgemm(sa.cuda(), pb.cuda()).cpu()
                if not torch.equal(got, want):
                    bad += 1
                    print(f"MISMATCH kernel={kernel} M={M} N={N} K={K} W{wb}A{wa} scaled={sa.scale is not None}")
    _C.cuda_set_kernel("auto")
    for M, K in ((1, 1), (5, 130), (33, 700)):  # the fused activation quantize + pack
        bits = np.where(rng.random(K) < 0.5, 2, 8)
        x = torch.from_numpy(rng.normal(0, 2, (M, K)).astype(np.float32))
        want = ops.quantize_pack(x, 0.1, bits, signed=True)
        got = ops.quantize_pack(x.cuda(), 0.1, bits, signed=True)
        if not (torch.equal(got.data.cpu(), want.data) and torch.equal(got.sums.cpu(), want.sums)):
            bad += 1
            print(f"MISMATCH quantize_pack M={M} K={K}")
    torch.cuda.synchronize()
    print("sweep done:", "OK" if bad == 0 else f"{bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
