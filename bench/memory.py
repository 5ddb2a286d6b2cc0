"""Peak resident memory of `make reproduce`: the notebooks run headless into a fresh temporary results folder.

Runs the Makefile's command, `python -m amanlib run-notebooks` with the Makefile's PINNED options (e.g.
`-p backbone synthetic_macro`) and the -p options given here, in a subprocess whose results folder (--results) and synthetic data (data_dir) are in a temporary
folder, so nothing of the repository's results/ or data/ is read or written (checked before and after). Every
--interval seconds the resident set size (RSS) of the runner and all its descendants (the Jupyter kernels
papermill starts) is read and summed; the summed RSS counts pages shared by several processes once per
process, so it is an upper bound of what the tree holds. Prints the peak of the sum, the peak of the largest
single process, both per notebook, the wall time, and the peak over the 4 GB target (GB = 10^9 bytes).
Writes results/bench/memory.csv.

    python bench/memory.py                                   # the default synthetic run: about 7-10 min
    python bench/memory.py -p synthetic_subjects 3 -p synthetic_clips_per_subject 3 -p n_frames 2 \\
        -p factors '[2, 4]' -p epochs 2 -p seeds '[0]' -p backbone random -p fidelity authors  # quick
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("AMANLIB_REFERENCE", REPO.parent / "shared" / "reference"))
MAGNET_REF = REFERENCE / "magnet" / "learning_based_mag.pth.tar"
TARGET_GB = 4.0
GB = 1e9
WATCHED = ("results", "data")  # the repository folders a run must leave alone


@dataclass
class Peaks:
    """Peak summed RSS and peak single-process RSS, overall and per running notebook."""

    total: int = 0
    single: int = 0
    single_name: str = ""
    samples: int = 0
    by_stage: dict[str, list[int]] = field(default_factory=dict)  # stage -> [peak total, peak single]

    def add(self, stage: str, sizes: dict[str, int]) -> None:
        total = sum(sizes.values())
        name, single = max(sizes.items(), key=lambda kv: kv[1], default=("", 0))
        self.samples += 1
        if single > self.single:
            self.single, self.single_name = single, name
        self.total = max(self.total, total)
        peak = self.by_stage.setdefault(stage, [0, 0])
        peak[0], peak[1] = max(peak[0], total), max(peak[1], single)


def tree_rss(root: psutil.Process) -> dict[str, int]:
    """RSS in bytes of root and every descendant alive now, keyed 'pid name'; processes that end meanwhile
    are skipped."""
    sizes = {}
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return sizes
    for proc in procs:
        try:
            sizes[f"{proc.pid} {proc.name()}"] = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sizes


def running_notebook(notebooks_dir: Path) -> str:
    """The notebook being executed: papermill writes its output notebook when it starts it and after each
    cell, so it is the most recently written one ('startup' before the first)."""
    try:
        books = [(e.stat().st_mtime_ns, e.name) for e in os.scandir(notebooks_dir) if e.name.endswith(".ipynb")]
    except FileNotFoundError:
        return "startup"
    return max(books)[1].removesuffix(".ipynb") if books else "startup"


def snapshot(folders) -> dict[str, tuple[int, int]]:
    """Path -> (size, mtime_ns) of every file under the folders, to show a run left them alone."""
    files = {}
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                stat = path.stat()
                files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


def pinned() -> list[str]:
    """The options the Makefile's `reproduce` pins (its PINNED line), read from the Makefile to stay in step."""
    found = re.search(r"^PINNED\s*:?=(.*)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    if not found:
        raise RuntimeError(f"no PINNED line in {REPO / 'Makefile'}: cannot tell what `make reproduce` runs")
    return shlex.split(found.group(1))


def command(tmp: Path, params: list[list[str]], only: str | None) -> list[str]:
    """The Makefile's run-notebooks command, into tmp/results with synthetic data in tmp/data."""
    cmd = [sys.executable, "-m", "amanlib", "run-notebooks", *pinned(), "--results", str(tmp / "results"),
           "-p", "data_dir", str(tmp / "data")]
    for name, value in params:
        cmd += ["-p", name, value]
    return cmd + (["--only", only] if only else [])


def environment() -> dict[str, str]:
    """The Makefile's environment: the magnification checkpoint from $AMANLIB_MAGNET_CHECKPOINT, else the
    reference copy when present (else the notebooks use ~/.cache/amanlib, downloading it if needed)."""
    env = dict(os.environ)
    if not env.get("AMANLIB_MAGNET_CHECKPOINT") and MAGNET_REF.is_file():
        env["AMANLIB_MAGNET_CHECKPOINT"] = str(MAGNET_REF)
    return env


def watch(cmd: list[str], log_path: Path, notebooks_dir: Path, interval: float) -> tuple[int, float, Peaks]:
    """Run cmd (output to log_path) and sample its process tree until it ends: (exit code, seconds, peaks)."""
    peaks = Peaks()
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            sizes = tree_rss(root)
            if sizes:
                peaks.add(running_notebook(notebooks_dir), sizes)
            time.sleep(interval)
        seconds = time.perf_counter() - start
    return proc.returncode, seconds, peaks


def report(peaks: Peaks, seconds: float, code: int, label: str, cmd: list[str]) -> pd.DataFrame:
    """One row for the whole run and one per notebook: peaks in GB, ratio to the target."""
    rows = [dict(scope="whole run", peak_total_gb=peaks.total / GB, peak_process_gb=peaks.single / GB,
                 largest_process=peaks.single_name, seconds=seconds)]
    rows += [dict(scope=stage, peak_total_gb=total / GB, peak_process_gb=single / GB)
             for stage, (total, single) in peaks.by_stage.items()]
    table = pd.DataFrame(rows)
    table["peak_over_target"] = table.peak_total_gb / TARGET_GB
    table["setting"], table["exit_code"], table["samples"] = label, code, peaks.samples
    table["machine"] = f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, " \
                       f"{psutil.virtual_memory().total / GB:.0f} GB"
    table["command"] = " ".join(cmd)
    return table


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a notebook parameter passed to run-notebooks (as `make reproduce ARGS=...` would)")
    p.add_argument("--only", help="notebook numbers to run, e.g. 01,02,03")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    p.add_argument("--label", default=None, help="name of this setting in the CSV (default: the parameters)")
    p.add_argument("--out", default=str(REPO / "results" / "bench" / "memory.csv"),
                   help="CSV to write; rows of earlier settings are kept")
    args = p.parse_args(argv)
    label = args.label or (" ".join(f"{n}={v}" for n, v in args.p) or "default")
    before = snapshot(REPO / f for f in WATCHED)
    tmp = Path(tempfile.mkdtemp(prefix="amanlib-memory-"))
    cmd = command(tmp, args.p, args.only)
    print(f"running {' '.join(cmd)}\n  output in {tmp / 'run.log'}", flush=True)
    try:
        code, seconds, peaks = watch(cmd, tmp / "run.log", tmp / "results" / "notebooks", args.interval)
        if code:
            print(f"the run failed (exit code {code}); the end of its output:")
            print("\n".join((tmp / "run.log").read_text().splitlines()[-15:]))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    changed = sorted(set(before.items()) ^ set(snapshot(REPO / f for f in WATCHED).items()))
    table = report(peaks, seconds, code, label, cmd)
    print(f"# {table.machine.iloc[0]}; {peaks.samples} samples every {args.interval} s; summed RSS of the runner and "
          f"its kernels (shared pages counted per process)")
    print(table[["scope", "peak_total_gb", "peak_process_gb", "peak_over_target"]].round(3).to_string(index=False))
    print(f"peak {peaks.total / GB:.2f} GB summed ({peaks.single / GB:.2f} GB in the largest process, "
          f"{peaks.single_name}), wall time {seconds / 60:.1f} min; peak / {TARGET_GB:g} GB target = "
          f"{peaks.total / GB / TARGET_GB:.2f}")
    paths = sorted({path for path, _ in changed})
    print(f"repository {' and '.join(WATCHED)}: " + (f"{len(paths)} files changed during the run (another process?): "
                                                      f"{', '.join(paths[:5])}" if paths else "unchanged"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        table = pd.concat([pd.read_csv(out).query("setting != @label"), table], ignore_index=True)
    table.to_csv(out, index=False)
    print(f"wrote {out}" + (f"; kept {tmp}" if args.keep else ""))
    return table


if __name__ == "__main__":
    main()
