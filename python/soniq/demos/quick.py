"""`soniq demo quick`: a two-tier layer packed and multiplied exactly, checked against numpy."""
from __future__ import annotations

import json
import time

import numpy as np


def main(json_out: bool = False, seed: int = 0) -> int:
    import soniq
    from soniq import ops

    rng = np.random.default_rng(seed)
    M, N, K = 8, 256, 1000
    # weights: 25% of output channels at 4 bits, 75% at 2 bits (signed)
    w_bits = np.where(rng.random(N) < 0.25, 4, 2)
    w = np.stack([rng.integers(-(1 << (b - 1)), 1 << (b - 1), K) for b in w_bits])
    # activations: per input channel, 4 or 8 bits unsigned (two tiers along K)
    a_bits = np.where(rng.random(K) < 0.5, 4, 8)
    x = rng.integers(0, 1 << a_bits, size=(M, K))

    a = ops.pack(x, a_bits, signed=False, axis=1)
    b = ops.pack(w, w_bits, signed=True, axis=0, k_layout=a)
    t0 = time.perf_counter()
    out = ops.mpgemm(a, b)
    dt = time.perf_counter() - t0
    ref = x.astype(np.int64) @ w.astype(np.int64).T
    exact = bool(np.array_equal(out, ref))
    res = {"shape": {"M": M, "N": N, "K": K}, "isa": soniq.get_isa(), "exact": exact,
           "avg_w_bits": float(w_bits.mean()), "avg_a_bits": float(a_bits.mean()),
           "packed_bytes": {"a": a.nbytes, "b": b.nbytes}, "seconds": dt}
    if json_out:
        print(json.dumps(res, indent=2))
    else:
        soniq.info()
        print()
        print(a)
        print(b)
        print(f"\nmpgemm [{M}x{K}] @ [{N}x{K}].T on isa={res['isa']}: {dt * 1e3:.2f} ms")
        print(f"out[0, :6]   = {out[0, :6].tolist()}")
        print(f"numpy[0, :6] = {ref[0, :6].tolist()}")
        print(f"exact match with numpy int64 reference: {exact}")
    return 0 if exact else 1
