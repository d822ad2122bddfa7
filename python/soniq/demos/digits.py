"""`soniq demo digits`: SONIQ on scikit-learn's digits (8x8 images), against FP32, uniform
LSQ QAT, post-training quantization and Brevitas QAT at the same average bits.

Every method starts from the same FP32 network of its seed and gets the same number of
training epochs at the same learning rate; the test split is fixed (25%, stratified,
random_state=0); all layers, first and last included, are quantized by every quantized
method. The schedule and learning rates below were chosen with `--val` (train on 75% of the
training split, report on the other 25%), never on the test split: see docs/digits_tuning.md.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from torch import nn

from . import print_results, write_results

# FP32 gets 50 epochs: at 30 it was still improving (validation 96.1% -> 97.7%), and a weak
# FP32 reference would flatter every quantized method.
FULL = dict(fp_epochs=50, p1_epochs=5, p2_epochs=15, batch=64)
QUICK = dict(fp_epochs=8, p1_epochs=2, p2_epochs=4, batch=64)
W_PALETTE, A_PALETTE, W_TARGET, A_TARGET = (1, 4), (3, 8), 2.0, 4.0
UNIFORM_W, UNIFORM_A = 2, 4
FP_LR = 4e-3
QAT_LR = 8e-3  # peak (one-cycle) learning rate of all QAT: SONIQ phase 2, uniform LSQ QAT, Brevitas
P1_LR = 4e-3   # SONIQ phase 1 (noise): weights and scales
BITS_LR, PENALTY = 5e-2, 2.0  # phase 1: learning rate of the bit logits, bit-budget penalty weight


def load_data(val: bool = False):
    """(X_train, y_train, X_eval, y_eval): the fixed train/test split, or with `val` a
    validation split carved from the training split (for tuning; the test split is unused)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None]
    Xtr, Xte, ytr, yte = train_test_split(X, d.target, test_size=0.25, random_state=0, stratify=d.target)
    if val:
        Xtr, Xte, ytr, yte = train_test_split(Xtr, ytr, test_size=0.25, random_state=1, stratify=ytr)
    t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return t(Xtr, torch.float32), t(ytr, torch.long), t(Xte, torch.float32), t(yte, torch.long)


def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10))


@torch.no_grad()
def accuracy(model, X, y) -> float:
    model.eval()
    return float((model(X).argmax(1) == y).float().mean()) * 100


def train(model, data, epochs, lr, seed, extra_loss=None, param_groups=None, tick=None):
    Xtr, ytr = data[0], data[1]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(param_groups or model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(Xtr) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[pg["lr"] for pg in opt.param_groups],
                                                total_steps=max(1, steps), pct_start=0.15)
    lossf = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(Xtr), 64):
            idx = perm[i:i + 64]
            loss = lossf(model(Xtr[idx]), ytr[idx])
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if tick:
            tick()
    return model


def _qat_groups(model, lr, bits_lr):
    bits = [p for n, p in model.named_parameters() if n.endswith("bits_logit")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("bits_logit")]
    return [{"params": rest, "lr": lr}, {"params": bits, "lr": bits_lr}]


def run_soniq(fp, data, seed, E, tick):
    import soniq
    from soniq.qat import QATConfig

    torch.manual_seed(seed)
    cfg = QATConfig(w_palette=W_PALETTE, a_palette=A_PALETTE, w_bits_target=W_TARGET, a_bits_target=A_TARGET,
                    penalty_weight=PENALTY, init_w_bits=W_TARGET, init_a_bits=A_TARGET)
    m = soniq.qat.prepare(copy.deepcopy(fp), cfg)
    m(data[0][:256])  # calibrate activation ranges
    train(m, data, E["p1_epochs"], P1_LR, seed, extra_loss=lambda: soniq.qat.bit_penalty(m),
          param_groups=_qat_groups(m, P1_LR, BITS_LR), tick=tick)
    soniq.qat.freeze_precision(m)
    train(m, data, E["p2_epochs"], QAT_LR, seed + 1, tick=tick)
    rep = soniq.qat.precision_report(m)
    packed = soniq.convert(m)
    return m, packed, rep


def run_uniform(fp, data, seed, E, tick, epochs):
    import soniq
    from soniq.qat import QATConfig

    torch.manual_seed(seed)
    cfg = QATConfig(w_palette=(UNIFORM_W, 4), a_palette=(UNIFORM_A, 8), w_bits_target=UNIFORM_W,
                    a_bits_target=UNIFORM_A)
    m = soniq.qat.prepare(copy.deepcopy(fp), cfg)
    m(data[0][:256])
    soniq.qat.set_uniform_precision(m, UNIFORM_W, UNIFORM_A)
    if epochs:
        train(m, data, epochs, QAT_LR, seed, tick=tick)
    return m


