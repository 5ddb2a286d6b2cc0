"""How much any factor chosen from the true motion could gain on a synthetic set: an upper bound from its run.

The oracle (amanlib.oracle) is one rule for choosing a clip's factor from the truth. This bounds every such rule
that looks only at the clip's true peak displacement: the clips are cut into n bins of it (stats.motion_bins) and
each bin takes the single factor that scored best on that very bin's test predictions, chosen after the fact, so
the bound is optimistic by construction (more bins, more of it is selection on noise). It reuses the single-factor
heads of a committed run and trains nothing. Its UF1 minus the best single factor's, with notebook 04's paired
subject-and-seed bootstrap CI (the choice held fixed), says whether a regime leaves room for the issue's positive
control: if even this bound stays below +0.05 UF1, no motion-based oracle can pass it. Its calibration: the same
bound with the peaks shuffled across clips (bins that know nothing of the motion; --shuffles times), whose mean is
what selection on noise alone gives, and the share of shuffles whose bound reaches the real one (p). Writes
results/bench/adaptation_headroom.csv.

    python bench/adaptation_headroom.py results results/wide results/phase
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from amanlib import results, stats
from amanlib.metrics import uf1
from amanlib.data import truth_for

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"  # where the notebooks ran: a clip table's relative frame folders start there


def folder_truth(folder: Path) -> pd.DataFrame:
    """The synthetic truth of a results folder's clips (subject, clip, peak_px, ...)."""
    index = results.read_index(folder)
    index["frames_dir"] = [str(d if Path(d).is_absolute() else NOTEBOOKS / d) for d in index["frames_dir"]]
    truth = truth_for(index)
    if truth is None:
        raise SystemExit(f"{folder}: real data has no truth to bin the clips by")
    return truth


def binned_choice(predictions: pd.DataFrame, peak: pd.Series, singles: list[str],
                  n_bins: int) -> tuple[pd.DataFrame, list[str]]:
    """The predictions of the bound with n_bins bins (variant "binned choice") and each bin's chosen factor."""
    codes, _ = stats.motion_bins(peak.to_numpy(), n_bins)
    bin_of = pd.Series(codes, index=peak.index)
    clip_bin = bin_of.loc[list(zip(predictions["subject"], predictions["clip"]))].to_numpy()
    hit = predictions["gt"] == predictions["pred"]
    picks, parts = [], []
    for b in range(n_bins):
        in_bin = clip_bin == b
        if not in_bin.any():
            continue
        best = max(singles, key=lambda v: hit[in_bin & (predictions["variant"] == v)].mean())
        picks.append(best.removeprefix("single factor "))
        parts.append(predictions[in_bin & (predictions["variant"] == best)])
    return pd.concat(parts).assign(variant="binned choice"), picks


def _shown(folder: Path) -> str:
    """A folder as the CSV names it: relative to the repository when inside it."""
    folder = folder.resolve()
    return str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder)


def _uf1(predictions: pd.DataFrame) -> float:
    """Seed-mean UF1 over all clips, as notebook 04 scores a variant."""
    return float(np.mean([uf1(g["gt"], g["pred"]) for _, g in predictions.groupby("seed")]))


def shuffled_bounds(predictions: pd.DataFrame, peak: pd.Series, singles: list[str], n_bins: int, shuffles: int,
                    seed: int = 0) -> np.ndarray:
    """The bound's UF1 with the clips' peaks permuted `shuffles` times: selection on bins that carry no motion."""
    rng = np.random.default_rng(seed)
    return np.array([_uf1(binned_choice(predictions, pd.Series(rng.permutation(peak.to_numpy()), index=peak.index),
                                        singles, n_bins)[0]) for _ in range(shuffles)])


def headroom(folder: Path, bins=(3, 5, 10), shuffles: int = 100) -> pd.DataFrame:
    """Per number of bins: the bound's UF1 minus the best single factor's, with its CI, and the bins' factors."""
    metrics = results.read_metrics(folder)
    predictions = results.sweep_predictions(folder, metrics)
    truth = folder_truth(folder).astype({"subject": str, "clip": str})
    peak = truth.set_index(["subject", "clip"])["peak_px"]
    predictions = predictions.astype({"subject": str, "clip": str})
    singles = stats.single_factors(predictions["variant"].unique())
    if len(singles) < 2:
        raise SystemExit(f"{folder}: fewer than 2 single-factor variants (run notebook 04 with ablations)")
    single_runs = predictions[predictions["variant"].isin(singles)]
    best = stats.best_single_factor(stats.bootstrap_scores(single_runs))
    best_runs = predictions[predictions["variant"] == best]
    rows = []
    for n in bins:
        bound, picks = binned_choice(single_runs, peak, singles, n)
        pair = pd.concat([bound, best_runs])
        null = shuffled_bounds(single_runs, peak, singles, n, shuffles)
        real, single = _uf1(bound), _uf1(best_runs)
        calibration = {"shuffled_minus_best_uf1": float(null.mean() - single),
                       "p_shuffled": float((1 + (null >= real).sum()) / (1 + len(null)))}
        for r in stats.paired_comparisons(pair, reference="binned choice", n_permutations=1):
            rows.append({"folder": _shown(folder), "regime": metrics.get("synthetic_regime"),
                         "magnifier": metrics.get("magnifier"), "bins": n,
                         "factors_by_bin": " ".join(picks), "best_single": best, "metric": r["metric"],
                         "bound_minus_best": r["diff"], "ci_lo": r["ci"][0], "ci_hi": r["ci"][1], **calibration})
    return pd.DataFrame(rows)


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="*", default=[str(REPO / "results"), str(REPO / "results" / "wide"),
                                                  str(REPO / "results" / "phase")])
    p.add_argument("--shuffles", type=int, default=100, help="permutations of the peaks for the calibration")
    p.add_argument("--out", default=str(REPO / "results" / "bench" / "adaptation_headroom.csv"))
    args = p.parse_args(argv)
    if args.shuffles < 1:
        p.error(f"--shuffles must be at least 1, got {args.shuffles}")
    table = pd.concat([headroom(Path(f), shuffles=args.shuffles) for f in args.folders], ignore_index=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
