"""Measurement script (not part of the package): would a trained trellis codebook beat the
Gaussian draws soniq._trellis.codebook uses? docs/DESIGN_NOTES.md, "Trellis-coded weights".

    python docs/experiments/trellis_codebook.py [--states-log2 12] [--iterations 60]

Lloyd iterations, the codebook design of trellis-coded quantization (Marcellin & Fischer 1990):
each state's value moves to the mean of the training samples whose least-squares paths pass
through it, from the Gaussian draws, on unit-Gaussian sequences of widths 2-6 at once (one
codebook per file serves every width). Prints the squared error of the trained codebook / the
Gaussian one on fresh unit-Gaussian rows per width, then the relative H-error of GPTQ's trellis
rounding (soniq._gptq.trellis_codes, 4-bit rows) of four MiniLM layers rotated as the demo rotates
them (their inputs' moments from soniq.ptq's calibration on 256 sentences), each codebook
at row gains 1.0 and 1.12. About 3 minutes on 2 cores at L = 12.
"""
import argparse

import numpy as np
import torch

import soniq
from soniq import _trellis as T, ptq
from soniq._gptq import trellis_codes
from soniq._hadamard import layer_block, rotate_weight
from soniq.demos import minilm as D, minilm_ptq as P
from soniq.demos.text_corpus import train_heldout_split

WIDTHS = (2, 3, 4, 5, 6)


def train(L: int, iterations: int, sequences: int, length: int = 1024, seed: int = 0) -> torch.Tensor:
    """int8 codebook after Lloyd iterations from T.codebook(L) (values in codebook units)."""
    rng = np.random.default_rng(seed)
    scale = T.CODEBOOK_SCALE * T.ROW_GAIN  # a unit-RMS row's values in codebook units
    data = {k: rng.standard_normal((sequences // len(WIDTHS), length)) * scale for k in WIDTHS}
    cb = T.codebook(L).double().numpy()
    for _ in range(iterations):
        sums, counts = np.zeros(2 ** L), np.zeros(2 ** L)
        for k, x in data.items():
            s = T.viterbi(torch.from_numpy(x), L, k, torch.from_numpy(cb)).reshape(-1).numpy()
            sums += np.bincount(s, weights=x.reshape(-1), minlength=2 ** L)
            counts += np.bincount(s, minlength=2 ** L)
        cb = np.where(counts > 0, sums / np.maximum(counts, 1), cb)
    return torch.from_numpy(np.clip(np.round(cb), -127, 127).astype(np.int8))


def gaussian_rows(L: int, cb: torch.Tensor) -> list:
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(100 + L), dtype=torch.float64)
    x = x * T.CODEBOOK_SCALE * T.ROW_GAIN
    out = []
    for k in (1, 2, 3, 4, 5, 6, 8):
        err = [float(((x - c.double()[T.viterbi(x, L, k, c)]) ** 2).mean()) for c in (cb, T.codebook(L))]
        out.append(round(err[0] / err[1], 3))
    return out


def minilm_layers(L: int, cb: torch.Tensor) -> None:
    teacher = D.load_teacher()
    train = train_heldout_split()[0]
    cal = P.calibration(teacher, D.tokenize(teacher, P.calibration_sentences(train, n=256), P.CALIB_BATCH))
    names = ("layer.0.attention.self.query", "layer.2.intermediate.dense", "layer.4.output.dense",
             "layer.5.attention.output.dense")
    gain0 = T.ROW_GAIN
    for name, lin in ptq._layers(teacher, ("0.model.pooler.dense",)).items():
        if not name.endswith(names):
            continue
        b = layer_block(512, lin.in_features)
        wr = rotate_weight(lin.weight.detach().float(), b).double()
        h = ptq._moment(cal.stats, name, {}, {name: b}).double()  # the rotated inputs' moment, as the demo's PTQ
        base = float(((wr @ h) * wr).sum())
        row = []
        for gain in (1.0, 1.12):
            T.ROW_GAIN = gain
            for label, c in (("gaussian", T.codebook(L)), ("trained", cb)):
                codes, _, step = trellis_codes(wr, h, torch.full((wr.shape[0],), 4, dtype=torch.uint8), c)
                d = wr - codes.double() * step[:, None]
                row.append(f"{label} x{gain}: {float(((d @ h) * d).sum()) / base:.6f}")
        T.ROW_GAIN = gain0
        print(name.split("encoder.")[-1], tuple(wr.shape), ", ".join(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--states-log2", type=int, default=12)
    ap.add_argument("--iterations", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(2)
    soniq.set_num_threads(2)
    L = args.states_log2
    cb = train(L, args.iterations, max(1024, 2 ** L // 4))
    print(f"L = {L}: trained / Gaussian squared error on unit-Gaussian rows, k = 1, 2, 3, 4, 5, 6, 8:",
          gaussian_rows(L, cb), flush=True)
    minilm_layers(L, cb)


if __name__ == "__main__":
    main()
