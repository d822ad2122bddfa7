"""Source-tree entry point of `soniq bench gpu` (python/soniq/benchmarks/gpu_gemm.py); saves
its JSON + markdown to bench/results/ unless --out says otherwise."""
import os
import sys

from soniq.benchmarks.gpu_gemm import main

if __name__ == "__main__":
    main(sys.argv[1:], default_out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
