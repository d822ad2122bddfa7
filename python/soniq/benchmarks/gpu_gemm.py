"""GPU benchmark, in one process: soniq's CUDA mpgemm kernels against cuBLAS FP16
(torch.matmul), cuBLAS INT8 (torch._int_mm) and, where installed, a 4-bit weight-only
peer (torchao int4 / bitsandbytes NF4). Shapes: GEMM 8192^3, GEMV M=1 and M=16 with
N=K=8192. Every candidate is captured in a CUDA graph (so Python launch overhead is not
timed; eager fallback is noted), warmed up, timed with CUDA events; the median is kept.
Reports GOP/s (2*M*N*K / time), ratios to the cuBLAS baselines and the fraction of the
GPU's peak (INT8/FP16 tensor throughput, memory bandwidth for GEMV, and for bit-serial pairs
(a*b <= 4 bits) the popcount ceiling of the SMs), and writes JSON +
markdown to gpu_gemm_<gpu>.{json,md} under --out.
    soniq bench gpu [--quick] [--out DIR] [--json]   # or: python bench/gpu_gemm.py (saves to bench/results)
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

import soniq
from soniq import ops
from soniq._native import _C

# Dense peaks (no sparsity): FP16 and INT8 tensor TFLOP/s or TOP/s, memory TB/s.
PEAKS = {
    "H100 SXM": (989.0, 1979.0, 3.35), "H100 NVL": (835.0, 1671.0, 3.9), "H100 PCIe": (756.0, 1513.0, 2.0),
    "H200": (989.0, 1979.0, 4.8), "A100-SXM4-80GB": (312.0, 624.0, 2.04), "A100-SXM4-40GB": (312.0, 624.0, 1.56),
    "A100-PCIE": (312.0, 624.0, 1.94), "L40S": (362.0, 733.0, 0.864), "RTX 4090": (165.0, 661.0, 1.0),
}


# Boost clocks (GHz) for the popcount peak: 16 32-bit popc per SM per clock on sm_80-90
# (CUDA C++ Programming Guide, arithmetic instruction throughput), 32 bit products each.
BOOST_GHZ = {"H100 SXM": 1.98, "H100 NVL": 1.785, "H100 PCIe": 1.755, "H200": 1.98, "A100-SXM4-80GB": 1.41,
             "A100-SXM4-40GB": 1.41, "A100-PCIE": 1.41, "L40S": 2.52, "RTX 4090": 2.52}
POPC_PER_SM_CLOCK = 16


def popc_peak_tops(peaks_name, sms: int):
    """W1A1 bit-serial ceiling in TOP/s (2 ops per bit product: multiply and add); a WbAa
    product needs b*a bit products per element pair, so its ceiling is this / (a*b)."""
    ghz = BOOST_GHZ.get(peaks_name)
    return None if ghz is None else round(sms * POPC_PER_SM_CLOCK * ghz * 1e9 * 32 * 2 / 1e12, 1)


def gpu_peaks(name: str):
    n = name.replace("NVIDIA ", "")
    if "H100" in n and "PCIe" not in n and "NVL" not in n:
        n = "H100 SXM"
    for k, v in PEAKS.items():
        if k in n or n.startswith(k):
            return k, v
    return None, None


def time_fn(fn, *, reps_inner=None, repeats=15, use_graph=True):
    """Median seconds per call. Captures reps_inner calls in one CUDA graph when possible."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    if reps_inner is None:
        reps_inner = int(min(50, max(1, 0.02 / one)))
    repeats = repeats if one < 0.2 else 3
    mode = "graph" if use_graph else "eager"
    runner = None
    if use_graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(reps_inner):
                    fn()
            runner = g.replay
        except Exception as e:  # a peer that cannot be captured: time it eagerly
            mode = f"eager ({type(e).__name__})"
            torch.cuda.synchronize()
    if runner is None:
        def runner():
            for _ in range(reps_inner):
                fn()
    for _ in range(3):
        runner()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        runner()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3 / reps_inner)
    return statistics.median(times), mode


def rand_codes(shape, bits, signed, device="cuda", gen=None):
    if signed:
        if bits == 1:
            return torch.randint(0, 2, shape, device=device, generator=gen) * 2 - 1
        return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, device=device, generator=gen)
    return torch.randint(0, 1 << bits, shape, device=device, generator=gen)


def peer_4bit(M, N, K):
    """A 4-bit weight-only peer's call on fp16/bf16 activations, or (None, reason)."""
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_, int4_weight_only
        lin = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16, device="cuda")
        quantize_(lin, int4_weight_only())
        x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
        return (lambda: lin(x)), "torchao int4_weight_only (bf16 act)"
    except Exception as e:
        why = f"torchao: {type(e).__name__}: {e}"[:120]
    try:
        import bitsandbytes as bnb
        lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.float16, quant_type="nf4").cuda()
        x = torch.randn(M, K, dtype=torch.float16, device="cuda")
        lin(x)
        return (lambda: lin(x)), "bitsandbytes Linear4bit nf4 (fp16 act)"
    except Exception as e:
        why += f"; bitsandbytes: {type(e).__name__}: {e}"[:120]
    return None, why


