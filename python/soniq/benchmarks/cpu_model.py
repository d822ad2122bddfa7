"""MiniLM-L6 on the CPU, one process: soniq's packed layers inside the model against the
same layers timed alone, and the model end to end against FP32, bf16, FBGEMM INT8 dynamic,
oneDNN INT8 dynamic (torch._int_mm, onednn_int8.py) and ONNX Runtime INT8 dynamic (batch 1
and 32, seq 128).

    soniq bench cpu [--quick] [--shapes minilm]   # or: python -m soniq.benchmarks.cpu_model

Inside / alone: forward hooks time every packed layer during the forward; then each layer
runs alone, back to back, on the input it saw in the forward. The ratio is the sum of the
per-layer medians inside over the sum alone (issue 13: <= 1.15). The packed model is the
demo's configuration (weights 4/6-bit tiers averaging 4.4 bits, 8-bit activations with
per-token dynamic scales) with its tiers allocated per group of 8 output channels by the
demo's PTQ on 64 sentences, rounded to nearest (packed_minilm): timing depends on the tiers, not on the
code values.
Saves cpu_model_<cpu>-<best isa>[-as-<forced isa>].json/.md (result_slug). Nothing here is a test.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import time

import torch
from torch import nn

import soniq
from soniq import _C
from soniq._fuse import call_in_block
from soniq.benchmarks.onednn_int8 import onednn_int8
from soniq.benchmarks.ort_int8 import ort_int8

SEQ = 128
INSIDE_TARGET = 1.15
# where the CPU has AMX (issue 13): end to end >= 1.3x the best INT8 runtime and >= 2x FP32
AMX_VS_BEST_INT8, AMX_VS_FP32 = 1.3, 2.0
INT8_METHODS = ("fbgemm_int8", "onednn_int8", "ort_int8")  # "best INT8" is the fastest of these
FULL = dict(batches=(1, 32), rounds={1: 7, 32: 5}, calls={1: 5, 32: 2}, backends=("auto", "pool"))
QUICK = dict(batches=(1, 32), rounds={1: 2, 32: 1}, calls={1: 2, 32: 1}, backends=("auto",))


# ---- models -----------------------------------------------------------------------------
def load_fp32():
    from soniq.demos.minilm import load_teacher

    return load_teacher()


def features(vocab: int, batch: int) -> dict:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1000, vocab, (batch, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


# calibration sentences for the benchmark's tier allocation: the demo's layer gains use 32
CALIB_SENTENCES, CALIB_BATCH = 64, 32


def packed_minilm(teacher):
    """The demo's saved model as it runs: its weights are trellis-coded at the tiers' widths
    (4.4 bits stored) and run as 8-bit rows (the codebook's int8 entries), so every layer is
    made with 8-bit rows here, its inputs rotated as the demo's (the quantize pass's Hadamard
    butterflies), with round-to-nearest codes in place of the demo's trellis (the code values
    do not change the speed; ~10 s instead of ~10 min). A demo saving on the uniform grid
    (minilm_ptq.SAVED without trellis_states_log2) runs its tiers instead: per group of 8
    output channels (minilm_ptq.TIER_GROUP), both tiers in every layer (the tiers' tail tiles);
    that model is built when the demo's recipe has no trellis."""
    import dataclasses

    from soniq.demos import minilm as demo, minilm_ptq
    from soniq.demos.text_corpus import train_heldout_split

    train, _ = train_heldout_split()
    cal = minilm_ptq.calibration(teacher, demo.tokenize(
        teacher, minilm_ptq.calibration_sentences(train, n=CALIB_SENTENCES), CALIB_BATCH))
    pal, target = ((8, 8), 8.0) if _saved_recipe().get("trellis_states_log2") else (demo.W_PALETTE, demo.W_TARGET)
    cfg = minilm_ptq.ptq_config("soniq", teacher, w_palette=pal, w_bits_target=target,
                                hadamard_block=demo.HADAMARD_BLOCK, tier_group=demo.TIER_GROUP)
    _, packed, _ = minilm_ptq.ptq_model(teacher, cal, dataclasses.replace(cfg, rounding="rtn"))
    return packed.eval()


def _demo_tier_group() -> int:
    from soniq.demos import minilm as demo

    return demo.TIER_GROUP


def _demo_hadamard_block() -> int:
    from soniq.demos import minilm as demo

    return demo.HADAMARD_BLOCK


def bf16_model(teacher):
    return copy.deepcopy(teacher).to(torch.bfloat16).eval()


# ---- packed layers inside the model vs alone ---------------------------------------------
class LayerTimer:
    """Per-call wall time of the packed layers and, while `record` is set, a copy of each
    layer's input. Only a copy, and only in a forward that is not timed: keeping the timed
    forwards' own inputs alive until the next forward (as a plain reference would) makes the
    allocator hand every forward other memory than the last one's, colder than in a user's model
    (measured: packed layers inside / alone at batch 1 1.34-1.44 with such references, 1.26-1.28
    without, same code, AMX). Timed by wrapping each layer's forward (an instance attribute),
    not by module hooks: a packed layer with hooks of its own does not take the GELU fused into
    it (soniq/_fuse.py), so hooks would time another model than the user's."""

    def __init__(self, layers):
        self.layers, self.times, self.inputs, self.record = layers, {}, {}, True
        for m in layers:
            m.forward = self._timed(m, type(m).forward.__get__(m))

    def _timed(self, m, forward):
        def timed(*args, **kwargs):
            if self.record:
                self.inputs[m] = args[0].clone()
            t0 = time.perf_counter()
            out = forward(*args, **kwargs)
            self.times.setdefault(m, []).append(time.perf_counter() - t0)
            return out
        return timed

    def take(self) -> dict:
        t, self.times = self.times, {}
        return t

    def remove(self):
        for m in self.layers:
            m.__dict__.pop("forward", None)


def encoder_linears(model, cls) -> list:
    """The Linear layers of the encoder (the 36 that soniq packs), of module class cls."""
    return [m for n, m in model.named_modules() if isinstance(m, cls) and ".encoder." in f".{n}."]


# Controls: the same measurement on the float and FBGEMM models' own Linear layers, in the
# same rounds. Any layer inside a model finds colder caches than one called back to back, so
# these say how much of soniq's ratio is the model's and how much soniq's own.
LAYER_LABELS = {"soniq": "soniq PackedLinear", "fp32": "FP32 nn.Linear", "fbgemm_int8": "FBGEMM INT8 dynamic Linear"}


def control_layers(fp32, fbgemm) -> dict:
    """{name: (model, layers)} of the control models (see LAYER_LABELS)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {"fp32": (fp32, encoder_linears(fp32, nn.Linear)),
            "fbgemm_int8": (fbgemm, encoder_linears(fbgemm, DynamicLinear))}


class _InsideAlone:
    """One model's side of inside_vs_alone: its timer and per-layer call times."""

    def __init__(self, model, layers):
        self.model, self.layers, self.timer = model, layers, LayerTimer(layers)
        self.inside, self.alone, self.sweep = ({m: [] for m in layers} for _ in range(3))
        self.per_round = []

    def round(self, feats: dict, calls: int) -> None:
        model, timer = self.model, self.timer
        timer.record = True  # one forward, not timed, records the layers' inputs
        model(dict(feats))
        timer.record = False
        timer.take()
        for _ in range(calls):
            model(dict(feats))
        got_in = timer.take()
        # alone and in model order, each layer is called as its block calls it (a fused GELU
        # applied, as inside the model: call_in_block)
        for m in self.layers:
            x = timer.inputs[m]
            call_in_block(m, x)  # as a loop does: the previous call was this layer
            timer.take()
            for _ in range(calls):
                call_in_block(m, x)
            self.alone[m] += timer.take()[m]
            self.inside[m] += got_in[m]
        self.per_round.append(sum(statistics.median(got_in[m]) for m in self.layers)
                              / sum(statistics.median(self.alone[m][-calls:]) for m in self.layers))
        for _ in range(calls):
            for m in self.layers:
                call_in_block(m, timer.inputs[m])
        for m, v in timer.take().items():
            self.sweep[m] += v

    def result(self) -> dict:
        med = lambda d: sum(statistics.median(v) for v in d.values())  # noqa: E731
        s_in, s_al, s_sw = med(self.inside), med(self.alone), med(self.sweep)
        # best calls: what is left once other processes' preemptions are filtered out
        b_in, b_al = sum(min(v) for v in self.inside.values()), sum(min(v) for v in self.alone.values())
        return {"layers": len(self.layers), "inside_ms": s_in * 1e3, "alone_ms": s_al * 1e3, "ratio": s_in / s_al,
                "sweep_ms": s_sw * 1e3, "inside_vs_sweep": s_in / s_sw, "sweep_vs_alone": s_sw / s_al,
                "ratio_per_round": self.per_round, "inside_best_ms": b_in * 1e3, "alone_best_ms": b_al * 1e3,
                "ratio_best": b_in / b_al}


@torch.inference_mode()
def inside_vs_alone(models: dict, feats: dict, rounds: int, calls: int) -> dict:
    """{name: result} for models {name: (model, layers)}, their rounds interleaved (a slow
    stretch of a shared machine hits all alike). A round of one model: a forward that records
    each layer's input (a copy, see LayerTimer), `calls` timed forwards, then
    each layer alone `calls` times on its recorded input, then `calls` sweeps calling
    every layer once in model order with nothing between. Per layer the median over all calls;
    sums over layers; ratio per round. The sweep sits between the two: like inside, a layer's
    working set comes from L3 (35 other layers ran since), like alone, no torch op runs between,
    so inside / sweep is what the model's other ops (threads, caches) cost the layers and sweep /
    alone what a cold call costs."""
    sides = {k: _InsideAlone(model, layers) for k, (model, layers) in models.items()}
    try:
        for side in sides.values():
            side.model(dict(feats))  # warm-up, records the inputs
        for _ in range(rounds):
            for side in sides.values():
                side.round(feats, calls)
    finally:
        for side in sides.values():
            side.timer.remove()
    return {k: side.result() for k, side in sides.items()}


@torch.inference_mode()
def end_to_end(methods: dict, feats: dict, rounds: int, calls: int) -> tuple:
    """Median ms per forward, wall and process CPU time; methods interleaved (each round: one
    warm-up call, then the best of `calls` per method), so load changes on a shared machine
    hit all alike. CPU time (all the process's threads) is what other jobs on the cores
    disturb least; it includes threads that wait awake (torch's OpenMP workers spin)."""
    for fn in methods.values():
        fn(dict(feats))
    times = {k: [] for k in methods}
    cpu = {k: [] for k in methods}
    for _ in range(rounds):
        for k, fn in methods.items():
            if rounds > 1:  # re-warm after the other methods ran (one round: the warm-up above)
                fn(dict(feats))
            best, best_cpu = float("inf"), float("inf")
            for _ in range(calls):
                t0, c0 = time.perf_counter(), time.process_time()
                fn(dict(feats))
                best = min(best, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            times[k].append(best)
            cpu[k].append(best_cpu)
    return ({k: statistics.median(v) * 1e3 for k, v in times.items()},
            {k: statistics.median(v) * 1e3 for k, v in cpu.items()},
            {k: [x * 1e3 for x in v] for k, v in times.items()})


def per_round_vs_best_int8(rounds_ms: dict) -> list:
    """soniq's speed over the faster INT8 runtime of the same round, per round: the methods of
    a round ran back to back, so a slow stretch of a shared machine (other jobs) moves both
    sides of a ratio alike, where it moves a ratio of medians taken over different rounds."""
    int8 = [k for k in INT8_METHODS if k in rounds_ms]
    if "soniq" not in rounds_ms or not int8:
        return []
    return [min(rounds_ms[k][r] for k in int8) / s for r, s in enumerate(rounds_ms["soniq"])]


# ---- report -------------------------------------------------------------------------------
WHY_INSIDE = ("a layer inside a model finds its working set in L3 (the model's other ops ran since), where "
              "called back to back it keeps it in L2, and its Python runs cold; the 'in model order' columns split "
              "the gap (inside / in order: the model's other ops; in order / alone: a cold call, here reading its "
              "recorded input from L3 too). On the AMX Xeon neither reading each layer's weights just before its "
              "call nor a hot output lowered it, and a layer called after another of its own shape takes "
              "1.05-1.09x its time alone: what is left is spread over the call's working set. The FP32 and "
              "FBGEMM rows are the same measurement on those models' own Linear layers: "
              "a soniq ratio at or below theirs is the model's, not soniq's threads waiting for torch's (see "
              "Threads in docs/DESIGN_NOTES.md)")
WHY_E2E = ("on a CPU without AMX the packed layers run at the int8 vpdpbusd rate whatever the weight bits (4-bit codes "
           "are decoded to bytes: no sub-byte dot product), i.e. at most at parity with an INT8 kernel; at M = 128 "
           "(batch 1) the K = 384 layers still run at ~70% of the peak rate (activation quantization, the exact "
           "float64 epilogue, ~5 us of Python per call, more inside a model), where ONNX Runtime's int8 MatMul nodes come closer; see "
           "docs/DESIGN_NOTES.md (Packed Linear forward on the CPU)")
WHY_E2E_AMX = ("with AMX the packed layers' tile products are a small part of a layer at batch 1 (M = 128, K = 384: "
               "the 4 tile products of a 32 x 64 strip take ~800 cycles, its exact float64 epilogue about as long); "
               "what remains per layer is the activation quantization, that epilogue, the tiers' tail "
               "tiles and the Python call, each about as costly as the products, and the model's "
               "float ops (attention, GELU, LayerNorm) are half of the forward at every precision; the demo's "
               "input rotation (Hadamard blocks of 32, for fidelity) costs 1.1% at batch 1 and ~4-7% at batch 32 "
               "(same-process A/B with and without it, docs/DESIGN_NOTES.md, Hadamard rotation); see "
               "docs/DESIGN_NOTES.md (AMX)")


def _saved_recipe() -> dict:
    from soniq.demos import minilm_ptq

    return minilm_ptq.SAVED


def _demo_bits() -> str:
    from soniq.demos import minilm as demo

    if _saved_recipe().get("trellis_states_log2"):
        return f"{demo.W_TARGET:g} trellis, run as 8-bit rows"
    return f"{demo.W_TARGET:g}"


E2E_LABELS = {"fp32": "FP32", "bf16": "bf16", "fbgemm_int8": "FBGEMM INT8 dynamic",
              "onednn_int8": "oneDNN INT8 dynamic (torch._int_mm)", "ort_int8": "ONNX Runtime INT8 dynamic",
              "soniq": f"soniq packed (W{_demo_bits()}/A8)"}


def summarize(e2e: dict) -> dict:
    int8 = [k for k in INT8_METHODS if k in e2e]
    best = min(int8, key=lambda k: e2e[k]) if int8 else None
    out = {"best_int8": best}
    if "soniq" in e2e:
        out["soniq_vs_fp32"] = e2e["fp32"] / e2e["soniq"]
        out["soniq_vs_best_int8"] = e2e[best] / e2e["soniq"] if best else None
    return out


def _e2e_table(doc: dict, times: str, summary: str) -> list:
    """Markdown rows of the end-to-end table for one timing (wall `ms` or process `cpu_ms`)."""
    L = ["| batch | " + " | ".join(E2E_LABELS[k] for k in doc["e2e"][0][times]) + " | soniq vs FP32 | "
         "soniq vs best INT8 |", "|---:|" + "---:|" * (len(doc["e2e"][0][times]) + 2)]
    for r in doc["e2e"]:
        s = r[summary]
        vb = "" if s.get("soniq_vs_best_int8") is None else f"{s['soniq_vs_best_int8']:.2f} ({E2E_LABELS[s['best_int8']]})"
        L.append(f"| {r['batch']} | " + " | ".join(f"{v:.1f}" for v in r[times].values())
                 + f" | {s.get('soniq_vs_fp32', 0):.2f} | {vb} |")
    return L


def markdown(doc: dict) -> str:
    m = doc["meta"]
    L = [f"# soniq MiniLM-L6 on the CPU ({m['cpu']})", "",
         f"- date {m['date']}, soniq {m['soniq']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}; ISA {m['isa']}; "
         f"{m['threads']} threads (torch and soniq); soniq threads on: {m['thread_backend']}"
         + (f" ({m['openmp_library']})" if m["openmp_library"] else ""),
         f"- machine load: 1-min load average {m['load_start']:.1f} at start, {m['load_end']:.1f} at end on "
         f"{m['logical_cpus']} logical CPUs" + (" -- shared machine, absolute numbers are noisy"
                                                if (m["load_end"] or 0) > 0.5 * m["threads"] else ""),
         f"- seq {SEQ}; mode {'quick' if m['quick'] else 'full'}; methods interleaved per round (median of rounds, "
         "best call per round); the packed model runs as the demo's saved one: "
         + ("8-bit rows (its trellis-coded weights' execution form)" if m.get("trellis")
            else f"its tiers as its PTQ allocates them (per group of {m.get('tier_group', 1)} output channels; 1: per "
                 "channel, interleaved)")
         + ", with round-to-nearest codes"
         + (f", inputs rotated by Hadamard blocks of {m['hadamard_block']}" if m.get("hadamard_block") else ""), "",
         f"## Packed layers inside the forward vs alone (target <= {INSIDE_TARGET})", "",
         "Sums over the packed layers of each layer's median call (and of its best call: what is left once "
         "other processes' preemptions are filtered out).", "",
         "| batch | layers of | soniq threads on | layers | sum inside ms | sum alone ms | inside / alone | per round | "
         "best calls: inside / alone | sum in model order ms | inside / in order | in order / alone |",
         "|---:|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in doc["inside_vs_alone"]:
        of = r.get("layers_of", "soniq")
        L.append(f"| {r['batch']} | {LAYER_LABELS[of]} | {r['backend'] if of == 'soniq' else ''} | {r['layers']} | "
                 f"{r['inside_ms']:.2f} | {r['alone_ms']:.2f} | "
                 f"{r['ratio']:.2f} | {', '.join(f'{v:.2f}' for v in r['ratio_per_round'])} | "
                 f"{r['inside_best_ms']:.2f} / {r['alone_best_ms']:.2f} = {r['ratio_best']:.2f} | "
                 f"{r['sweep_ms']:.2f} | {r['inside_vs_sweep']:.2f} | {r['sweep_vs_alone']:.2f} |")
    L += ["", "'In model order': every packed layer called once per sweep, in the forward's order, on its input "
          "from the forward, nothing between them: its working set comes from L3 as inside the model (the "
          "other layers ran since), where 'alone' calls one layer back to back with it in L2. So inside / "
          "in order is what the model's other ops cost the layers (threads, caches), in order / alone what "
          "a cold call costs. The FP32 nn.Linear and FBGEMM rows are the same measurement on those models' own "
          "Linear layers, in the same rounds: the part of the ratio that any layer inside this model pays."]
    L += ["", "## End to end (ms per forward)", ""] + _e2e_table(doc, "ms", "summary")
    L += ["", "soniq vs the faster INT8 runtime of the same round (each round runs every method back to back; "
          "the target uses the median of these):", "",
          "| batch | per round | median |", "|---:|---|---:|"]
    for r in doc["e2e"]:
        if r.get("vs_best_int8_per_round"):
            L.append(f"| {r['batch']} | {', '.join(f'{v:.2f}' for v in r['vs_best_int8_per_round'])} | "
                     f"{r['vs_best_int8_round_median']:.2f} |")
    L += ["", "Process CPU time per forward (ms; all threads, torch's OpenMP workers spin while waiting):", ""]
    L += _e2e_table(doc, "cpu_ms", "summary_cpu")
    L += ["", "## Targets (issue 13)", "", "| what | target | got | met | why missed |", "|---|---:|---:|---|---|"]
    for t in doc["targets"]:
        v = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        L.append(f"| {t['what']} | {t['target']} | {v} | {'yes' if t['met'] else 'NO'} | {t.get('why_missed') or ''} |")
    if doc.get("notes"):
        L += ["", "## Notes", ""] + [f"- {k}: {v}" for k, v in doc["notes"].items()]
    return "\n".join(L) + "\n"


def run(threads: int, quick: bool, out_dir: str, slug: str | None = None, log=print) -> dict:
    """Measures, prints, saves cpu_model_<slug>.json/.md under out_dir; returns the document."""
    import tempfile

    E = QUICK if quick else FULL
    torch.set_num_threads(threads)
    soniq.set_num_threads(threads)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    fp32 = load_fp32()
    vocab = fp32.tokenizer.vocab_size
    packed = packed_minilm(fp32)
    methods, notes = {"fp32": fp32, "bf16": bf16_model(fp32)}, {}
    from soniq.demos.minilm import fbgemm_int8

    methods["fbgemm_int8"] = fbgemm_int8(fp32)
    try:
        methods["onednn_int8"] = onednn_int8(fp32)
    except (RuntimeError, AttributeError) as e:  # a torch without torch._int_mm on this CPU: say so
        notes["oneDNN INT8"] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    tmp = tempfile.TemporaryDirectory()
    try:
        methods["ort_int8"] = ort_int8(fp32, threads, tmp.name)
    except Exception as e:  # onnxruntime missing or the export failed: say so
        notes["ONNX Runtime INT8"] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    methods["soniq"] = packed
    controls = control_layers(fp32, methods["fbgemm_int8"])
    backend0 = _C.thread_backend()
    inside, e2e = [], []
    try:
        for batch in E["batches"]:
            feats = features(vocab, batch)
            for i, be in enumerate(E["backends"]):
                _C.set_thread_backend(be)
                models = {"soniq": (packed, encoder_linears(packed, soniq.nn.PackedLinear))}
                if i == 0:  # the controls once, with soniq's default threads
                    models.update(controls)
                got = inside_vs_alone(models, feats, E["rounds"][batch], E["calls"][batch])
                for k, r in got.items():
                    r = {"batch": batch, "layers_of": k, "backend": _C.thread_backend(), **r}
                    inside.append(r)
                    log(f"batch {batch:2d}: {LAYER_LABELS[k]} layers inside the forward {r['inside_ms']:.2f} ms, "
                        f"alone {r['alone_ms']:.2f} ms, ratio {r['ratio']:.2f} (best calls {r['ratio_best']:.2f}"
                        + (f"; threads on {r['backend']})" if k == "soniq" else ")"))
            _C.set_thread_backend("auto")
            ms, cpu_ms, rounds_ms = end_to_end(methods, feats, E["rounds"][batch], E["calls"][batch])
            per_round = per_round_vs_best_int8(rounds_ms)
            e2e.append({"batch": batch, "ms": ms, "summary": summarize(ms), "cpu_ms": cpu_ms,
                        "summary_cpu": summarize(cpu_ms), "rounds_ms": rounds_ms,
                        "vs_best_int8_per_round": per_round,
                        "vs_best_int8_round_median": statistics.median(per_round) if per_round else None})
            log(f"batch {batch:2d}: " + ", ".join(f"{E2E_LABELS[k]} {v:.1f} ms" for k, v in ms.items())
                + (f"; soniq vs best INT8 per round {', '.join(f'{x:.2f}' for x in per_round)}" if per_round else ""))
    finally:
        _C.set_thread_backend("auto")
        tmp.cleanup()
    try:
        import onnxruntime
        ort_v = onnxruntime.__version__
    except ImportError:
        ort_v = None
    info = soniq.info(verbose=False)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "soniq": soniq.__version__,
            "torch": torch.__version__, "onnxruntime": ort_v, "python": platform.python_version(),
            "cpu": info["cpu"]["model"], "isa": info["isa"]["active"], "threads": threads, "quick": quick,
            "thread_backend": backend0, "openmp_library": _C.openmp_library() or None,
            "hadamard_block": _demo_hadamard_block(), "tier_group": _demo_tier_group(),
            "trellis": bool(_saved_recipe().get("trellis_states_log2")),
            "logical_cpus": os.cpu_count(), "load_start": load_start,
            "load_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    targets = []
    for r in inside:
        if r["layers_of"] != "soniq" or r["backend"] != backend0:
            continue
        ctl = {c["layers_of"]: c["ratio"] for c in inside if c["batch"] == r["batch"] and c["layers_of"] != "soniq"}
        why = None if r["ratio"] <= INSIDE_TARGET else WHY_INSIDE + "".join(
            f"; {LAYER_LABELS[k]} layers, same run, same measurement: {v:.2f}" for k, v in ctl.items())
        targets.append({"what": f"packed layers inside / alone, batch {r['batch']}", "target": INSIDE_TARGET,
                        "value": r["ratio"], "met": r["ratio"] <= INSIDE_TARGET, "controls": ctl,
                        "why_missed": why})
    for r in e2e:  # the median over rounds of the same-round ratio (see per_round_vs_best_int8)
        v = r["vs_best_int8_round_median"]
        targets.append({"what": f"end to end vs best INT8, batch {r['batch']}", "target": 1.0, "value": v,
                        "met": (v or 0) >= 1.0, "why_missed": None if (v or 0) >= 1.0 else WHY_E2E})
        if meta["isa"] == "amx":
            f = r["summary"].get("soniq_vs_fp32")
            for what, need, got in ((f"end to end vs best INT8 (AMX), batch {r['batch']}", AMX_VS_BEST_INT8, v),
                                    (f"end to end vs FP32 (AMX), batch {r['batch']}", AMX_VS_FP32, f)):
                ok = (got or 0) >= need
                targets.append({"what": what, "target": need, "value": got, "met": ok,
                                "why_missed": None if ok else WHY_E2E_AMX})
    doc = {"meta": meta, "inside_vs_alone": inside, "e2e": e2e, "targets": targets, "notes": notes}
    os.makedirs(out_dir, exist_ok=True)
    slug = slug or default_slug(meta, threads, quick)
    base = os.path.join(out_dir, f"cpu_model_{slug}")
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(doc))
    for t in targets:
        v = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        log(f"  {t['what']:<42} target {t['target']} got {v} {'ok' if t['met'] else 'MISS'}")
    log(f"saved {base}.json/.md")
    return doc


def result_slug(cpu_model: str | None, active_isa: str, threads: int, quick: bool) -> str:
    """The saved results' name: the CPU model, its microarchitecture where known (AMD: VMs
    report a bare "AMD EPYC" for Zen 4 and Zen 5 alike) and its best ISA (machines of one model
    name differ in ISA), '-as-<isa>' when a lower path was forced (SONIQ_ISA / set_isa): such a
    run keeps the machine's baselines, so it never takes the name of a run on a CPU that has only
    that ISA."""
    import re

    from soniq._runtime import cpu_microarch

    best = soniq.supported_isas()[-1]
    arch = cpu_microarch()
    slug = re.sub(r"[^a-z0-9]+", "-", (cpu_model or "cpu").lower()).strip("-")
    slug += (f"-{arch}" if arch and arch not in slug else "") + f"-{best}"
    slug += "" if active_isa == best else f"-as-{active_isa}"
    return slug + ("-quick" if quick else "") + ("" if threads == 2 else f"-{threads}t")


def default_slug(meta: dict, threads: int, quick: bool) -> str:
    return result_slug(meta["cpu"], meta["isa"], threads, quick)


def main(argv=None, default_out: str = ".") -> dict:
    ap = argparse.ArgumentParser(prog="python -m soniq.benchmarks.cpu_model", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (CI smoke)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=default_out)
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    return run(args.threads, args.quick, args.out)


if __name__ == "__main__":
    main()
