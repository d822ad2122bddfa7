"""Measurement script (not part of the package): would a trellis-coded weight format lift the
MiniLM demo's fidelity at the same bits? docs/DESIGN_NOTES.md, "Trellis-coded weights".

    python docs/experiments/tcq_minilm.py [--states-log2 12] [--modes u4,t4,u5,t5] [--block 8]

Every Linear layer of all-MiniLM-L6-v2 (not the pooler) is rotated as the demo rotates it
(Hadamard blocks of 512) and rounded with GPTQ's error feedback on 1024 calibration sentences,
activations left in float. Modes: uN = the uniform N-bit grid soniq packs (best clip per row);
tN = a bitshift trellis (QTIP, Tseng et al. 2024): each column of the rotated weight, read down
its output channels, is one path through 2^L states, the state after each weight being the last
L bits of the path's N-bit steps, its value a fixed random Gaussian codebook entry (2^L of
them) times the row's scale; the path minimizing the squared error is found by Viterbi.
GPTQ rounds `--block` columns at a time (jointly) and feeds their error forward (LDLQ).
Prints the relative H-weighted layer error and the held-out / other-text cosine and top-1 of
the demo's metric. About 6 minutes on 2 cores for the four default modes."""
import argparse
import copy
import time

import torch

import soniq
from soniq import ptq
from soniq._gptq import _prepared, grid, mse_step, round_codes
from soniq._trellis import viterbi
from soniq._hadamard import layer_block, rotate_weight, unrotate_weight
from soniq.demos import minilm as D, minilm_ptq as P
from soniq.demos.text_corpus import reference_sentences, train_heldout_split


def codebook(states_log2: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2 ** states_log2, generator=torch.Generator().manual_seed(seed))


def trellis_round(x: torch.Tensor, states_log2: int, bits: int, cb: torch.Tensor) -> torch.Tensor:
    """x [R, T]: R independent sequences; the values of each one's least-squares path through
    the bitshift trellis over codebook cb (soniq._trellis.viterbi: paths from zero history; the
    session-43 table in docs/DESIGN_NOTES.md was measured with a free start state)."""
    return cb[viterbi(x, states_log2, bits, cb)]


def gptq_round(w, h, mode, states_log2, cb, block, damp=0.01):
    """Rounding of w [N, K] for inputs with moment h, `block` columns at a time, the block's
    error E = (W_b - Q_b) U_bb^-1 fed to the later columns through U (GPTQ's upper Cholesky
    factor of H^-1; block = 1 is GPTQ's column-by-column update)."""
    N, K = w.shape
    w, u, _ = _prepared(w, h, damp, act_order=False)  # GPTQ's prologue; columns in their own order
    bits = int(mode[1:])
    step = mse_step(w.float(), bits).double()
    lo, hi, al = grid(torch.full((N,), float(bits)))
    scale = w.pow(2).mean(1).sqrt() * 1.12  # the codebook's unit variance to the row's (best gain on Gaussians)
    q = torch.zeros_like(w)
    for j in range(0, K, block):
        e = min(j + block, K)
        x = w[:, j:e]
        if mode[0] == "u":
            qb = round_codes(x, step, lo, hi, al) * step[:, None]
        else:
            qb = trellis_round((x / scale[:, None]).T.float().contiguous(), states_log2, bits, cb).T.double() * scale[:, None]
        q[:, j:e] = qb
        err = torch.linalg.solve_triangular(u[j:e, j:e], x - qb, upper=True, left=False)
        w[:, e:] -= err @ u[j:e, e:]
    return q.float()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--states-log2", type=int, default=12)
    ap.add_argument("--modes", default="u4,t4,u5,t5")
    ap.add_argument("--block", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)
    soniq.set_num_threads(2)
    teacher = D.load_teacher()
    train, held = train_heldout_split()
    other = reference_sentences(exclude=set(train) | set(held))
    hb, ob = D.tokenize(teacher, held, 64), D.tokenize(teacher, other, 64)
    ref_h, ref_o = D.embed(teacher, hb), D.embed(teacher, ob)
    cal = P.calibration(teacher, D.tokenize(teacher, P.calibration_sentences(train, n=1024), P.CALIB_BATCH))
    cb = codebook(args.states_log2)
    for mode in args.modes.split(","):
        m, t0, err, norm = copy.deepcopy(teacher), time.time(), 0.0, 0.0
        for name, lin in ptq._layers(m, ("0.model.pooler.dense",)).items():
            b = layer_block(512, lin.in_features)
            w2 = rotate_weight(lin.weight.detach().float(), b)
            h = ptq._moment(cal.stats, name, {}, {name: b}).float()
            q = gptq_round(w2, h, mode, args.states_log2, cb, args.block)
            d = q - w2
            err, norm = err + float(((d @ h) * d).sum()), norm + float(((w2 @ h) * w2).sum())
            with torch.no_grad():
                lin.weight.copy_(unrotate_weight(q, b))
        r1, r2 = D.fidelity(D.embed(m, hb), ref_h), D.fidelity(D.embed(m, ob), ref_o)
        print(f"{mode} L={args.states_log2} block={args.block}: relative H-error {err / norm:.5f}, held-out "
              f"{r1['cosine']:.5f} / {r1['top1']:.1%}, other text {r2['cosine']:.5f} / {r2['top1']:.1%} "
              f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
