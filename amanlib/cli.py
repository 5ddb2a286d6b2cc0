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


def _run_notebooks(args) -> None:
    from .notebooks import parse_params, run_notebooks
    params = parse_params(args.params, args.p)
    run_notebooks(params, only=args.only, results_dir=args.results, notebooks_dir=args.notebooks,
                  cell_timeout=args.cell_timeout, echo=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amanlib", description="AMAN micro-expression recognition kit")
    parser.add_argument("--version", action="version", version=f"amanlib {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    score = sub.add_parser("score", help="UF1/UAR/accuracy of MEGC2019 log files (full and per dataset)")
    score.add_argument("logs", nargs="+", help="MEGC log files ('<db> <subject>' headers, '<clip> <gt> <pred>')")
    score.set_defaults(func=_score)
    run = sub.add_parser("run-notebooks", help="execute the notebooks headless with papermill into results/",
                         description="Execute notebooks/NN_*.ipynb in order with papermill. Parameters go to "
                                     "every notebook whose parameters cell defines them; an unknown name is an error.")
    run.add_argument("--params", help="YAML file of parameters (name: value)")
    run.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="one parameter; VALUE is read as YAML (12, 0.5, [2, 4], null, text)")
    run.add_argument("--only", help="comma-separated notebook numbers, e.g. 03,04")
    run.add_argument("--results", default="results", help="output folder (default: results)")
    run.add_argument("--notebooks", default=None, help="folder of the notebooks (default: the repo's notebooks/)")
    run.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                     help="stop with an error when one cell runs longer (default: no limit)")
    run.add_argument("--quiet", action="store_true", help="do not stream the notebooks' output and progress")
    run.set_defaults(func=_run_notebooks)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"amanlib {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
