"""One smoothed packed Linear (a_inv_smooth set) on the CPU: the native plan multiplying by the
factors in its quantize pass against the path before issue 14's change (x * a_inv_smooth in
torch, then the unsmoothed plan), A/B interleaved in one process, and the unsmoothed layer as
a floor. Prints medians and ratios; nothing here is a test.

    PYTHONPATH=python python bench/smooth_linear.py [--threads 2] [--K 384 --N 1536]
"""
import argparse
import copy
import statistics
import time

import numpy as np
import torch

import soniq
from soniq import KLayout, ops
from soniq._packed_nn import PackedLinear


def layer(K, N, dynamic, rng):
    a_bits = torch.full((K,), 8)
    a_scale = torch.full((K,), 1.0 / 127)
    w_bits = rng.choice([4, 6], N, p=[0.75, 0.25])  # (4, 6) at ~4.5 bits, the demo's fidelity row
    lo, hi = -(1 << (w_bits - 1)), (1 << (w_bits - 1))
    w = (rng.integers(0, 1 << 30, (N, K)) % (hi - lo)[:, None] + lo[:, None]).astype(np.int64)
    pw = ops.pack(w, w_bits, signed=True, scale=rng.uniform(0.01, 1, N).astype(np.float32),
                  k_layout=KLayout.from_bits(a_bits))
    pw.kind = "torch"
    inv = torch.from_numpy(np.exp2(rng.uniform(-2, 2, K)).astype(np.float32))
    return PackedLinear(pw, a_bits, a_scale, True, torch.randn(N), "bench", a_inv_smooth=inv,
                        a_dynamic="token" if dynamic else None)


def old_forward(twin, smooth):
    """PackedLinear.forward's smoothed branch before the change, on the unsmoothed twin's plan."""
    def f(x):
        lp, K, N = twin._fused_plan()
        rows = x.reshape(-1, K).float() * smooth
        out = torch.empty((*x.shape[:-1], N), dtype=torch.float32)
        assert lp.forward(rows.data_ptr(), rows.shape[0], rows.stride(0), out.data_ptr())
        return out
    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--K", type=int, default=384)
    ap.add_argument("--N", type=int, default=1536)
    ap.add_argument("--Ms", default="1,4096")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    soniq.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    cpu = soniq.info(verbose=False)["cpu"]["model"]
    print(f"{cpu}, isa {soniq.get_isa()}, threads {args.threads}, K {args.K}, N {args.N}")
    for dynamic in (True, False):
        lin = layer(args.K, args.N, dynamic, rng)
        twin = copy.deepcopy(lin)
        twin.a_inv_smooth = None
        ways = {"old (torch mul)": old_forward(twin, lin.a_inv_smooth), "new (native)": lin, "no smoothing": twin}
        for M in map(int, args.Ms.split(",")):
            x = torch.randn(M, args.K)
            assert torch.equal(ways["old (torch mul)"](x), lin(x))
            calls = max(1, int(2e8 // (M * args.K * args.N)))  # ~ equal work per sample
            t = {k: [] for k in ways}
            for _ in range(args.rounds):
                for k, f in ways.items():  # A/B/C interleaved
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        f(x)
                    t[k].append((time.perf_counter() - t0) / calls)
            med = {k: statistics.median(v) * 1e6 for k, v in t.items()}
            base = med["old (torch mul)"]
            print(f"{'dynamic' if dynamic else 'static '} M={M:5d}: " +
                  "  ".join(f"{k} {v:9.1f} us ({base / v:.3f}x)" for k, v in med.items()))


if __name__ == "__main__":
    main()
