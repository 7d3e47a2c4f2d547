"""The ``spnas`` command line. Library errors become one-line messages and exit status 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from . import __version__
from .errors import SpnasError

log = logging.getLogger("spnas")


def _desc_from_args(args: argparse.Namespace) -> dict:
    desc: dict = {"backbone": {"code": args.code}, "neck": {}}
    if args.block is not None:
        desc["backbone"]["block"] = args.block
    if args.base_channels is not None:
        desc["backbone"]["base_channels"] = args.base_channels
    if args.parallel is not None:
        desc["neck"]["code"] = args.parallel
    if args.num_classes is not None:
        desc["num_classes"] = args.num_classes
    return desc


def cmd_describe(args: argparse.Namespace) -> int:
    from .measure import describe
    info = describe(_desc_from_args(args), size=args.size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    d, p = info["desc"], info["params"]
    bb = d["backbone"]
    print(f"architecture  {info['arch']}")
    print(f"block         {bb['block']}   base channels {bb['base_channels']}   "
          f"classes {d['num_classes']}")
    print(f"serial code   {bb['code']}   ({sum(r['blocks'] for r in info['stages'])} blocks, "
          f"{len(info['stages'])} stages)")
    print(f"parallel code {d['neck']['code']}")
    print()
    print(f"{'stage':>5} {'code':<14} {'blocks':>6} {'in ch':>6} {'out ch':>6} {'stride':>6} {'parallel':>8}")
    for r in info["stages"]:
        print(f"{r['stage']:>5} {r['code']:<14} {r['blocks']:>6} {r['in_channels']:>6} "
              f"{r['out_channels']:>6} {r['stride']:>6} {r['parallel']:>8}")
    print()
    print(f"params        {p['total']:,} total: backbone {p['backbone']:,}, parallel {p['parallel']:,}, "
          f"FPN {p['neck']:,}, heads {p['heads']:,}")
    print(f"GFLOPs        {info['gflops']:.2f} (backbone + parallel + FPN at {info['size']}x{info['size']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spnas", description="SP-NAS detection backbone search")
    parser.add_argument("--version", action="version", version=f"spnas {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("describe", help="print blocks, stages, channels, strides, params and GFLOPs")
    p.add_argument("--code", default="111-2111-211111-211",
                   help="serial code, or Vega's one-string form r_111-2111-211111-211_0-0-0-0")
    p.add_argument("--block", default=None, help="basic | bottleneck | resnext (default bottleneck)")
    p.add_argument("--base-channels", type=int, default=None, help="stem width (default 64)")
    p.add_argument("--parallel", default=None, help="parallel code, e.g. 0,1,0,0 (default all zeros)")
    p.add_argument("--num-classes", type=int, default=None, help="classes incl. background (default 91)")
    p.add_argument("--size", type=int, default=800, help="square input size for GFLOPs (default 800)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_describe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SpnasError as exc:
        print(f"spnas {args.command}: error: {exc}", file=sys.stderr)
        return 2