def from_float_candidates(M, K, wb, wa, sa, pb, packed_bytes) -> list:
    """ops.mpgemm(quantize_pack(x), w) from float32 x, as the packed layers run it (NaN rows
    marked on the device, no sync, then filled with NaN): captured in a CUDA graph, and eager."""
    from soniq.ops._quantize_pack import make_plan
    out = []
    try:
        x = torch.randn(M, K, device="cuda")
        plan = make_plan(wa, 4.0 / (1 << wa), K, signed=sa, k_layout=pb)
        def fn():
            a = plan(x, nan_rows=True)
            return ops.mpgemm(a, pb).masked_fill_(a._nan_rows[:, None], float("nan"))
        for graph in (True, False):
            t, mode = time_fn(fn, use_graph=graph)
            how = "graph" if graph else "eager"
            out.append({"name": f"soniq W{wb}A{wa} [auto] from float32 x ({how})", "s": t, "mode": mode,
                        "bytes": packed_bytes + 4 * M * K})
    except Exception as e:
        out.append({"name": f"soniq W{wb}A{wa} [auto] from float32 x", "s": None, "note": str(e)[:120]})
    return out


def bench_shape(M, N, K, configs, peaks, results, verify, popc_tops=None):
    ops_count = 2.0 * M * N * K
    row = {"M": M, "N": N, "K": K, "candidates": []}
    x16 = torch.randn(M, K, dtype=torch.float16, device="cuda")
    w16 = torch.randn(N, K, dtype=torch.float16, device="cuda")
    t_fp16, mode = time_fn(lambda: torch.matmul(x16, w16.t()))
    row["candidates"].append({"name": "cuBLAS FP16 (torch.matmul)", "s": t_fp16, "mode": mode,
                              "bytes": 2 * (M * K + N * K + M * N)})
    Mi = max(M, 32)  # torch._int_mm wants M > 16
    x8 = torch.randint(-128, 127, (Mi, K), dtype=torch.int8, device="cuda")
    w8 = torch.randint(-128, 127, (K, N), dtype=torch.int8, device="cuda").t().contiguous().t()
    try:
        t_int8, mode = time_fn(lambda: torch._int_mm(x8, w8))
        note = "" if Mi == M else f"padded to M={Mi} (torch._int_mm needs M > 16)"
        row["candidates"].append({"name": "cuBLAS INT8 (torch._int_mm)", "s": t_int8, "mode": mode, "note": note,
                                  "bytes": Mi * K + N * K + 4 * Mi * N})
    except Exception as e:
        t_int8 = None
        row["candidates"].append({"name": "cuBLAS INT8 (torch._int_mm)", "s": None, "note": str(e)[:120]})
    fn, what = peer_4bit(M, N, K)
    if fn is not None:
        t, mode = time_fn(fn)
        row["candidates"].append({"name": f"4-bit peer: {what}", "s": t, "mode": mode})
    else:
        row["candidates"].append({"name": "4-bit weight-only peer", "s": None, "note": f"not available ({what})"})
    del x16, w16, x8, w8

    gen = torch.Generator(device="cuda").manual_seed(0)
    for wb, wa, sb, sa, kernels in configs:
        a = rand_codes((M, K), wa, sa, gen=gen)
        b = rand_codes((N, K), wb, sb, gen=gen)
        pa, pb = ops.pack(a, wa, signed=sa), ops.pack(b, wb, signed=sb)
        packed_bytes = pb.data.numel() * 8 + pa.data.numel() * 8 + 4 * M * N
        ref = (a.double() @ b.double().t()).long() if verify else None  # exact: |sums| < 2**53
        del a, b
        for kern in kernels:
            _C.cuda_set_kernel(kern)
            try:
                ok = bool(torch.equal(ops.mpgemm(pa, pb).long(), ref)) if verify else None
                t, mode = time_fn(lambda: ops.mpgemm(pa, pb))  # int32 out, like torch._int_mm
            except Exception as e:
                row["candidates"].append({"name": f"soniq W{wb}A{wa} [{kern}]", "s": None, "note": str(e)[:120]})
                continue
            finally:
                _C.cuda_set_kernel("auto")
            row["candidates"].append({"name": f"soniq W{wb}A{wa} [{kern}]", "s": t, "mode": mode, "exact": ok,
                                      "bytes": packed_bytes, "bits": wb * wa})
        if M <= 16:  # what a packed layer pays per call: float activations quantized and packed first
            row["candidates"] += from_float_candidates(M, K, wb, wa, sa, pb, packed_bytes)
        del ref
        del pa, pb
        torch.cuda.empty_cache()

    for c in row["candidates"]:
        if c.get("s"):
            c["gops"] = ops_count / c["s"] / 1e9
            c["x_fp16"] = t_fp16 / c["s"]
            c["x_int8"] = (t_int8 / c["s"]) if t_int8 else None
            if peaks:
                fp16_peak, int8_peak, bw = peaks
                peak = fp16_peak if "FP16" in c["name"] else int8_peak
                c["frac_peak_ops"] = c["gops"] / (peak * 1e3)
                if "bytes" in c:
                    c["frac_peak_bw"] = c["bytes"] / c["s"] / (bw * 1e12)
            if popc_tops and c.get("bits", 99) <= 4:  # bit-serial territory: against the popcount ceiling
                c["frac_popc_peak"] = c["gops"] / (popc_tops * 1e3 / c["bits"])
    results.append(row)
    return row


