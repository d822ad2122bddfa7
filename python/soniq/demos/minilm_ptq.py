"""The MiniLM demo's no-training rows (soniq.ptq) and its low-bit sweep (`soniq demo minilm
--sweep`): cosine / top-1 / size of SONIQ mixed-precision PTQ against uniform round-to-nearest,
uniform GPTQ-style rounding and FBGEMM INT8 at several average weight bits, as a table, JSON
and a plot (bits vs cosine). Every soniq row is converted and the packed model is measured.
"""
from __future__ import annotations

import copy
import os
import time

import numpy as np

# Every training sentence (4,205) calibrates: asymmetric GPTQ fits a K x K least-squares target
# per layer, which more rows estimate better ((4, 6) @ 4.4: 0.9954 at 1024 sentences, 0.9960 at
# 2048 with (4, 5); uniform 3 bits +0.003 per doubling). None: all of them. Layer gains on 32
# sentences (128 gave the same cosine)
N_CALIB, CALIB_BATCH, GAIN_BATCHES = None, 32, 1
# Linear inputs rotated by the largest Hadamard blocks up to 512 that divide them (128 on
# MiniLM's 384 inputs, 512 on the FFN output's 1536; weights stored rotated): (4, 6) @ 4.4, 512
# sentences, GPTQ: cosine 0.9897 -> 0.9940, top-1 86.7% -> 90.6% with blocks of 32; with this
# recipe and every sentence blocks of 512 gave 0.9965 / 92.4% against 32's 0.9963 / 91.0%, and
# at 3 bits 0.9770 against 0.9754 (docs/DESIGN_NOTES.md, "Hadamard rotation of Linear inputs")
HADAMARD_BLOCK = 512
# weight tiers chosen per 8 consecutive output channels (PTQConfig.tier_group): every run of 8
# outputs of a packed layer is then one tier and its kernels write them in place, where tiers
# interleaved per channel cost a column merge (docs/DESIGN_NOTES.md, "Tier groups"). The demo's
# PTQ ((4, 6) @ 4.4, 1024 sentences, GPTQ + bias correction, blocks of 32), cosine held-out /
# other text and top-1: per channel 0.99439 / 0.99407, 89.8% / 89.8%; per 8 0.99424 / 0.99401,
# 89.5% / 89.4%; per 16 0.99410 / 0.99390, 89.9% / 87.6% (AMD EPYC Zen 5)
TIER_GROUP = 8
# Each channel's clip also searched with GPTQ (PTQConfig.clip_search) and the asymmetric target
# damped 3x more (target_damp 0.03). Uniform 3 bits (1024 sentences): 0.9711 -> 0.9737 (clip
# search) -> 0.9754 (target_damp 0.1) -> 0.9770 (blocks of 512); 0.9800 with every sentence and
# target_damp 0.03 (docs/DESIGN_NOTES.md, "Clip search with GPTQ")
CLIP_SEARCH = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2)
TARGET_DAMP = 0.03
# calibration rows (tokens) weighted in GPTQ's H by how much noise on them moves the sentence
# embedding, to the power 0.5 (PTQConfig.row_weighting; padding drops out): every training
# sentence, uniform 3 bits 0.98003 -> 0.98186 held-out, 0.97949 -> 0.98100 other text; (4, 5) @
# 4.4 0.99673 -> 0.99702, 0.99660 -> 0.99685 (power 1: less; docs/DESIGN_NOTES.md, "Row weights")
ROW_WEIGHTING = 0.5
# the grid recipe: rotation and rounding on soniq's uniform per-channel grids; the sweep's SONIQ
# rows and its rotated uniform GPTQ rows are made with it, so mixed and uniform tiers compare on
# equal footing (the saved model is this recipe with trellis-coded weights: SAVED). Asymmetric GPTQ:
# each layer fitted to the float model's output on the float model's input ((4, 6) @ 4.4, 1024
# sentences, blocks of 32: 0.9942 -> 0.9954 held-out). Bias correction, the refinement before
# it, adds nothing on top of it; block reconstruction paid at 3 bits after plain GPTQ, not after
# this (docs/DESIGN_NOTES.md, "Asymmetric GPTQ")
GRID = dict(asymmetric=True, hadamard_block=HADAMARD_BLOCK, clip_search=CLIP_SEARCH, target_damp=TARGET_DAMP,
            row_weighting=ROW_WEIGHTING)
