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
