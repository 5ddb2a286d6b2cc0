"""Command line: `python -m amanlib <command>`; each command is a thin call into the library.

Every error a user can cause (a bad parameter or file, a malformed params file, a folder that is not
writable, disk full, a notebook that fails) is one line "amanlib <command>: error: ..." on stderr and exit
code 2, with no traceback."""
from __future__ import annotations

import argparse
import errno
import math
import sys
from pathlib import Path

from . import __version__


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line too (argparse prints the usage first), pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _classes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected a number of classes >= 2, got {text!r}")
    return value


def _score(args) -> None:
    from .metrics import megc_scores, read_megc_log
    for path in args.logs:
        log = read_megc_log(path, args.classes)
        mark = " (OPTIMISTIC: epoch chosen on the held-out subject, as its log says)" if log.attrs["optimistic"] else ""
        print(f"# {path}{mark}")
        print(megc_scores(log).round(4).to_string())


def _readme(args) -> None:
    from . import timing
    from .report import REGIME_FOLDERS, gpu_markdown, magnifiers_markdown, render_readme
    from .results import read_metrics
    folders = [Path(args.results) / name for name in REGIME_FOLDERS]
    others = [read_metrics(folder) for folder in folders if (folder / "metrics.json").is_file()]
    changed = render_readme(args.readme, read_metrics(args.results), timing.read(args.results), others,
                            magnifiers_markdown(args.results), gpu_markdown(args.results))
    state = "updated" if changed else "already up to date"
    print(f"{args.readme}: results and timing tables {state} from {args.results}")


def _run_notebooks(args) -> None:
    from .notebooks import parse_params, run_notebooks
    params = parse_params(args.params, args.p)
    run_notebooks(params, only=args.only, results_dir=args.results, notebooks_dir=args.notebooks,
                  cell_timeout=args.cell_timeout, echo=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="amanlib", description="AMAN micro-expression recognition kit")
    parser.add_argument("--version", action="version", version=f"amanlib {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback, not one line")
    sub = parser.add_subparsers(dest="command", metavar="command")
    score = sub.add_parser("score", help="UF1/UAR/accuracy of MEGC2019 log files (full and per dataset)")
    score.add_argument("logs", nargs="+", help="MEGC log files ('<db> <subject>' headers, '<clip> <gt> <pred>')")
    score.add_argument("--classes", type=_classes, default=3,
                       help="labels are 0 .. classes-1 (default 3: MEGC2019's negative, positive, surprise)")
    score.set_defaults(func=_score)
    run = sub.add_parser("run-notebooks", help="execute the notebooks headless with papermill into results/",
                         description="Execute notebooks/NN_*.ipynb in order with papermill. Parameters are "
                                     "checked before the first notebook starts and go to every notebook whose "
                                     "parameters cell defines them; an unknown name is an error, a name only "
                                     "notebooks left out by --only read is dropped with a note.")
    run.add_argument("--params", help="YAML file of parameters (name: value)")
    run.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="one parameter; VALUE is read as YAML (12, 0.5, 1e-3, [2, 4], null, text)")
    run.add_argument("--only", help="comma-separated notebook numbers, e.g. 03,04")
    run.add_argument("--results", default=None,
                     help="output folder (default: the results_dir parameter, else results); locked while running")
    run.add_argument("--notebooks", default=None, help="folder of the notebooks (default: the repo's notebooks/)")
    run.add_argument("--cell-timeout", type=_seconds, default=None, metavar="SECONDS",
                     help="stop with an error when one cell runs longer (default: no limit)")
    run.add_argument("--quiet", action="store_true", help="do not stream the notebooks' output and progress")
    run.set_defaults(func=_run_notebooks)
    readme = sub.add_parser("readme", help="render README's results and timing tables from results/metrics.json "
                                           "and results/timing.json")
    readme.add_argument("--results", default="results", help="results folder holding metrics.json")
    readme.add_argument("--readme", default="README.md", help="the README to update")
    readme.set_defaults(func=_readme)
    return parser


def _message(e: Exception) -> str:
    """One line: an OSError from the system as "file: what happened", anything else as its text."""
    if isinstance(e, OSError) and e.strerror:
        what = e.strerror
        if e.errno in errno.errorcode and errno.errorcode[e.errno] not in what:
            what += f" ({errno.errorcode[e.errno]})"
        if e.filename is not None:
            target = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
            text = f"{target}: {what}"
        else:
            text = what
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (2), --help and --version (0)
        return e.code if isinstance(e.code, int) else 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except Exception as e:  # one line for any error (--debug: the traceback); Ctrl-C is not an Exception
        if args.debug:
            raise
        expected = isinstance(e, (ValueError, RuntimeError, OSError))  # the kit's own errors name what to do
        text = _message(e) if expected else f"{type(e).__name__}: {_message(e)} (amanlib --debug shows where)"
        print(f"amanlib {args.command}: error: {text}", file=sys.stderr)
        return 2
    return 0