# the saved model: the grid recipe's rotation, asymmetric target and row weights, its weights
# trellis-coded (PTQConfig.trellis_states_log2: a bitshift trellis of 16384 states at each row's
# tier width, Viterbi with GPTQ's error feedback; no clip search: rows scale by their RMS).
# (4, 5) @ 4.4, every training sentence, fake model: 0.99704 / 93.5% held-out, 0.99684 / 92.2%
# other text on the grid -> 0.99850 / 95.8%, 0.99842 / 94.5% with 4096 states -> 0.99866 / 95.8%,
# 0.99855 / 95.4% with 16384 (the native Viterbi made them affordable; the codebook's 16 KB keep
# the file >= 7x; docs/DESIGN_NOTES.md, "Trellis-coded weights"). Each input column one path down
# all rows at their tier widths, errors weighted by the row's step^2 (PTQConfig.trellis_joint, the
# default: 2% less embedding error than one path per width). Stored at the tier widths, the
# row steps in bfloat16 and the biases rounded to float16 (save formats 6 and 7: 4 bytes less per
# output channel, which the demo spends on bits: minilm.W_TARGET), run as 8-bit codes
TRELLIS_STATES_LOG2 = 14
SAVED = dict({k: v for k, v in GRID.items() if k != "clip_search"}, trellis_states_log2=TRELLIS_STATES_LOG2,
             float16_biases=True)
# (label, method, PTQConfig fields); methods: "soniq" (mixed tiers, GPTQ), "gptq" / "rtn" (uniform).
# The plain uniform rows are the usual baselines. The saved model's own point (minilm.W_PALETTE @
# minilm.W_TARGET) is the demo's row, added by the demo. Block reconstruction (soniq._recon) is no longer a row:
# after plain GPTQ it took (2, 4) @ 3 from 0.9550 to 0.9614, after asymmetric GPTQ it changed
# nothing (docs/DESIGN_NOTES.md, "Asymmetric GPTQ")
SWEEP = [("SONIQ PTQ W(2,4) @3", "soniq", dict(w_palette=(2, 4), w_bits_target=3.0, **GRID)),
         ("SONIQ PTQ W(4,8) @6", "soniq", dict(w_palette=(4, 8), w_bits_target=6.0, **GRID)),
         ("uniform RTN W3", "rtn", dict(w_palette=(3, 3), w_bits_target=3.0)),
         ("uniform RTN W4", "rtn", dict(w_palette=(4, 4), w_bits_target=4.0)),
         ("uniform RTN W6", "rtn", dict(w_palette=(6, 6), w_bits_target=6.0)),
         ("uniform GPTQ W3", "gptq", dict(w_palette=(3, 3), w_bits_target=3.0)),
         ("uniform GPTQ W4", "gptq", dict(w_palette=(4, 4), w_bits_target=4.0)),
         ("uniform GPTQ W6", "gptq", dict(w_palette=(6, 6), w_bits_target=6.0)),
         ("uniform W3, Hadamard 512, asym. GPTQ, clip search, row weights", "gptq", dict(w_palette=(3, 3), w_bits_target=3.0, **GRID)),
         ("uniform W4, Hadamard 512, asym. GPTQ, clip search, row weights", "gptq", dict(w_palette=(4, 4), w_bits_target=4.0, **GRID)),
         ("uniform W6, Hadamard 512, asym. GPTQ, clip search, row weights", "gptq", dict(w_palette=(6, 6), w_bits_target=6.0, **GRID))]
QUICK_SWEEP = [SWEEP[0], SWEEP[2], SWEEP[5], SWEEP[8]]


def calibration_sentences(train_sents, n=N_CALIB, seed=0) -> list:
    """n training sentences drawn at random (None: all), sorted by length so batches carry
    little padding."""
    idx = np.random.default_rng(seed).permutation(len(train_sents))[:n]
    return sorted((train_sents[i] for i in idx), key=len)


def calibration(teacher, batches):
    """soniq.ptq.calibrate over tokenized batches: one float pass, reused by every PTQ config."""
    import soniq

    return soniq.ptq.calibrate(teacher, batches, forward=lambda m, b: m(dict(b)))


def ptq_config(method: str, teacher, smooth_alpha=None, hadamard_block=0, **kw):
    """PTQConfig for the demo: the encoder's Linear layers, activations at 8 bits (per-token
    dynamic scales when this soniq's QATConfig offers them), the pooler in float;
    smooth_alpha: SmoothQuant factors on the Linear inputs (None: off); hadamard_block: block
    Hadamard rotation of the Linear inputs (0: off); kw: more PTQConfig fields (e.g. SAVED:
    the saved model's rotation and rounding, GRID: the same on the uniform grid)."""
    import dataclasses

    from soniq.ptq import PTQConfig
    from soniq.qat import QATConfig

    excl = tuple(n for n, _ in teacher.named_modules() if n.endswith("pooler.dense"))
    opts = (("a_dynamic", "token"),) if "a_dynamic" in {f.name for f in dataclasses.fields(QATConfig)} else ()
    opts += (("smooth_alpha", smooth_alpha),) if smooth_alpha is not None else ()
    opts += (("hadamard_block", hadamard_block),) if hadamard_block else ()
    base = dict(a_palette=(8, 8), a_bits_target=8.0, exclude=excl, qat_options=opts)
    if kw.get("reconstruct_steps") and "reconstruct_blocks" not in kw:  # the transformer layers
        kw["reconstruct_blocks"] = tuple(n for n, m in teacher.named_modules()
                                         if n.rsplit(".", 1)[-1].isdigit() and n.rsplit(".", 1)[0].endswith("encoder.layer"))
    if method == "soniq":
        return PTQConfig(**base, rounding="gptq", allocation="measured", gain_batches=GAIN_BATCHES, **kw)
    return PTQConfig(**base, rounding=method, allocation="hessian", **kw)


