"""CIs that count the trunk: the synthetic default once per trunk seed, pooled, against the committed CIs.

The committed CIs resample subjects and training seeds on one pre-trained trunk, so they hold the trunk fixed
(README: across machines). This runs `make reproduce`'s notebooks 01, 03 and 04 once per trunk seed t with one
training seed, t (so each unit is a (trunk, training seed) pair), pools the runs' predictions as one run of
len(trunks) seeds and bootstraps subjects and pairs together, as notebook 04 does for seeds. Each results folder is
cached (a re-run only pools). Writes results/bench/trunk_seeds.csv: per variant the pooled mean and CI beside the
committed ones (width ratio), and for each --compare folder (another run of the default: another trunk seed, another
CPU) whether its mean falls inside each CI and, as a comparison should be made, its difference from the committed
run with a CI (the subject-and-seed bootstrap of notebook 04, the two runs' seeds paired by number).

    python bench/trunk_seeds.py --trunks 0 1 2 3 4 --work /tmp/trunk_seeds --compare /tmp/avx2 /tmp/trunk1
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from amanlib import results, stats

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("AMANLIB_REFERENCE", REPO.parent / "shared" / "reference"))
MAGNET = REFERENCE / "magnet" / "learning_based_mag.pth.tar"


def run_trunk(trunk: int, folder: Path) -> float:
    """Notebooks 01, 03 and 04 of the synthetic default with trunk seed `trunk` and training seed `trunk`."""
    env = dict(os.environ)
    if "AMANLIB_MAGNET_CHECKPOINT" not in env and MAGNET.exists():
        env["AMANLIB_MAGNET_CHECKPOINT"] = str(MAGNET)
    cmd = [sys.executable, "-m", "amanlib", "run-notebooks", "--only", "01,03,04", "--quiet", "--results",
           str(folder), "-p", "backbone", "synthetic_macro", "-p", "trunk_seed", str(trunk),
           "-p", "seeds", f"[{trunk}]"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    return time.perf_counter() - start


def folder_predictions(folder: str | Path) -> pd.DataFrame:
    """A results folder's predictions, every variant and seed (the runs its metrics.json names)."""
    return results.sweep_predictions(folder, results.read_metrics(folder))


def run_differences(a: pd.DataFrame, other: str | Path) -> pd.DataFrame:
    """Per variant and metric: the other folder's run minus the run of predictions `a` on the same clips, with its
    95% CI."""
    b = folder_predictions(other)
    rows = []
    for variant in a["variant"].unique():
        both = pd.concat([a[a["variant"] == variant], b[b["variant"] == variant].assign(variant="other")])
        for r in stats.paired_comparisons(both, reference="other", n_permutations=1):
            rows.append({"variant": variant, "metric": r["metric"], "diff": r["diff"], "diff_lo": r["ci"][0],
                         "diff_hi": r["ci"][1]})
    return pd.DataFrame(rows)


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trunks", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--work", default="/tmp/amanlib_trunk_seeds", help="results folders, one per trunk (cached)")
    p.add_argument("--committed", default=str(REPO / "results"), help="the committed default's results folder")
    p.add_argument("--compare", nargs="*", default=[], help="results folders of other runs of the default")
    p.add_argument("--out", default=str(REPO / "results" / "bench" / "trunk_seeds.csv"))
    args = p.parse_args(argv)
    if len(set(args.trunks)) < 2:
        raise SystemExit("--trunks: at least 2 different trunk seeds are needed for a CI over trunks")
    folders = [Path(args.work) / f"trunk{t}" for t in args.trunks]
    for t, folder in zip(args.trunks, folders):
        if not (folder / "metrics.json").exists():
            print(f"trunk {t}: {run_trunk(t, folder):.0f} s of notebooks into {folder}", flush=True)
    predictions = pd.concat([folder_predictions(f) for f in folders], ignore_index=True)  # seeds: (trunk, seed)
    pooled = stats.bootstrap_scores(predictions)
    committed = results.read_metrics(args.committed)["ablations"]
    others = {path: results.read_metrics(path)["ablations"] for path in args.compare}
    rows = []
    for variant, row in pooled.iterrows():
        for metric in ("uf1", "uar"):
            lo, hi = committed[variant][f"{metric}_ci"]
            entry = {"variant": variant, "metric": metric, "pooled": row[metric], "pooled_lo": row[f"{metric}_ci_lo"],
                     "pooled_hi": row[f"{metric}_ci_hi"], "committed": committed[variant][metric],
                     "committed_lo": lo, "committed_hi": hi,
                     "width_ratio": (row[f"{metric}_ci_hi"] - row[f"{metric}_ci_lo"]) / (hi - lo)}
            for i, (path, other) in enumerate(others.items()):
                x = other[variant][metric]
                entry[f"compare{i}"] = x
                entry[f"compare{i}_in_committed"] = lo <= x <= hi
                entry[f"compare{i}_in_pooled"] = row[f"{metric}_ci_lo"] <= x <= row[f"{metric}_ci_hi"]
            rows.append(entry)
    table = pd.DataFrame(rows)
    base = folder_predictions(args.committed) if args.compare else None
    for i, path in enumerate(args.compare):
        diff = run_differences(base, path).rename(
            columns={c: f"compare{i}_{c}" for c in ("diff", "diff_lo", "diff_hi")})
        table = table.merge(diff, on=["variant", "metric"], how="left")
    diffs = pd.DataFrame(stats.paired_comparisons(predictions))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(f"{len(args.trunks)} (trunk, training seed) pairs: trunks {args.trunks}; committed: {args.committed}")
        print(table.round(3).to_string(index=False))
        print(diffs.assign(ci=diffs["ci"].map(lambda c: f"[{c[0]:+.3f}, {c[1]:+.3f}]"))
              [["a", "b", "metric", "diff", "ci", "p_value"]].round(4).to_string(index=False))
        for i, path in enumerate(others):
            zero = ((table[f"compare{i}_diff_lo"] <= 0) & (table[f"compare{i}_diff_hi"] >= 0)).sum()
            print(f"compare{i} = {path}: {int(table[f'compare{i}_in_committed'].sum())}/{len(table)} inside the "
                  f"committed CIs, {int(table[f'compare{i}_in_pooled'].sum())}/{len(table)} inside the pooled ones; "
                  f"its difference from the committed run has a CI holding 0 for {zero}/{len(table)}, median "
                  f"{table[f'compare{i}_diff'].median():+.3f}")
        print(f"CI width, pooled over trunks / committed (trunk fixed): median {table['width_ratio'].median():.2f}")
    return table


if __name__ == "__main__":
    main()
