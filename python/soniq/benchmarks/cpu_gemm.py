"""CPU GEMM/GEMV benchmark: soniq packed kernels against INT8/float baselines, one process.

    soniq bench cpu [--quick] [--out DIR] [--json]   # or: python bench/cpu_gemm.py (saves to bench/results)

soniq is timed through the user's path: a PackedLinear forward (float32 activations in, float32
out), with the packed kernel alone (activations packed beforehand) as a secondary column.
Prints the CPU model and ISA, GOP/s (a multiply-add = 2 ops), ratios to the baselines
measured here (best INT8 = the faster of FBGEMM dynamic-quantized Linear and oneDNN
torch._int_mm at that shape), and the fraction of the machine's limit (int8 or popcount
peak for GEMM, memory bandwidth for GEMV). Saves cpu_gemm_<cpu>-<best isa>[-as-<forced isa>].json/.md under --out.
Then the MiniLM model (shape name "minilm", soniq/benchmarks/cpu_model.py): packed layers
inside the forward vs alone, end to end vs FP32, bf16 and INT8: cpu_model_<cpu>-<best isa>[-as-<forced isa>].json/.md.
Timings are medians over repeats after warm-up; nothing here is a test.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import statistics
import time

import numpy as np
import torch

import soniq
from soniq import ops

FULL_SHAPES = {"gemm": (2048, 2048, 2048), "gemm_minilm_m16": (16, 1536, 384), "gemm_minilm_m128": (128, 1536, 384),
               "gemm_minilm_m128_ffn2": (128, 384, 1536), "gemm_minilm_m2048": (2048, 1536, 384),
               "gemv_8k": (1, 8192, 8192), "gemv_14k": (1, 14336, 4096), "m16": (16, 4096, 4096)}
COLD_MAX_M = 4  # GEMV rows: timed with the weights in DRAM (measure(cold=True))
QUICK_SHAPES = {"gemm": (256, 256, 512), "gemv_4k": (1, 4096, 4096), "m16": (16, 1024, 1024)}
CONFIGS = [(1, 1), (2, 2), (4, 4), (1, 8), (2, 8), (4, 8), (8, 8)]  # (weight bits, activation bits)
TARGETS = [  # (shape kind, method, baseline, minimum ratio)
    ("gemv", "W1A8", "best INT8", 7.3), ("gemv", "W2A8", "best INT8", 3.5), ("gemv", "W2A8", "ORT 2-bit", 1.2),
    ("gemv", "W4A8", "best INT8", 1.8), ("gemv", "W4A8", "ORT 4-bit", 1.1), ("gemv", "W8A8", "best INT8", 1.0),
    ("gemm", "W4A8", "best INT8", 1.0), ("gemm", "W8A8", "best INT8", 1.0),
    ("gemv", "mixed 25% W4 / 75% W2, A8", "best INT8", 2.8), ("gemm", "W1A1", "best INT8", 8.0),
    ("gemm", "W2A2", "best INT8", 0.8), ("gemm", "W4A4", "best INT8", 0.8)]
# Where issue 13 sets another minimum for an ISA: W1A1 >= 1.0x the best INT8 on AMX machines
# (8x is the AVX2-only target, where INT8 runs at the vpmaddubsw rate and popcounts win)
TARGET_BY_ISA = {"amx": {("gemm", "W1A1", "best INT8"): 1.0}}


# ---- machine ---------------------------------------------------------------------------
def cpu_report() -> dict:
    info = soniq.info(verbose=False)
    mhz = None
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"cpu MHz\s*:\s*([\d.]+)", f.read())
            mhz = float(m.group(1)) if m else None
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"model": info["cpu"]["model"], "vendor": info["cpu"]["vendor"], "features": info["cpu"]["features"],
            "isa": info["isa"]["active"], "supported_isas": info["isa"]["supported"], "mhz": mhz,
            "logical_cpus": os.cpu_count(), "load_avg_1min_at_start": load}


def peaks(cpu: dict, threads: int) -> dict:
    """Instruction-throughput limits (ops/s, a MAC = 2 ops) the kernels are held to: the active
    path's inner-loop instructions timed on one core of this CPU (soniq._C.measure_peaks) times
    the threads, where the path has a probe; else a nominal figure from /proc/cpuinfo's clock,
    which is not the clock the cores run at (an EPYC Zen 5 VM reports 2.6 GHz and runs at ~4.2).
    The probe runs on all the threads at once (the native call releases the GIL), so cores that
    share vector units or a power budget count as they run together."""
    import threading

    from soniq._native import _C

    got = [None] * threads
    runs = [threading.Thread(target=lambda i=i: got.__setitem__(i, _C.measure_peaks(0.3))) for i in range(threads)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    if got[0] is not None:
        return {"source": f"measured: {got[0]['isa']} probe on {threads} threads at once",
                "int8_ops": 2 * sum(r["int8_macs_per_s"] for r in got),
                "popcount_ops": 2 * sum(r["popcount_bits_per_s"] for r in got), "w1a1_on_tiles": False}
    ghz = (cpu["mhz"] or 2000.0) / 1000.0
    avx512 = cpu["isa"] in ("avx512", "amx", "amx_emu")
    # vpdpbusd zmm x2 / vpmaddubsw ymm x2 per cycle; AMX: one TDPBUSD (16x16x64) per 16 cycles
    int8_macs = 1024 if cpu["isa"] == "amx" else 128 if avx512 else 64
    bit_macs = 512 if avx512 else 85.3          # vpopcntq zmm / (and+popcnt+add on 4 ALUs) x 64 bits
    return {"source": f"nominal: {ghz:.2f} GHz from /proc/cpuinfo", "ghz": ghz,
            "int8_ops": 2 * int8_macs * ghz * 1e9 * threads,
            "popcount_ops": 2 * bit_macs * ghz * 1e9 * threads,
            # AMX runs W1A1 GEMM on the tiles (cpp/kernels_amx.h amx_pair_thresholds), not popcounts
            "w1a1_on_tiles": cpu["isa"] == "amx"}


def memory_bandwidth(threads: int) -> float:
    """Bytes/s of a large copy (read + write), the GEMV limit."""
    x = torch.empty(64 * 2**20, dtype=torch.float32).uniform_()
    y = torch.empty_like(x)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        ts.append(time.perf_counter() - t0)
    return 2 * x.numel() * 4 / min(ts)


EVICT_BYTES = 64 * 2**20  # twice the largest L3 seen on these machines (32 MiB)


def evict_caches(_buf=[]):
    """Reads a buffer larger than the last-level cache: what the next call reads comes from
    DRAM, as a decoding LLM's weights do (each layer's weights are read once per token, after
    all the other layers' evicted them). Read, not written: dirty lines would be written back
    while the timed call streams its weights, halving the bandwidth it sees."""
    if not _buf:
        _buf.append(np.ones(EVICT_BYTES // 4, np.float32))
    # numpy, one thread: the thread pools the timed calls use (torch's OpenMP team, soniq's,
    # ONNX Runtime's) are left as the previous call left them
    float(_buf[0].sum())


def measure(methods: dict, quick: bool, cold: bool = False) -> dict:
    """Median seconds per call of each method. Methods are measured in interleaved rounds
    (each round: one warm-up call, then the best of two timed calls per method), so a load
    change on a shared machine hits every method alike and the ratios stay fair. The order
    is shuffled per round (seeded): a method that always ran right after ONNX Runtime took
    up to 2x longer there (its arena frees and trims the heap, so the next method's fresh
    outputs page-fault back in), which a fixed order pinned on one row. cold: the
    caches are evicted before every timed call (GEMV: otherwise a weight that fits the L3 --
    8192^2 at 1-2 bits, and its 4-bit ONNX Runtime twin -- would be read from it, not DRAM)."""
    first = {}
    for k, fn in methods.items():
        t0 = time.perf_counter()
        fn()
        first[k] = time.perf_counter() - t0
    rounds, calls = (2, 1) if quick else (5, 2)
    times = {k: [] for k in methods}
    for rnd in range(rounds):
        order = list(methods.items())
        random.Random(rnd).shuffle(order)
        for k, fn in order:
            if first[k] > 1.0 and rnd > 0:  # a pathologically slow baseline: one timed call is enough
                continue
            fn()
            best = float("inf")
            for _ in range(calls):
                if cold:
                    evict_caches()
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            times[k].append(best)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- baselines -------------------------------------------------------------------------
def baselines(M, N, K, x, w, threads) -> tuple[dict, dict]:
    """(callables, notes): notes explain baselines that cannot run here."""
    res, notes = {}, {}
    lin = torch.nn.Linear(K, N, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
        res["torch fp32"] = lambda: lin(x)
        xb, lb = x.bfloat16(), torch.nn.Linear(K, N, bias=False).to(torch.bfloat16)
        lb.weight.copy_(w.bfloat16())
        res["torch bf16"] = lambda: lb(xb)
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        res["FBGEMM INT8 (dynamic Linear)"] = lambda: q(x)
    a8 = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    b8 = torch.randint(-128, 128, (K, N), dtype=torch.int8)
    try:
        torch._int_mm(a8, b8)
        res["oneDNN INT8 (torch._int_mm)"] = lambda: torch._int_mm(a8, b8)
    except (RuntimeError, AttributeError) as e:
        notes["oneDNN INT8 (torch._int_mm)"] = f"n/a: {str(e).splitlines()[0][:80]}"
    for bits in (2, 4, 8):
        try:
            sess = ort_matmulnbits(N, K, w.numpy(), bits, threads)
            xn = x.numpy()
            sess.run(None, {"A": xn})
            res[f"ORT MatMulNBits {bits}-bit"] = (lambda s_: lambda: s_.run(None, {"A": xn}))(sess)
        except Exception as e:  # missing onnxruntime or an unsupported bit width: say so
            notes[f"ORT MatMulNBits {bits}-bit"] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return res, notes


def ort_matmulnbits(N, K, w, bits, threads, block=128):
    """An ONNX Runtime session with one com.microsoft MatMulNBits node, weights quantized
    symmetric per block of 128 (default zero point 2^(bits-1)) and packed little-endian."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nblk = (K + block - 1) // block
    wp = np.zeros((N, nblk * block), np.float32)
    wp[:, :K] = w
    wb = wp.reshape(N, nblk, block)
    qmax = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(wb).max(-1), 1e-8) / qmax
    q = (np.clip(np.round(wb / scale[..., None]), -qmax - 1, qmax) + 2 ** (bits - 1)).astype(np.uint32)
    per = 8 // bits
    q = q.reshape(N, nblk, block // per, per)
    packed = np.zeros(q.shape[:3], np.uint32)
    for i in range(per):
        packed |= q[..., i] << (i * bits)
    packed = packed.astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=bits, block_size=block, accuracy_level=4)
    graph = helper.make_graph(
        [node], "mmnb", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        [helper.make_tensor("B", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True),
         helper.make_tensor("scales", TensorProto.FLOAT, [N * nblk], scale.astype(np.float32).ravel().tobytes(),
                            raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # no spinning after a run: measurements are interleaved with other libraries' calls
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# ---- soniq -----------------------------------------------------------------------------
def quantize_acts(x, bits):
    """Float activations -> signed codes + one scale (symmetric), then packed."""
    if bits == 1:
        return torch.where(x >= 0, 1, -1).to(torch.int8), float(x.abs().mean())
    qmax = 2 ** (bits - 1) - 1
    s = float(x.abs().max()) / qmax
    return torch.clamp(torch.round(x / s), -qmax - 1, qmax).to(torch.int8), s


def weight_codes(w, bits_per_row):
    """Per-output-channel symmetric quantization to each row's bit width."""
    b = bits_per_row.view(-1, 1).float()
    qmax = torch.where(b == 1, torch.ones_like(b), 2 ** (b - 1) - 1)
    s = w.abs().amax(1, keepdim=True) / qmax
    q = torch.where(b == 1, torch.where(w >= 0, 1.0, -1.0), torch.clamp(torch.round(w / s), -qmax - 1, qmax))
    return q.to(torch.int8), s.view(-1)


def packed_linear(pw, a_bits, a_scale, K):
    """The user's path: a PackedLinear over the packed weight (float32 x in, float32 out), as
    soniq.convert makes it: on the CPU the layer keeps the weight as its
    execution layout and runs the fused native forward (cpp/linear.cpp), unless its smallest
    bit pair runs bit-serially (then quantize_pack + mpgemm, the general path)."""
    from soniq._packed_nn import PackedLinear

    return PackedLinear(pw, torch.full((K,), a_bits), torch.full((K,), float(a_scale)), True, None)


def layer_path(layer) -> str:
    return "fused native" if layer._fused_plan() is not None else "quantize_pack + mpgemm"


def soniq_methods(M, N, K, x, w) -> tuple[dict, dict]:
    """(callables, paths): 'soniq <cfg>' is the PackedLinear forward on the float activations
    (the headline), 'soniq <cfg> kernel' the packed kernel alone (ops.mpgemm on activations
    packed beforehand), plus the mixed layer's parts (PackedLinear each). paths: which forward
    each layer runs."""
    res, paths = {}, {}
    gen = torch.Generator().manual_seed(0)
    mixed_rows = torch.full((N,), 2, dtype=torch.int64)
    mixed_rows[torch.randperm(N, generator=gen)[: N // 4]] = 4
    cases = [(f"W{wb}A{ab}", torch.full((N,), wb, dtype=torch.int64), ab) for wb, ab in CONFIGS]
    cases.append((MIXED, mixed_rows, 8))
    if N % TIER_GROUP == 0:  # the same mix, tiers per group of channels (PTQConfig.tier_group): no merge
        grouped = torch.full((N // TIER_GROUP,), 2, dtype=torch.int64)
        grouped[torch.randperm(N // TIER_GROUP, generator=gen)[: N // TIER_GROUP // 4]] = 4
        cases.append((MIXED_GROUPED, grouped.repeat_interleave(TIER_GROUP), 8))
    n4 = int((mixed_rows == 4).sum())
    cases += [(MIXED + " part W4", torch.full((n4,), 4), 8), (MIXED + " part W2", torch.full((N - n4,), 2), 8)]
    for name, wbits, ab in cases:
        rows = wbits.numel()
        wq, ws = weight_codes(w[:rows], wbits)
        aq, s = quantize_acts(x, ab)
        # the layer drops its weight's planes (keeps the layout): its own copy, so the kernel
        # row below runs the plain mpgemm operand as before
        layer = packed_linear(ops.pack(wq, wbits, signed=True, axis=0, scale=ws), ab, s, K)
        res["soniq " + name] = (lambda l_: lambda: l_(x))(layer)
        paths["soniq " + name] = layer_path(layer)
        if "part" not in name:
            pw = ops.pack(wq, wbits, signed=True, axis=0, scale=ws)
            pa = ops.pack(aq, ab, signed=True, scale=s)
            res["soniq " + name + " kernel"] = (lambda pa_, pw_: lambda: ops.mpgemm(pa_, pw_))(pa, pw)
    return res, paths


MIXED = "mixed 25% W4 / 75% W2, A8"
TIER_GROUP = 8  # as the MiniLM demo (soniq.demos.minilm_ptq.TIER_GROUP)
MIXED_GROUPED = f"mixed 25% W4 / 75% W2 per {TIER_GROUP} channels, A8"


# ---- report ----------------------------------------------------------------------------
def summarize(shape_name, M, N, K, times, notes, pk, bw, paths=None) -> dict:
    ops_n = 2.0 * M * N * K
    int8 = {k: v for k, v in times.items() if "INT8" in k}
    best_name = min(int8, key=int8.get) if int8 else None
    best = int8.get(best_name) if best_name else None
    is_gemv = M == 1
    rows = []

    def limit(method, t, wbits):
        if is_gemv:  # weight bytes streamed per call against memory bandwidth
            return (N * K * wbits / 8 / t) / bw
        m = re.match(r"soniq W(\d)A(\d)$", method)
        if m and int(m.group(1)) * int(m.group(2)) == 1 and not pk.get("w1a1_on_tiles"):
            return ops_n / t / (pk["popcount_ops"] / (int(m.group(1)) * int(m.group(2))))
        return ops_n / t / pk["int8_ops"]

    for k, v in times.items():
        if k.startswith("soniq") and (k.endswith(" kernel") or " part " in k):
            continue
        if k.startswith("soniq"):
            m = re.match(r"soniq W(\d)A", k)
            wbits = int(m.group(1)) if m else 2.5
        else:
            wbits = {"torch fp32": 32, "torch bf16": 16}.get(k, 8)
            m = re.search(r"(\d)-bit", k)
            wbits = int(m.group(1)) if m else wbits
        r = {"method": k, "ms": v * 1e3, "gops": ops_n / v / 1e9, "vs_best_int8": best / v if best else None,
             "limit_frac": limit(k, v, wbits)}
        if k.startswith("soniq"):
            r["path"] = (paths or {}).get(k)
            kern = times.get(k + " kernel")
            if kern:
                r["ms_kernel"] = kern * 1e3
                r["vs_best_int8_kernel"] = best / kern if best else None
            for bits in (2, 4, 8):
                o = times.get(f"ORT MatMulNBits {bits}-bit")
                if o:
                    r[f"vs_ort_{bits}bit"] = o / v
            if k == "soniq " + MIXED:
                parts = times["soniq " + MIXED + " part W4"] + times["soniq " + MIXED + " part W2"]
                r["sum_of_parts_ms"] = parts * 1e3
                r["mixed_over_sum_of_parts"] = v / parts
        rows.append(r)
    for k, note in notes.items():
        rows.append({"method": k, "note": note})
    return {"shape": shape_name, "M": M, "N": N, "K": K, "best_int8": best_name, "rows": rows}


# AVX2 (no vpdpbusd): the same weight execution layout as AVX-512, decoded 32 bytes at a time;
# vpmaddubsw + vpmaddwd per 32 products (exact: weight codes <= 63 per operand, so 7- and 8-bit
# codes are two operands), with exact int16 runs of n vpmaddubsw per vpmaddwd in the GEMM where
# the codes allow. Runs saved before these kernels (the table-lookup and plane-expansion paths)
# carry their own reasons in their files.
_GEMV_WHY = ("GEMV on AVX2 streams the weight execution layout once (codes at b bits, 16-row tiles, decoded in "
             "registers by a load + shift + and per 32 codes), 2 multiply-port operations per 32 products "
             "(vpmaddubsw + vpmaddwd; 7- and 8-bit codes as two operands). Weights come from DRAM (caches "
             "evicted before each call): W2A8 and up are bounded by that read; W1A8 also by the multiply ports "
             "(32 products per 2 operations against 64 per vpdpbusd on AVX-512), and 7.3x over a memory-bound "
             "INT8 GEMV needs the 1-bit read in a seventh of INT8's time, which a cold call does not reach.")
_MIXED_WHY = ("one call runs both tiers (its time is about the sum of its W4A8 and W2A8 parts, see "
              "sum_of_parts), each limited as in its own row.")
# Reasons by shape kind (GEMV rows: M <= 4; GEMM rows) and method: AVX2 here, per ISA below.
MISS_REASONS = {
    "gemv": {"W1A8": _GEMV_WHY, "W2A8": _GEMV_WHY, "W4A8": _GEMV_WHY, "W8A8": _GEMV_WHY, "mixed": _MIXED_WHY},
    "gemm": {
        "W4A8": "vpmaddubsw with exact int16 runs (4 groups per vpmaddwd for 4-bit weights and 8-bit activations): "
                "1.25 multiply-port operations per 32 products, the rate of FBGEMM's AVX2 int8 kernel; on an AVX2 "
                "CPU a 4-bit layer can at best match INT8 in the kernel.",
        "W8A8": "8-bit codes are two operands (their nibbles, for exactness), so the kernel does twice the "
                "vpmaddubsw work of FBGEMM's AVX2 kernel (which keeps pairs in int16 with 7-bit activations).",
        "W1A1": "bit-serial with scalar popcnt runs at ~290 GOP/s per core (3x4 register block, ~60 binary MACs/cycle "
                "against ~85 for and+popcnt+add on 4 integer ALUs), while FBGEMM INT8 reaches ~150 GOP/s per core. "
                "8x INT8 is above the AVX2 popcount limit (~1.7x at best).",
        "W2A2": "layout GEMM with exact int16 runs (8 groups per vpmaddwd for 2-bit codes): the vpmaddubsw rate is "
                "the limit, the same for any weight width up to 6 bits.",
        "W4A4": "layout GEMM with exact int16 runs: the vpmaddubsw rate is the limit, the same for any weight width "
                "up to 6 bits.",
    }}


_LOAD_NOTE = ("Measured on a shared 2-core machine (load average in the header): 2-thread wall times of every "
              "method, the baselines included, moved by up to 10x between rounds, so single ratios here can be off "
              "by far more than the kernels' differences; the README gives one-thread CPU-time ratios measured "
              "the same way for all methods. ")
_GEMV_WHY_AVX512 = (
    _LOAD_NOTE + "GEMV on AVX-512 streams the weight execution layout once (codes at b bits, 4 tiles of 16 rows "
    "per pass, decoded in registers: one load + shift + and per 4 codes x 16 rows, vpdpbusd), timed with the "
    "weights coming from DRAM (caches evicted before each call). There the limit is the DRAM read of one cold "
    "call, and the smaller the read the less of the bandwidth it reaches: on this machine (2 threads, quiet) "
    "a plain torch sum over as many bytes, caches evicted the same way, takes 0.42-0.44 ms for 7.3 MB (17 GB/s), "
    "0.53-0.55 ms for 14.7 MB, 0.80-0.84 ms for 29 MB and 2.3 ms for 59 MB, against soniq's W1A8 0.50 ms, W2A8 "
    "0.49-0.53, W4A8 0.86-1.0 and W8A8 1.9-2.0 ms on 14336x4096 (FBGEMM INT8 ~2.4-2.7 ms). So W2A8 and up "
    "run at the read ceiling, W1A8 within 1.2x of it, and 7.3x over a memory-bound INT8 GEMV would need a "
    "1-bit weight read in a seventh of INT8's time, where this memory system gives ~6x for a cold 7.3 MB read "
    "(fixed ramp-up per call). With the weight in L3 (8 MiB at 1 bit fits it) W1A8 reaches 9-10x. What is left "
    "on the kernel side: the 1-bit kernel is compute-bound when warm (8 and + 8 vpdpbusd per 64 weight bytes; "
    "a table-lookup kernel over groups of 4 activations, T-MAC style, would halve that).")
_GEMM_WHY_AVX512 = (
    _LOAD_NOTE + "GEMM runs vpdpbusd on B tiles decoded once per 64 columns (by the first 6-row strip, in "
    "the shadow of its vpdpbusd; 8-bit weights read in place) through a 6x64 register block of 24 "
    "accumulators, the instruction oneDNN's torch._int_mm uses here (it takes int8 inputs and returns int32: "
    "no activation quantization, no float epilogue). soniq's int8 products cost the same for 2, 4 or 8-bit "
    "weights, so these targets are bounded by the int8 rate (the 'limit' column: this CPU's vpdpbusd rate, "
    "measured). Zen 4 (one zmm vpdpbusd per cycle, 467 GOP/s per core): the block within a few % of the peak; "
    "same process, quiet, PackedLinear vs _int_mm, uniform W4 / W4-W2 tiers per channel: 2048^3 0.96x / 0.92x "
    "(1 thread), 128x1536x384 0.90x / 0.83x, 4096x1536x384 0.80x / 0.73x. Zen 5 (two per cycle, 4-cycle "
    "latency, ~1.1 TOP/s per core): one thread, 128x1536x384, the block at ~91% of the peak, the exact "
    "double epilogue 10% of the profile, the per-token quantization 1%; _int_mm runs at 84-90% of the peak "
    "there, so soniq's 0.85-0.93x is its float work around the same products. At K = 384 the epilogue is "
    "a fixed cost per output (~8-10% of a layer); interleaved per-channel tiers add the column merge "
    "(1.1-1.3x one tier), which tiers per group of 8 or 16 channels (PTQConfig(tier_group=8)) remove. AMX "
    "(not on this CPU) would lift the int8 rate.")
MISS_REASONS_BY_ISA = {"avx512": {
    "gemv": {"W1A8": _GEMV_WHY_AVX512, "W2A8": _GEMV_WHY_AVX512, "W4A8": _GEMV_WHY_AVX512,
             "W8A8": _GEMV_WHY_AVX512, "mixed": _MIXED_WHY},
    "gemm": {"W4A8": _GEMM_WHY_AVX512, "W8A8": _GEMM_WHY_AVX512, "W2A2": _GEMM_WHY_AVX512,
             "W4A4": _GEMM_WHY_AVX512,
             "W1A1": _LOAD_NOTE + "vpopcntq bit-serial (from 4 rows: weight words interleaved 8 columns per "
                     "vector, one and + popcount + add per 8 outputs and K word, no horizontal sums); the "
                     "popcount/int8 peak ratio of this CPU is 4x, so 8x of a VNNI INT8 baseline is out of reach (the "
                     "8x target is for AVX2-only machines). At K = 384 a call is short (6 K words per output): the "
                     "layer's Python path (quantize_pack to planes, then mpgemm; 1x1 layers keep their planes, so "
                     "no fused forward) and the driver's per-tile passes (totals started at the code-sum terms, the "
                     "float epilogue) weigh as much as the popcounts; a fused forward that quantizes straight to "
                     "planes would close part of it."}}}


_GEMV_WHY_AMX = (
    _LOAD_NOTE + "GEMV (<= 4 rows) on an AMX CPU runs the AVX-512 kernel: the weight execution layout streamed "
    "once (codes at b bits, 4 tiles of 16 rows per pass, decoded in registers, vpdpbusd), timed with the "
    "weights coming from DRAM (caches evicted before each call), so the limit is the DRAM read of one cold "
    "call ('limit' column: the fraction of the bandwidth measured in the header). W2A8 and up read at "
    "0.7-1.2x of that bandwidth figure; W1A8 reads 7.3 MB (14336x4096) or 8.4 MB (8192^2) per call, where a "
    "short cold read reaches less of the bandwidth than INT8's 59-67 MB, so 7.3x over the memory-bound INT8 "
    "GEMV would need the 1-bit weight read in a seventh of INT8's time. On the kernel side the 1-bit GEMV is "
    "compute-bound when warm (8 and + 8 vpdpbusd per 64 weight bytes); a table-lookup kernel over groups of 4 "
    "activations (T-MAC style) would halve that.")
_GEMM_WHY_AMX = (
    _LOAD_NOTE + "GEMM runs TDPBUSD on the tiles (2 A x 2 B tiles into 4 C tiles per 32 x 32, B decoded once "
    "per 64 columns, 8-bit weights read in place; calls of fewer than 16 rows on AVX-512), at the same "
    "fraction of the tile peak as oneDNN's torch._int_mm (2048^3, 2 threads, this session's runs: soniq "
    "2.4-2.8 TOP/s, _int_mm 2.3-2.5; both 22-27% of the nominal 1024 MACs/cycle per core on this VM). _int_mm takes int8 inputs and "
    "returns int32: no activation quantization, no float output. soniq's float work around the products "
    "is what it loses by at K = 384-1536, where the products are short: one thread, 2048 x 1536 x 384 8-bit, "
    "products and decode 58% of the profile, the exact double epilogue 28%, the per-row activation "
    "quantization 6.5%; at M = 128 the epilogue, the quantization and ~5 us of Python per call are each "
    "about as costly as the tile products; at M = 16 (one A tile) the weight decode is paid for 16 rows. "
    "Every weight width runs at the int8 tile rate (1-bit included: popcounts are slower than the tiles "
    "here), so W1A1 equals W4A8 and W8A8. What would close it: a float32 epilogue (about half the "
    "epilogue's cost, but a change of every path's rounding), and fewer passes over the activations.")
MISS_REASONS_BY_ISA["amx"] = {
    "gemv": {"W1A8": _GEMV_WHY_AMX, "W2A8": _GEMV_WHY_AMX, "W4A8": _GEMV_WHY_AMX, "W8A8": _GEMV_WHY_AMX,
             "mixed": _MIXED_WHY},
    "gemm": {"W4A8": _GEMM_WHY_AMX, "W8A8": _GEMM_WHY_AMX, "W1A1": _GEMM_WHY_AMX, "W2A2": _GEMM_WHY_AMX,
             "W4A4": _GEMM_WHY_AMX}}


def targets_table(results, isa: str = "avx2") -> list:
    out = []
    for kind, method, base, need in TARGETS:
        need = TARGET_BY_ISA.get(isa, {}).get((kind, method, base), need)
        reasons = {**MISS_REASONS[kind], **MISS_REASONS_BY_ISA.get(isa, {}).get(kind, {})}
        for s in results:
            if not s["shape"].startswith(kind):
                continue
            row = next((r for r in s["rows"] if r["method"] == "soniq " + method), None)
            if row is None:
                continue
            if base == "best INT8":
                got = row.get("vs_best_int8")
            else:
                got = row.get(f"vs_ort_{base.split()[1].split('-')[0]}bit")
            ok = got is not None and got >= need
            key = "mixed" if method.startswith("mixed") else method
            out.append({"shape": s["shape"], "method": method, "baseline": base, "target": need,
                        "ratio": got, "met": ok, "why_missed": None if ok else reasons.get(key)})
    return out


def _soniq_mode(results) -> str:
    """What the soniq rows time (saved runs from before the PackedLinear rows say so too)."""
    rows = [r for s in results for r in s["rows"] if r["method"].startswith("soniq")]
    if rows and not any("path" in r for r in rows):
        return ("soniq ms = packed kernel (activations already packed; a run saved before the soniq rows timed "
                "the PackedLinear forward)")
    bitserial = sorted({r["method"][6:] for r in rows if r.get("path") == "quantize_pack + mpgemm"})
    return ("soniq ms = the user's path: a PackedLinear forward, float32 activations in, float32 out, built "
            "from the same packed weight (per-output-channel scales) with one static activation scale; "
            "'fused native' is its one-call CPU forward (activations quantized straight to the layout kernels' "
            "bytes, epilogue in the kernel); "
            + (f"{', '.join(bitserial)} keep their bit planes (their smallest bit pair runs bit-serially here: keep_planes_max_pairs) "
               "and run quantize_pack + mpgemm. " if bitserial else "")
            + "'kernel alone' = ops.mpgemm on activations packed beforehand (no quantization, int32 out "
            "scaled to float). Signed 1-bit activations (W1A1) are +-1 with one scale; the PackedLinear "
            "quantizer rounds them as the packed modules do.")


def markdown(meta, results, targets) -> str:
    L = [f"# soniq CPU GEMM benchmark ({meta['cpu']['model']})", "",
         f"- date {meta['date']}, soniq {meta['soniq']}, torch {meta['torch']}, onnxruntime {meta['onnxruntime']}",
         f"- ISA {meta['cpu']['isa']} (supported {', '.join(meta['cpu']['supported_isas'])}); "
         f"{meta['threads']} threads; {meta['cpu']['mhz']} MHz nominal",
         f"- limits: int8 {meta['peaks']['int8_ops']/1e9:.0f} GOP/s, popcount {meta['peaks']['popcount_ops']/1e9:.0f} "
         f"GOP/s (1x1-bit; {meta['peaks'].get('source', 'nominal')}), memory bandwidth {meta['bandwidth_gbs']:.1f} "
         "GB/s (copy; streaming reads reach more, "
         "so GEMV fractions above 1 occur)",
         f"- machine load: 1-min load average {meta['cpu']['load_avg_1min_at_start']} at start, "
         f"{meta['load_avg_end']} at end on {meta['cpu']['logical_cpus']} logical CPUs"
         + (" -- the machine was shared with other jobs, so absolute numbers are noisy" if
            (meta['load_avg_end'] or 0) > 0.5 * meta['threads'] else ""),
         f"- mode: {'quick (small shapes)' if meta['quick'] else 'full'}; " + _soniq_mode(results),
         "- kernels chosen per block pair: bit-serial popcount for the smallest bit pairs (AVX2: 1x1, GEMV rows "
         "up to 1x2; AVX-512: products up to 3, B words interleaved 8 columns per vector from 4 rows; AMX: GEMV rows "
         "only, the tiles outrun popcounts), else kernels over the weight execution layout built once per weight "
         "(VNNI 4x16 tiles, codes at their bit width; GEMV decodes in registers, GEMM decodes each 64-column "
         "K block once into L1): vpdpbusd on AVX-512, TDPBUSD tiles on AMX, vpmaddubsw with exact int16 runs "
         "on AVX2.",
         "- methods are measured in interleaved rounds (median of rounds, best of 2 calls per round, a seeded shuffled order per round), so load "
         "changes hit all alike; a baseline slower than 1 s per call is timed once; GEMV shapes (M <= "
         f"{COLD_MAX_M}) with the caches evicted before every timed call (weights from DRAM, as in LLM "
         "decoding: a weight that fits the L3 would otherwise be read from it)", ""]
    for s in results:
        L += [f"## {s['shape']}: M={s['M']} N={s['N']} K={s['K']} (best INT8: {s['best_int8']})", "",
              "| method | ms | GOP/s | vs best INT8 | vs ORT 2/4/8-bit | limit frac | soniq forward | "
              "ms (kernel alone) | vs best INT8 (kernel alone) |",
              "|---|---:|---:|---:|---|---:|---|---:|---:|"]
        for r in s["rows"]:
            if "note" in r:
                L.append(f"| {r['method']} | {r['note']} | | | | | | | |")
                continue
            f = lambda v, p=2: "" if v is None else f"{v:.{p}f}"
            ort = "/".join(f(r.get(f"vs_ort_{b}bit")) or "-" for b in (2, 4, 8)) if "vs_ort_4bit" in r else ""
            extra = f" (sum of parts {r['sum_of_parts_ms']:.3f} ms, ratio {r['mixed_over_sum_of_parts']:.2f})" \
                if "sum_of_parts_ms" in r else ""
            L.append(f"| {r['method']}{extra} | {f(r['ms'], 3)} | {f(r['gops'], 1)} | {f(r['vs_best_int8'])} | "
                     f"{ort} | {f(r['limit_frac'])} | {r.get('path') or ''} | {f(r.get('ms_kernel'), 3)} | "
                     f"{f(r.get('vs_best_int8_kernel'))} |")
        L.append("")
    L += ["## Targets", "", "| shape | soniq | baseline | target | ratio | met | why missed / what would close it |",
          "|---|---|---|---:|---:|---|---|"]
    for t in targets:
        ratio = "" if t["ratio"] is None else f"{t['ratio']:.2f}"
        L.append(f"| {t['shape']} | {t['method']} | {t['baseline']} | {t['target']} | {ratio} | "
                 f"{'yes' if t['met'] else 'NO'} | {t['why_missed'] or ''} |")
    return "\n".join(L) + "\n"


def main(argv=None, default_out: str = ".") -> dict:
    """Runs the benchmark; returns the saved document {"meta", "results", "targets"}."""
    ap = argparse.ArgumentParser(prog="soniq bench cpu", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (CI smoke, < 1 min)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=default_out, help=f"folder for the JSON and markdown (default {default_out})")
    ap.add_argument("--shapes", help="comma-separated subset of the shapes (names as printed; 'minilm' = the "
                    "MiniLM model end to end)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the markdown (and targets) of a saved run")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        saved["targets"] = targets_table(saved["results"], saved["meta"]["cpu"]["isa"])
        with open(args.render, "w") as f:
            json.dump(saved, f, indent=1)
        with open(args.render[:-5] + ".md", "w") as f:
            f.write(markdown(saved["meta"], saved["results"], saved["targets"]))
        return saved
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    soniq.set_num_threads(args.threads)
    cpu = cpu_report()
    print(f"CPU: {cpu['model']} | ISA: {cpu['isa']} (supported {cpu['supported_isas']}) | threads {args.threads}")
    pk = peaks(cpu, args.threads)
    bw = memory_bandwidth(args.threads)
    print(f"limits: int8 {pk['int8_ops']/1e9:.0f} GOP/s, popcount {pk['popcount_ops']/1e9:.0f} GOP/s "
          f"({pk['source']}), memory {bw/1e9:.1f} GB/s")
    results = []
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    want = args.shapes.split(",") if args.shapes else None
    run_model = want is None or MODEL_SHAPE in want  # MiniLM end to end (cpu_model.py)
    if want:
        unknown = set(want) - set(shapes) - {MODEL_SHAPE}
        if unknown:
            ap.error(f"unknown shapes {sorted(unknown)}; choose from {list(shapes) + [MODEL_SHAPE]}")
        shapes = {k: v for k, v in shapes.items() if k in want}
    if not shapes:  # only the model: keep any saved GEMM results
        return {"meta": None, "results": [], "targets": [], "model": run_cpu_model(args)}
    for name, (M, N, K) in shapes.items():
        torch.manual_seed(0)
        x, w = torch.randn(M, K), torch.randn(N, K) / K ** 0.5
        methods, notes = baselines(M, N, K, x, w, args.threads)
        soniq_fns, paths = soniq_methods(M, N, K, x, w)
        methods.update(soniq_fns)
        times = measure(methods, args.quick, cold=M <= COLD_MAX_M)
        s = summarize(name, M, N, K, times, notes, pk, bw, paths)
        results.append(s)
        print(f"\n{name}: M={M} N={N} K={K}  (best INT8: {s['best_int8']})")
        for r in s["rows"]:
            if "note" in r:
                print(f"  {r['method']:<34} {r['note']}")
            else:
                vb = r["vs_best_int8"]
                kern = f"  kernel alone {r['ms_kernel']:.3f} ms" if "ms_kernel" in r else ""
                print(f"  {r['method']:<34} {r['ms']:9.3f} ms {r['gops']:8.1f} GOP/s  vs best INT8 "
                      f"{'' if vb is None else f'{vb:5.2f}x'}  limit {r['limit_frac']:.2f}{kern}")
    targets = targets_table(results, cpu["isa"])
    try:
        import onnxruntime
        ort_v = onnxruntime.__version__
    except ImportError:
        ort_v = None
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "soniq": soniq.__version__,
            "torch": torch.__version__, "onnxruntime": ort_v, "python": platform.python_version(),
            "threads": args.threads, "quick": args.quick, "cpu": cpu, "peaks": pk, "bandwidth_gbs": bw / 1e9,
            "load_avg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    os.makedirs(args.out, exist_ok=True)
    from soniq.benchmarks.cpu_model import result_slug

    slug = result_slug(cpu["model"], cpu["isa"], args.threads, args.quick)
    with open(os.path.join(args.out, f"cpu_gemm_{slug}.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "targets": targets}, f, indent=1)
    md = markdown(meta, results, targets)
    with open(os.path.join(args.out, f"cpu_gemm_{slug}.md"), "w") as f:
        f.write(md)
    print("\nTargets:")
    for t in targets:
        ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        print(f"  {t['shape']:<9} {t['method']:<28} vs {t['baseline']:<10} need {t['target']}x got {ratio} "
              f"{'ok' if t['met'] else 'MISS'}")
    print(f"saved {os.path.join(args.out, f'cpu_gemm_{slug}')}.json/.md")
    return {"meta": meta, "results": results, "targets": targets,
            "model": run_cpu_model(args) if run_model else None}


MODEL_SHAPE = "minilm"


def run_cpu_model(args) -> dict:
    """The MiniLM part: packed layers inside the model vs alone, and end to end vs FP32, bf16
    and INT8 (soniq/benchmarks/cpu_model.py; saved as cpu_model_<cpu>.json/.md)."""
    from . import cpu_model

    print(f"\nMiniLM-L6, seq {cpu_model.SEQ}, {args.threads} threads:")
    return cpu_model.run(args.threads, args.quick, args.out)


if __name__ == "__main__":
    main()
