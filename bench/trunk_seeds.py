"""CIs that count the trunk: the synthetic default once per trunk seed, pooled, against the committed CIs.

The committed CIs resample subjects and training seeds on one pre-trained trunk, so they hold the trunk fixed
(README: across machines). This runs `make reproduce`'s notebooks 01, 03 and 04 once per trunk seed t with one
training seed, t (so each unit is a (trunk, training seed) pair), pools the runs' predictions as one run of
len(trunks) seeds and bootstraps subjects and pairs together, as notebook 04 does for seeds. Each trunk's notebooks
run on every call, and their keyed caches reuse what is already computed (a re-run mostly pools). Writes results/bench/trunk_seeds.csv: per variant the pooled mean and CI beside the
committed ones (width ratio), and for each --compare folder (another run of the default: another trunk seed, another
CPU) whether its mean falls inside each CI and, as a comparison should be made, its difference from the committed
run with a CI (the subject-and-seed bootstrap of notebook 04, the two runs' seeds paired by number); and beside it
trunk_seeds_comparisons.csv (named after --out): AMAN minus each variant on the pooled runs, and the oracle minus
the pooled best single factor, with CIs; and trunk_seeds_trunks.csv, each trunk's own verdict (its best single factor
overall and by tertile, the oracle against it, the mechanism check).

--all-seeds trains every trunk's features with the notebooks' seeds instead (len(trunks) x 5 pairs), and --param
sets notebook parameters on top of the default, so another configuration can be pooled over trunks too:

    python bench/trunk_seeds.py --trunks 0 1 2 3 4 --work /tmp/trunk_seeds --compare /tmp/avx2 /tmp/trunk1
    python bench/trunk_seeds.py --trunks 0 1 2 --all-seeds --param synthetic_regime wide --param magnifier phase \
        --work /tmp/phase_trunks --committed results/phase --out results/bench/trunk_seeds_phase.csv
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
from amanlib.oracle import ORACLE_VARIANT

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("AMANLIB_REFERENCE", REPO.parent / "shared" / "reference"))
MAGNET = REFERENCE / "magnet" / "learning_based_mag.pth.tar"
SEED_STRIDE = 1000  # pooled runs are numbered trunk * SEED_STRIDE + training seed


def run_trunk(trunk: int, folder: Path, all_seeds: bool = False, params=()) -> float:
    """Notebooks 01, 03 and 04 of the synthetic default with trunk seed `trunk` and training seed `trunk` (or the
    notebooks' seeds with all_seeds), with the notebook parameters `params` ((name, value) pairs) on top."""
    env = dict(os.environ)
    if "AMANLIB_MAGNET_CHECKPOINT" not in env and MAGNET.exists():
        env["AMANLIB_MAGNET_CHECKPOINT"] = str(MAGNET)
    cmd = [sys.executable, "-m", "amanlib", "run-notebooks", "--only", "01,03,04", "--quiet", "--results",
           str(folder), "-p", "backbone", "synthetic_macro", "-p", "trunk_seed", str(trunk)]
    cmd += [] if all_seeds else ["-p", "seeds", f"[{trunk}]"]
    cmd += [arg for name, value in params for arg in ("-p", name, value)]
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


def trunk_summary(trunk: int, folder: Path) -> dict:
    """One trunk's own verdict, from its metrics.json: AMAN, the best single factor, the oracle against it, the best
    single factor by tertile of true motion and the mechanism check (each on that trunk alone)."""
    m = results.read_metrics(folder)
    oracle = m.get("oracle") or {}
    control = next((c for c in oracle.get("minus_best_single_factor", []) if c["metric"] == "uf1"), None)
    mechanism = m.get("mechanism") or {}
    by_motion = (m.get("by_motion") or {}).get("best_single_factor_by_bin", {})
    best = oracle.get("best_single_factor")
    return {"trunk": trunk, "aman_uf1": m["uf1"], "best_single": best,
            "best_single_uf1": m["ablations"][best]["uf1"] if best else None,
            "oracle_minus_best": control and control["diff"], "oracle_minus_best_ci": control and control["ci"],
            "best_by_tertile": " ".join(v.removeprefix("single factor ") for v in by_motion.values()),
            "mechanism_rho": mechanism.get("spearman_r"), "mechanism_ci": mechanism.get("ci")}


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trunks", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--work", default="/tmp/amanlib_trunk_seeds", help="results folders, one per trunk (their caches reused)")
    p.add_argument("--committed", default=str(REPO / "results"), help="the committed default's results folder")
    p.add_argument("--compare", nargs="*", default=[], help="results folders of other runs of the default")
    p.add_argument("--all-seeds", action="store_true",
                   help="every trunk with the notebooks' training seeds, not training seed = trunk seed alone")
    p.add_argument("--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a notebook parameter on top of the default, e.g. --param magnifier phase (repeatable)")
    p.add_argument("--out", default=str(REPO / "results" / "bench" / "trunk_seeds.csv"))
    args = p.parse_args(argv)
    if len(set(args.trunks)) < 2:
        raise SystemExit("--trunks: at least 2 different trunk seeds are needed for a CI over trunks")
    folders = [Path(args.work) / f"trunk{t}" for t in args.trunks]
    for t, folder in zip(args.trunks, folders):  # always run: the notebooks' keyed caches decide what is reused
        seconds = run_trunk(t, folder, args.all_seeds, args.param)
        print(f"trunk {t}: {seconds:.0f} s of notebooks into {folder}", flush=True)
    predictions = pd.concat([folder_predictions(f).assign(trunk=t) for t, f in zip(args.trunks, folders)],
                            ignore_index=True)
    predictions["seed"] = predictions["trunk"] * SEED_STRIDE + predictions["seed"]  # a (trunk, seed) pair each
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
    best = stats.best_single_factor(pooled)
    if ORACLE_VARIANT in pooled.index and best is not None:  # the positive control on the pooled runs
        control = predictions[predictions["variant"].isin([ORACLE_VARIANT, best])]
        diffs = pd.concat([diffs, pd.DataFrame(stats.paired_comparisons(control, reference=ORACLE_VARIANT))],
                          ignore_index=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    diffs.assign(ci_lo=diffs["ci"].str[0], ci_hi=diffs["ci"].str[1]).drop(columns="ci").to_csv(
        Path(args.out).with_name(Path(args.out).stem + "_comparisons.csv"), index=False)
    trunks = pd.DataFrame([trunk_summary(t, f) for t, f in zip(args.trunks, folders)])
    trunks.to_csv(Path(args.out).with_name(Path(args.out).stem + "_trunks.csv"), index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(f"{predictions['seed'].nunique()} (trunk, training seed) pairs: trunks {args.trunks}; committed: "
              f"{args.committed}")
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
        print(trunks.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