def sentence_embedding(out):
    """The output PTQConfig(row_weighting=...) weighs calibration rows by: the normalized
    sentence embedding the demo measures (not the per-token states beside it)."""
    return out["sentence_embedding"]


def ptq_model(teacher, cal, cfg):
    """(fake-quantized model, packed model, seconds) for one PTQConfig on a Calibration."""
    import soniq

    t = time.time()
    fake = soniq.ptq.quantize(copy.deepcopy(teacher), cal, cfg, output=sentence_embedding)
    secs = time.time() - t
    return fake, soniq.convert(fake), secs


def sweep(teacher, cal, measure, quick=False, extra=None, bar=None) -> dict:
    """{key: row} for the sweep's configurations on the Calibration `cal`; measure(packed) gives
    a row's fidelity and sizes (+ `extra` rows already measured, e.g. FBGEMM INT8 and the demo's
    point)."""
    import soniq

    rows = dict(extra or {})
    sentences = sum(len(b["input_ids"]) for b in cal.batches)
    for label, method, kw in (QUICK_SWEEP if quick else SWEEP):
        fake, packed, secs = ptq_model(teacher, cal, ptq_config(method, teacher, **kw))
        rep = soniq.qat.precision_report(fake)
        kind = method + ("_rot" if kw.get("hadamard_block") and method != "soniq" else "") \
            + ("_recon" if kw.get("reconstruct_steps") else "")
        rows[f"sweep_{kind}_{kw['w_bits_target']:g}"] = {
            "label": label, "method": kind, "avg_w_bits": rep["avg_w_bits"], "ptq_seconds": secs,
            "calibration_sentences": sentences, **measure(packed)}
        if bar is not None:
            bar.update()
    return rows


def format_sweep(rows: dict) -> str:
    w = max([41] + [len(r["label"]) for r in rows.values()])
    out = [f"{'low-bit sweep (no training unless marked)':{w}s} {'W bits':>6s} {'cosine':>7s} {'top-1':>6s} "
           f"{'Linear MiB':>10s} {'x FP32':>6s} {'PTQ s':>6s}"]
    for r in sorted(rows.values(), key=lambda r: (r["avg_w_bits"], r["label"])):
        secs = f"{r['ptq_seconds']:6.0f}" if "ptq_seconds" in r else f"{'':6s}"
        out.append(f"{r['label']:{w}s} {r['avg_w_bits']:6.2f} {r['cosine']:7.4f} {100 * r['top1']:5.1f}% "
                   f"{r['linear_bytes'] / 2 ** 20:10.2f} {r['linear_compression']:6.2f} {secs}")
    return "\n".join(out)


def plot_sweep(rows: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    styles = {"soniq": ("SONIQ mixed-precision PTQ", "*-", "#08519c"), "gptq": ("uniform GPTQ", "s--", "#31a354"),
              "gptq_rot": ("uniform asym. GPTQ, Hadamard-rotated", "s-", "#006d2c"), "rtn": ("uniform RTN", "o:", "#a63603")}
    for method, (name, fmt, col) in styles.items():
        pts = sorted((r["avg_w_bits"], r["cosine"]) for r in rows.values() if r.get("method") == method)
        if pts:
            ax.plot(*zip(*pts), fmt, color=col, label=name, ms=8)
    for r in rows.values():
        if r.get("method") not in styles:
            ax.scatter(r["avg_w_bits"], r["cosine"], s=60, marker="D", label=r["label"])
    ax.axhline(0.98, color="k", ls="--", lw=0.8)
    ax.set_xlabel("average weight bits (activations 8 bits; INT8: 8/8)")
    ax.set_ylabel("mean cosine to FP32 (held-out)")
    ax.set_title("all-MiniLM-L6-v2: fidelity vs weight bits", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep(rows: dict, out_dir: str) -> tuple:
    import json

    os.makedirs(out_dir, exist_ok=True)
    jp, png = os.path.join(out_dir, "minilm_sweep.json"), os.path.join(out_dir, "minilm_sweep.png")
    with open(jp, "w") as f:
        json.dump(rows, f, indent=2)
    plot_sweep(rows, png)
    return jp, png
