"""The `soniq` command line."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    import soniq
    from soniq._runtime import format_info

    d = soniq.info(verbose=False)
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def _cmd_demo_quick(args) -> int:
    from soniq.demos.quick import main as quick_main

    return quick_main(json_out=args.json)


def _cmd_demo_digits(args) -> int:
    try:
        from soniq.demos.digits import main as digits_main
    except ImportError as e:  # pragma: no cover
        raise RuntimeError(f"the digits demo needs the demo extras (pip install 'soniq[demo]'): {e}") from None
    return digits_main(seeds=args.seeds, quick=args.quick, json_path=args.json, out_dir=args.out, val=args.val)


def _cmd_demo_minilm(args) -> int:
    from soniq.demos.minilm import main as minilm_main

    return minilm_main(quick=args.quick, out_dir=args.out, json_path=args.json, save_dir=args.save,
                       threads=args.threads, sweep=args.sweep)


def _run_bench(module: str, args) -> int:
    """Runs a packaged benchmark. With --json the human-readable lines go to stderr and the
    saved document (meta, results, targets) to stdout."""
    import contextlib
    import importlib

    main = importlib.import_module(f"soniq.benchmarks.{module}").main
    argv = list(args.bench_args) + ["--out", args.out]
    if not args.json:
        main(argv)
        return 0
    with contextlib.redirect_stdout(sys.stderr):
        doc = main(argv)
    print(json.dumps(doc, indent=1))
    return 0


def _cmd_bench_cpu(args) -> int:
    return _run_bench("cpu_gemm", args)


def _cmd_bench_gpu(args) -> int:
    return _run_bench("gpu_gemm", args)


def _add_bench_parser(bsub, name: str, help_: str, flags: list, func) -> None:
    p = bsub.add_parser(name, help=help_, description=help_)
    for flag, kw in flags:
        p.add_argument(flag, **kw)
    p.add_argument("--out", default=".", metavar="DIR", help="folder for the JSON and markdown results (default .)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (progress on stderr)")
    p.set_defaults(func=func, bench_flags=[f for f, _ in flags])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soniq", description="soniq: per-channel mixed-precision quantization")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    pi = sub.add_parser("info", help="print version, build, CPU features, ISA path and threads")
    pi.add_argument("--json", action="store_true", help="print JSON instead of text")
    pi.set_defaults(func=_cmd_info)
    pd = sub.add_parser("demo", help="run a demo")
    dsub = pd.add_subparsers(dest="demo", metavar="DEMO")
    pq = dsub.add_parser("quick", help="pack a two-tier layer, run mpgemm, compare with numpy")
    pq.add_argument("--json", action="store_true", help="print JSON instead of text")
    pq.set_defaults(func=_cmd_demo_quick)
    # ---- demo digits (issue #8) ----
    pg = dsub.add_parser("digits", help="train a small CNN on sklearn digits: SONIQ vs FP32, uniform QAT, PTQ, Brevitas")
    pg.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; 1 with --quick)")
    pg.add_argument("--quick", action="store_true", help="few epochs (about a minute), for tests")
    pg.add_argument("--json", default=None, metavar="PATH", help="where to write the results JSON "
                    "(default OUT/digits_results.json)")
    pg.add_argument("--out", default=".", metavar="DIR", help="folder for the JSON and the PNG plot")
    pg.add_argument("--val", action="store_true", help="report on a validation split carved from the training "
                    "split (for tuning), not on the test split")
    pg.set_defaults(func=_cmd_demo_digits)
    # ---- demo minilm (issue #6) ----
    pm = dsub.add_parser("minilm", help="quantize a pretrained MiniLM sentence encoder with SONIQ: fidelity, size "
                         "and CPU speed vs FP32, FBGEMM INT8 and uniform 4/2-bit weights (needs soniq[transformer])")
    pm.add_argument("--quick", action="store_true", help="calibration on 64 sentences, 64 evaluated (under 3 "
                    "minutes), for tests")
    pm.add_argument("--out", default=".", metavar="DIR", help="folder for the results JSON and the PNG plot")
    pm.add_argument("--json", default=None, metavar="PATH", help="where to write the results JSON "
                    "(default OUT/minilm_results.json)")
    pm.add_argument("--save", default=None, metavar="DIR", help="also write the packed model to this folder "
                    "(soniq.load(DIR) gives a SentenceTransformer back)")
    pm.add_argument("--threads", type=int, default=2, help="CPU threads for torch and soniq (default 2)")
    pm.add_argument("--sweep", action="store_true", help="also the low-bit curve: SONIQ mixed-precision PTQ vs "
                    "uniform RTN / GPTQ at 3, 4, 4.4 (the saved model) and 6 weight bits, and INT8 (table, minilm_sweep.json/.png)")
    pm.set_defaults(func=_cmd_demo_minilm)
    # ---- bench (issues #4, #5): the packaged benchmarks, baselines measured in the same run ----
    pb = sub.add_parser("bench", help="run a benchmark against baselines measured in the same run")
    bsub = pb.add_subparsers(dest="bench", metavar="BENCH")
    _add_bench_parser(bsub, "cpu", "CPU GEMM/GEMV: soniq kernels vs torch fp32/bf16, FBGEMM and oneDNN INT8, "
                      "ONNX Runtime MatMulNBits (needs soniq[bench] for ORT)",
                      [("--quick", dict(action="store_true", help="small shapes, few repeats (under a minute)")),
                       ("--threads", dict(type=int, default=2, help="threads for soniq and torch (default 2)")),
                       ("--shapes", dict(default=None, help="comma-separated subset of the shapes ('minilm': the "
                                                      "MiniLM model end to end)"))], _cmd_bench_cpu)
    _add_bench_parser(bsub, "gpu", "GPU GEMM/GEMV: soniq CUDA kernels vs cuBLAS FP16 and INT8 (needs a CUDA GPU)",
                      [("--quick", dict(action="store_true", help="4096 instead of 8192 shapes")),
                       ("--no-verify", dict(action="store_true", help="skip the exactness check"))], _cmd_bench_gpu)
    pb.set_defaults(func=lambda a: (pb.print_help(), 2)[1])
    return p


def _bench_args(args) -> list:
    """The benchmark's own flags, rebuilt from the parsed CLI options."""
    out = []
    for flag in getattr(args, "bench_flags", []):
        v = getattr(args, flag.lstrip("-").replace("-", "_"))
        if v is True:
            out.append(flag)
        elif v is not None and v is not False:  # 0 == False: `--threads 0` must reach the check
            out += [flag, str(v)]
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.bench_args = _bench_args(args)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"soniq: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
