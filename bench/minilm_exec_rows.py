"""The MiniLM demo's packed model two ways, A/B interleaved in one process: its tiers on the
uniform grid ((4, 5) @ 4.4 per 8 output channels, the saved model before session 44) against
every row 8-bit (how the trellis-coded saved model runs: its codes are the codebook's int8
entries). Round-to-nearest codes (the values do not change the speed), inputs rotated as the
demo's. Prints medians and ratios with the CPU; nothing here is a test.

    PYTHONPATH=python python bench/minilm_exec_rows.py [--threads 2] [--rounds 9]
"""
import argparse
import dataclasses
import statistics
import time

import torch

import soniq
from soniq.benchmarks.cpu_model import features
from soniq.demos import minilm as demo, minilm_ptq
from soniq.demos.text_corpus import train_heldout_split


def build(teacher, cal, palette, target):
    cfg = minilm_ptq.ptq_config("soniq", teacher, w_palette=palette, w_bits_target=target,
                                hadamard_block=demo.HADAMARD_BLOCK, tier_group=demo.TIER_GROUP)
    return minilm_ptq.ptq_model(teacher, cal, dataclasses.replace(cfg, rounding="rtn"))[1].eval()


def best_ms(m, f, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        m(dict(f))
        out.append(time.perf_counter() - t0)
    return min(out) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    soniq.set_num_threads(args.threads)
    teacher = demo.load_teacher()
    train, _ = train_heldout_split()
    cal = minilm_ptq.calibration(teacher, demo.tokenize(teacher, minilm_ptq.calibration_sentences(train, n=64), 32))
    grid = f"grid {demo.W_PALETTE} @ {demo.W_TARGET:g}, tiers per {demo.TIER_GROUP}"
    models = {grid: build(teacher, cal, demo.W_PALETTE, demo.W_TARGET), "8-bit rows": build(teacher, cal, (8, 8), 8.0)}
    print(f"{soniq.info(verbose=False)['cpu']['model']}, ISA {soniq.get_isa()}, {args.threads} threads, seq {demo.SEQ}")
    for batch, reps, rounds in ((1, 10, args.rounds), (32, 2, max(3, args.rounds // 2))):
        f = features(teacher.tokenizer.vocab_size, batch)
        times = {k: [] for k in models}
        with torch.inference_mode():
            for m in models.values():
                m(dict(f))  # warm-up (execution layouts)
            for r in range(rounds):  # alternate the order so drift hits both alike
                for k, m in (list(models.items()) if r % 2 == 0 else list(models.items())[::-1]):
                    times[k].append(best_ms(m, f, reps))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
              + f"; 8-bit rows / grid {med['8-bit rows'] / med[grid]:.3f}", flush=True)


if __name__ == "__main__":
    main()
