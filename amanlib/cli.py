"""Command line: `python -m amanlib <command>`; each command is a thin call into the library."""
from __future__ import annotations

import argparse
import sys

from . import __version__


def _score(args) -> None:
    from .metrics import megc_scores, read_megc_log
    for path in args.logs:
        print(f"# {path}")
        print(megc_scores(read_megc_log(path)).round(4).to_string())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amanlib", description="AMAN micro-expression recognition kit")
    parser.add_argument("--version", action="version", version=f"amanlib {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    score = sub.add_parser("score", help="UF1/UAR/accuracy of MEGC2019 log files (full and per dataset)")
    score.add_argument("logs", nargs="+", help="MEGC log files ('<db> <subject>' headers, '<clip> <gt> <pred>')")
    score.set_defaults(func=_score)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"amanlib {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