def brevitas_cnn(fp):
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerTensorFloat  # noqa: F401  (import check)

    wkw = dict(weight_bit_width=UNIFORM_W, weight_scaling_per_output_channel=True)
    m = nn.Sequential(
        qnn.QuantIdentity(bit_width=UNIFORM_A, return_quant_tensor=False, signed=False),
        qnn.QuantConv2d(1, 16, 3, padding=1, **wkw), qnn.QuantReLU(bit_width=UNIFORM_A), nn.MaxPool2d(2),
        qnn.QuantConv2d(16, 32, 3, padding=1, **wkw), qnn.QuantReLU(bit_width=UNIFORM_A), nn.MaxPool2d(2),
        nn.Flatten(), qnn.QuantLinear(32 * 4, 10, bias=True, **wkw))
    src = [l for l in fp if isinstance(l, (nn.Conv2d, nn.Linear))]
    dst = [l for l in m if isinstance(l, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for s, d in zip(src, dst):
            d.weight.copy_(s.weight)
            d.bias.copy_(s.bias)
    return m


def run_brevitas(fp, data, seed, epochs, tick):
    torch.manual_seed(seed)
    m = brevitas_cnn(fp)
    return train(m, data, epochs, QAT_LR, seed, tick=tick)


def _mean_std(v):
    v = [x for x in v if x is not None]
    return (float(np.mean(v)), float(np.std(v))) if v else (None, None)


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    layers = res["soniq_layers_seed0"]
    names = list(layers)
    x = np.arange(len(names))
    cfg = res["soniq_config"]
    for off, kind, pal, col in ((-0.2, "w_bits", cfg["w_palette"], ("#9ecae1", "#08519c")),
                                (0.2, "a_bits", cfg["a_palette"], ("#fdae6b", "#a63603"))):
        low = [layers[n][kind]["hist"].get(str(pal[0]), layers[n][kind]["hist"].get(pal[0], 0))
               / layers[n][kind]["channels"] for n in names]
        a1.bar(x + off, low, 0.38, color=col[0], label=f"{kind[0]}: {pal[0]}-bit")
        a1.bar(x + off, [1 - v for v in low], 0.38, bottom=low, color=col[1], label=f"{kind[0]}: {pal[1]}-bit")
    a1.set_xticks(x, names)
    a1.set_ylabel("fraction of channels")
    a1.set_title("SONIQ per-layer bit allocation (seed 0)\nweights per output ch. (left), activations per input ch. (right)")
    a1.legend(fontsize=8, loc="upper right")
    fp = res["methods"]["fp32"]
    a2.axhline(fp["acc_mean"], color="k", ls="--", lw=1, label=f"FP32 ({fp['acc_mean']:.2f}%)")
    a2.axhspan(fp["acc_mean"] - 0.2, fp["acc_mean"], color="k", alpha=0.06, label="within 0.2 of FP32")
    keys = [("soniq", "o"), ("soniq_packed", "P"), ("uniform_lsq_qat", "s"), ("ptq", "v"), ("brevitas_qat", "D")]
    for i, (key, marker) in enumerate(keys):
        r = res["methods"].get(key)
        if not r or r["acc_mean"] is None:
            continue
        xo = r["avg_w_bits"] + (i - 2) * 0.06  # side by side: the methods share the same bits
        a2.errorbar(xo, r["acc_mean"], yerr=r["acc_std"], fmt=marker, capsize=3, ms=8,
                    label=f"{r['label']} (A {r['avg_a_bits']:.1f} b)")
    a2.set_xlim(1.0, 2.3)  # room on the left for the legend
    a2.set_xlabel("average weight bits (methods offset sideways for legibility)")
    a2.set_ylabel(f"{res.get('split', 'test')} accuracy (%)")
    a2.set_title("digits: accuracy vs average bits (mean ± std over seeds)")
    a2.legend(fontsize=8, loc="lower left")
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(seeds=None, quick=False, json_path=None, out_dir=".", json_stdout=False, peer=True, val=False) -> int:
    from tqdm.auto import tqdm

    import soniq

    E = QUICK if quick else FULL
    seeds = list(range(seeds if seeds is not None else (1 if quick else 5)))
    try:
        import brevitas  # noqa: F401
        have_brevitas = peer
    except ImportError:
        have_brevitas = False
    torch.set_num_threads(1)  # a tiny CNN: intra-op threads cost more than they give
    data = load_data(val)
    Xte, yte = data[2], data[3]
    qat_epochs = E["p1_epochs"] + E["p2_epochs"]
    per_seed = E["fp_epochs"] + 2 * qat_epochs + (qat_epochs if have_brevitas else 0)
    bar = tqdm(total=per_seed * len(seeds), desc="soniq demo digits", unit="epoch")
    accs = {k: [] for k in ("fp32", "soniq", "soniq_packed", "uniform_lsq_qat", "ptq", "brevitas_qat")}
    bits = {"soniq": []}
    t0 = time.time()
    layers0 = None
    for seed in seeds:
        torch.manual_seed(seed)
        fp = train(make_cnn(), data, E["fp_epochs"], FP_LR, seed, tick=bar.update)
        accs["fp32"].append(accuracy(fp, Xte, yte))
        bar.set_postfix_str(f"seed {seed}: SONIQ")
        sm, packed, rep = run_soniq(fp, data, seed, E, bar.update)
        accs["soniq"].append(accuracy(sm, Xte, yte))
        accs["soniq_packed"].append(accuracy(packed, Xte, yte))
        bits["soniq"].append((rep["avg_w_bits"], rep["avg_a_bits"]))
        if layers0 is None:
            layers0 = {n: {k: l[k] for k in ("w_bits", "a_bits")} for n, l in rep["layers"].items()}
        bar.set_postfix_str(f"seed {seed}: uniform QAT")
        accs["uniform_lsq_qat"].append(accuracy(run_uniform(fp, data, seed, E, bar.update, qat_epochs), Xte, yte))
        accs["ptq"].append(accuracy(run_uniform(fp, data, seed, E, None, 0), Xte, yte))
        if have_brevitas:
            bar.set_postfix_str(f"seed {seed}: Brevitas")
            accs["brevitas_qat"].append(accuracy(run_brevitas(fp, data, seed, qat_epochs, bar.update), Xte, yte))
    bar.close()
    sw = float(np.mean([b[0] for b in bits["soniq"]]))
    sa = float(np.mean([b[1] for b in bits["soniq"]]))
    labels = {"fp32": ("FP32", 32.0, 32.0),
              "soniq": (f"SONIQ W{W_PALETTE}/A{A_PALETTE} (fake-quant)", sw, sa),
              "soniq_packed": ("SONIQ packed (soniq.convert, mpgemm)", sw, sa),
              "uniform_lsq_qat": (f"uniform LSQ QAT W{UNIFORM_W}/A{UNIFORM_A}", float(UNIFORM_W), float(UNIFORM_A)),
              "ptq": (f"PTQ W{UNIFORM_W}/A{UNIFORM_A} (MSE-calibrated)", float(UNIFORM_W), float(UNIFORM_A)),
              "brevitas_qat": (f"Brevitas {__import__('brevitas').__version__ if have_brevitas else ''} QAT "
                               f"W{UNIFORM_W}/A{UNIFORM_A}", float(UNIFORM_W), float(UNIFORM_A))}
    methods = {}
    for k, v in accs.items():
        m_, s_ = _mean_std(v)
        lab, wb, ab = labels[k]
        methods[k] = {"label": lab if (v or k != "brevitas_qat") else "Brevitas QAT (not installed)",
                      "acc_mean": m_, "acc_std": s_, "accs": v, "avg_w_bits": wb, "avg_a_bits": ab}
    res = {"dataset": "sklearn digits 8x8, test_size=0.25 stratified random_state=0",
           "split": "validation" if val else "test", "n_train": len(data[0]), "n_test": len(Xte),
           "seeds": seeds, "quick": quick, "epochs": E,
           "learning_rates": {"fp32": FP_LR, "qat": QAT_LR, "soniq_phase1": P1_LR, "soniq_bits": BITS_LR},
           "soniq_config": {"w_palette": W_PALETTE, "a_palette": A_PALETTE, "w_bits_target": W_TARGET,
                            "a_bits_target": A_TARGET, "soniq_bits_per_seed": bits["soniq"]},
           "methods": methods, "soniq_layers_seed0": layers0, "seconds": time.time() - t0,
           "threads": torch.get_num_threads(), "soniq_version": soniq.__version__}
    json_path, png = write_results(res, out_dir, "digits", json_path, plot)
    print_results(res, json_stdout, [format_table(res), ""], json_path, png)
    return 0


def format_table(res) -> str:
    rows = [f"digits, {len(res['seeds'])} seed(s), {res.get('split', 'test')} n={res['n_test']}",
            f"{'method':52s} {'avg W bits':>10s} {'avg A bits':>10s} {'accuracy (%)':>16s}"]
    for r in res["methods"].values():
        acc = "n/a" if r["acc_mean"] is None else f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f}"
        rows.append(f"{r['label']:52s} {r['avg_w_bits']:10.2f} {r['avg_a_bits']:10.2f} {acc:>16s}")
    return "\n".join(rows)
