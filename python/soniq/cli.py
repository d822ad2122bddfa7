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
    return digits_main(seeds=args.seeds, quick=args.quick, json_path=args.json, out_dir=args.out)


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
    pg.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    pg.add_argument("--quick", action="store_true", help="few epochs (about a minute), for tests")
    pg.add_argument("--json", default=None, metavar="PATH", help="where to write the results JSON "
                    "(default OUT/digits_results.json)")
    pg.add_argument("--out", default=".", metavar="DIR", help="folder for the JSON and the PNG plot")
    pg.set_defaults(func=_cmd_demo_digits)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"soniq: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