def markdown(meta, results):
    lines = [f"# soniq GPU mpgemm vs cuBLAS on {meta['gpu']}", "",
             f"soniq {meta['soniq']}, torch {meta['torch']}, CUDA {meta['cuda']}, archs {meta['soniq_archs']}; "
             f"peaks used: {meta['peaks_name']} {meta['peaks']} (FP16 TFLOP/s, INT8 TOP/s, TB/s). "
             "Times are medians of CUDA-event timings over graph replays; ops = 2*M*N*K. "
             f"Popcount ceiling (W1A1, divided by a*b bits for WbAa): {meta.get('popc_peak_tops') or '-'} TOP/s.", ""]
    for r in results:
        lines += [f"## M={r['M']} N={r['N']} K={r['K']}", "",
                  "| candidate | time (us) | GOP/s | x cuBLAS FP16 | x cuBLAS INT8 | frac. peak ops | frac. peak BW "
                  "| frac. popc peak | exact | notes |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for c in r["candidates"]:
            if not c.get("s"):
                lines.append(f"| {c['name']} | - | - | - | - | - | - | - | | {c.get('note', '')} |")
                continue
            f = lambda v, fmt: (fmt % v) if v is not None else "-"  # noqa: E731
            mode = "" if c.get("mode") in ("graph", "eager") else c.get("mode", "")
            notes = "; ".join(x for x in (c.get("note", ""), mode) if x)
            lines.append(f"| {c['name']} | {c['s'] * 1e6:.1f} | {c['gops']:.0f} | {c['x_fp16']:.2f} | "
                         f"{f(c.get('x_int8'), '%.2f')} | {f(c.get('frac_peak_ops'), '%.3f')} | "
                         f"{f(c.get('frac_peak_bw'), '%.3f')} | {f(c.get('frac_popc_peak'), '%.3f')} | "
                         f"{c.get('exact', '')} | {notes} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None, default_out: str = ".") -> dict:
    """Runs the benchmark; returns the saved document {"meta", "results"}."""
    ap = argparse.ArgumentParser(prog="soniq bench gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes (4096) for a fast check")
    ap.add_argument("--no-verify", action="store_true", help="skip the exactness check against fp64 matmul")
    ap.add_argument("--out", default=default_out, help=f"folder for the JSON and markdown (default {default_out})")
    args = ap.parse_args(argv)
    if not _C.built_with_cuda:
        raise RuntimeError("soniq bench gpu: this soniq was built without CUDA (reinstall with nvcc on PATH)")
    if not torch.cuda.is_available():
        raise RuntimeError("soniq bench gpu: no CUDA device is available to torch "
                           "(torch.cuda.is_available() is False)")
    name = torch.cuda.get_device_name()
    peaks_name, peaks = gpu_peaks(name)
    S = 4096 if args.quick else 8192
    meta = {"gpu": name, "peaks_name": peaks_name, "peaks": peaks, "soniq": soniq.__version__,
            "soniq_archs": _C.cuda_archs(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": platform.node(), "capability": list(torch.cuda.get_device_capability()),
            "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    meta["popc_peak_tops"] = popc_peak_tops(peaks_name, meta["sms"])
    results = []
    # (w bits, a bits, w signed, a signed, kernels to time); 'auto' is what users get
    gemv_cfgs = [(2, 8, True, True, ["auto", "gemv", "mma", "int8mm"]),
                 (4, 8, True, True, ["auto", "gemv", "mma", "int8mm"]),
                 (1, 1, True, True, ["auto", "bmma"]), (4, 4, True, True, ["auto", "mma", "mma4"])]
    gemm_cfgs = [(8, 8, True, True, ["auto", "mma"]), (4, 4, True, True, ["auto", "mma", "mma4", "bmma"]),
                 (2, 2, True, True, ["auto", "popc", "bmma"]), (1, 1, True, True, ["auto", "popc", "bmma"])]
    for M, N, K, cfgs in [(1, S, S, gemv_cfgs), (16, S, S, gemv_cfgs), (S, S, S, gemm_cfgs)]:
        r = bench_shape(M, N, K, cfgs, peaks, results, verify=not args.no_verify, popc_tops=meta["popc_peak_tops"])
        for c in r["candidates"]:
            t = f"{c['s'] * 1e6:9.1f} us  x_fp16 {c['x_fp16']:.2f}" if c.get("s") else c.get("note", "")
            print(f"M={M:5d} N={N} K={K}  {c['name']:<48s} {t}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    (out / f"gpu_gemm_{tag}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / f"gpu_gemm_{tag}.md").write_text(markdown(meta, results))
    print(f"wrote {out}/gpu_gemm_{tag}.json and .md")
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
