"""Runs each soniq CUDA kernel of interest once, between cudaProfilerStart/Stop, for Nsight
Compute (bench/gpu_run.sh profile: `ncu --profile-from-start off`): the GEMV that streams
W2A8 weights (memory bound: DRAM throughput is its limit), the INT8/INT4 tensor-core and
popcount GEMMs (compute bound: tensor / ALU pipe utilization), and the fused activation
quantize + pack. Shapes are the benchmark's (bench/gpu_gemm.py), GEMM at 4096^3."""
import torch

from soniq import ops
from soniq._native import _C
from soniq.benchmarks.gpu_gemm import rand_codes

CASES = [  # (name, M, N, K, w bits, a bits, kernel)
    ("GEMV W2A8", 1, 8192, 8192, 2, 8, "gemv"),
    ("GEMV M=16 W4A8", 16, 8192, 8192, 4, 8, "mma"),
    ("GEMM W8A8 mma", 4096, 4096, 4096, 8, 8, "mma"),
    ("GEMM W4A4 mma4", 4096, 4096, 4096, 4, 4, "mma4"),
    ("GEMM W1A1 popc", 4096, 4096, 4096, 1, 1, "popc"),
    ("GEMM W1A1 bmma", 4096, 4096, 4096, 1, 1, "bmma"),
]


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    runs = []
    for name, M, N, K, wb, wa, kernel in CASES:
        pa = ops.pack(rand_codes((M, K), wa, True, gen=gen), wa, signed=True)
        pb = ops.pack(rand_codes((N, K), wb, True, gen=gen), wb, signed=True)
        runs.append((name, kernel, lambda pa=pa, pb=pb: ops.mpgemm(pa, pb)))
    x = torch.randn(4096, 4096, device="cuda")
    runs.append(("quantize_pack 4096x4096 A8", "auto", lambda: ops.quantize_pack(x, 0.05, 8, signed=True)))
    for name, kernel, fn in runs:  # warm-up (first launches, allocator) outside the profiled range
        _C.cuda_set_kernel(kernel)
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, kernel, fn in runs:
        _C.cuda_set_kernel(kernel)
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    _C.cuda_set_kernel("auto")
    print("profiled:", ", ".join(f"{n} [{k}]" for n, k, _ in runs))


if __name__ == "__main__":
    main()
