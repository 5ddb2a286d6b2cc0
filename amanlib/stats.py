"""Statistics for comparing variants trained with several seeds under LOSO: subject-and-seed bootstrap CIs of
UF1/UAR/accuracy, paired differences with a subject sign-flip test, the Spearman check of the mechanism and,
on synthetic data, the oracle against the best single factor and accuracy by tertile of the true motion.

The unit of resampling is the subject (`dataset/subject`): its clips are not independent and LOSO folds are
subjects. Scores of pooled clips depend only on their confusion matrix, so every resample is computed from
per (variant, seed, subject) confusion counts weighted by how often each subject was drawn.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from .oracle import CONTROL_NOTE, ORACLE_TARGET_PX, ORACLE_VARIANT, oracle_choice

PREDICTION_COLUMNS = ("variant", "seed", "dataset", "subject", "clip", "gt", "pred")
METRICS = ("uf1", "uar", "accuracy")
CHUNK = 256  # resamples per block: bounds the memory of the [R, V, S, C, C] confusion arrays
TOL = 1e-12  # permutation statistics this close to the observed one count as reaching it (rounding)


@dataclass(frozen=True)
class _Tables:
    """Confusion counts per (variant, seed, subject) and what their axes mean."""
    variants: list
    subjects: list  # 'dataset/subject' keys, sorted
    n_seeds: np.ndarray  # [V]; a variant's seeds fill the first n_seeds[v] slots, the rest are zero
    counts: np.ndarray  # float [V, S, N, C, C]: rows the true class, columns the predicted class
    n_clips: int


def _check_resampling(n_resamples: int, level: float) -> None:
    """Reject a resample count below 1 and a confidence level outside (0, 1) before any work."""
    if isinstance(n_resamples, bool) or int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")


def _check_predictions(predictions: pd.DataFrame) -> pd.DataFrame:
    """The predictions with `_subject` and `_clip` keys, after checking the columns, emptiness, missing values,
    repeated rows, that every (variant, seed) covers the same clips and that a clip has one ground truth."""
    missing = [c for c in PREDICTION_COLUMNS if c not in predictions]
    if missing:
        raise ValueError(f"predictions: columns {missing} are missing (have {list(predictions.columns)})")
    if len(predictions) == 0:
        raise ValueError("predictions: the table is empty")
    nulls = predictions[list(PREDICTION_COLUMNS)].isna().sum()
    if nulls.any():
        raise ValueError(f"predictions: missing values per column {nulls[nulls > 0].to_dict()}")
    subject = predictions["dataset"].astype(str) + "/" + predictions["subject"].astype(str)
    df = predictions.assign(_subject=subject, _clip=subject + "/" + predictions["clip"].astype(str))
    repeated = df.duplicated(["variant", "seed", "_clip"])
    if repeated.any():
        raise ValueError(f"predictions: {repeated.sum()} rows repeat a (variant, seed, clip), e.g. "
                         f"{df.loc[repeated, ['variant', 'seed', '_clip']].iloc[0].tolist()}")
    clips = set(df["_clip"])
    sizes = df.groupby(["variant", "seed"], sort=False).size()
    short = sizes[sizes < len(clips)]
    if len(short):
        variant, seed = short.index[0]
        absent = sorted(clips - set(df.loc[(df.variant == variant) & (df.seed == seed), "_clip"]))
        raise ValueError(f"predictions: every variant and seed must have the same {len(clips)} clips; "
                         f"{len(short)} (variant, seed) pairs lack some, e.g. ({variant!r}, {seed!r}) "
                         f"lacks {len(absent)} such as {absent[0]!r}")
    gts = df.groupby("_clip")["gt"].nunique()
    if (gts > 1).any():
        raise ValueError(f"predictions: {(gts > 1).sum()} clips have different gt in different rows, "
                         f"e.g. {gts[gts > 1].index[0]!r}")
    return df


def _tables(predictions: pd.DataFrame) -> _Tables:
    """Validate the predictions and count them into confusion matrices per (variant, seed, subject)."""
    df = _check_predictions(predictions)
    variants = list(pd.unique(df["variant"]))
    subjects = sorted(pd.unique(df["_subject"]))
    classes = np.unique(np.concatenate([df["gt"].to_numpy(), df["pred"].to_numpy()]))
    n_seeds = df.groupby("variant", sort=False)["seed"].nunique().reindex(variants).to_numpy()
    shape = (len(variants), n_seeds.max(), len(subjects), len(classes), len(classes))
    cell = np.ravel_multi_index((pd.Categorical(df["variant"], categories=variants).codes,
                                 df.groupby("variant", sort=False)["seed"].rank(method="dense").to_numpy(int) - 1,
                                 pd.Categorical(df["_subject"], categories=subjects).codes,
                                 np.searchsorted(classes, df["gt"].to_numpy()),
                                 np.searchsorted(classes, df["pred"].to_numpy())), shape)
    counts = np.bincount(cell, minlength=np.prod(shape)).reshape(shape).astype(float)
    return _Tables(variants, subjects, n_seeds, counts, df["_clip"].nunique())


def _confusion_scores(conf: np.ndarray) -> dict[str, np.ndarray]:
    """UF1, UAR and accuracy of confusion matrices [..., C, C], equal to sklearn's macro scores with
    zero_division=0 on the pooled labels: the mean runs over the classes present in gt or pred."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    true, pred = conf.sum(-1), conf.sum(-2)
    n_present = (true + pred > 0).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(true + pred > 0, 2 * tp / (true + pred), 0.0)
        recall = np.where(true > 0, tp / true, 0.0)
        return {"uf1": f1.sum(-1) / n_present, "uar": recall.sum(-1) / n_present,
                "accuracy": tp.sum(-1) / conf.sum((-2, -1))}


def _seed_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted sum over the last (seed) axis skipping weight-0 slots, one seed at a time so that identical
    variants give bit-identical results."""
    total = np.zeros(np.broadcast_shapes(values.shape[:-1], weights.shape[:-1]))
    for s in range(values.shape[-1]):
        total += np.where(weights[..., s] > 0, weights[..., s] * values[..., s], 0.0)
    return total


def _mean_weights(tables: _Tables) -> np.ndarray:
    """Seed weights [V, S] of a plain mean over each variant's own seeds."""
    slots = np.arange(tables.counts.shape[1])
    return np.where(slots < tables.n_seeds[:, None], 1.0 / tables.n_seeds[:, None], 0.0)


def _row_counts(draws: np.ndarray, n: int) -> np.ndarray:
    """Per row, how often each of 0..n-1 was drawn: indices [R, k] -> multiplicities [R, n]."""
    rows = draws.shape[0]
    flat = (draws + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n)


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for the bootstrap and the permutations, both from one int seed."""
    boot, perm = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(boot), np.random.default_rng(perm)


def _draws(tables: _Tables, n_resamples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Subject multiplicities [R, N] (one draw for all variants) and seed weights [R, V, S] (each variant's
    seeds drawn with replacement, the same draw for variants with as many seeds) of every resample."""
    n_subjects = len(tables.subjects)
    subject_w = _row_counts(rng.integers(0, n_subjects, (n_resamples, n_subjects)), n_subjects).astype(float)
    seed_w = np.zeros((n_resamples, *tables.counts.shape[:2]))
    for k in np.unique(tables.n_seeds):
        drawn = _row_counts(rng.integers(0, k, (n_resamples, k)), k) / k
        seed_w[:, tables.n_seeds == k, :k] = drawn[:, None, :]
    return subject_w, seed_w


def _bootstrap(tables: _Tables, n_resamples: int, seed: int) -> dict[str, np.ndarray]:
    """Per metric [R, V]: each resample's score on the drawn subjects' pooled clips, averaged over drawn seeds."""
    subject_w, seed_w = _draws(tables, n_resamples, _streams(seed)[0])
    n_variants, n_slots, n_subjects, n_classes, _ = tables.counts.shape
    flat = tables.counts.transpose(2, 0, 1, 3, 4).reshape(n_subjects, -1)
    out = {m: np.empty((n_resamples, n_variants)) for m in METRICS}
    for start in range(0, n_resamples, CHUNK):
        block = slice(start, start + CHUNK)
        conf = (subject_w[block] @ flat).reshape(-1, n_variants, n_slots, n_classes, n_classes)
        for metric, values in _confusion_scores(conf).items():
            out[metric][block] = _seed_mean(values, seed_w[block])
    return out


def _percentile_ci(samples: np.ndarray, level: float) -> np.ndarray:
    """The percentile interval [2, ...] of bootstrap samples along axis 0."""
    return np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)


def _seed_std(per_seed: np.ndarray, n_seeds: np.ndarray) -> np.ndarray:
    """Std over each variant's seeds (ddof=1), 0 for a single seed."""
    return np.array([np.std(row[:k], ddof=1) if k > 1 else 0.0 for row, k in zip(per_seed, n_seeds)])


def bootstrap_scores(predictions: pd.DataFrame, n_resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> pd.DataFrame:
    """Per variant the seed-mean UF1/UAR/accuracy, their std over seeds and a percentile bootstrap CI that
    resamples subjects (one draw for all variants) and seeds, so it covers both sources of noise."""
    _check_resampling(n_resamples, level)
    tables = _tables(predictions)
    per_seed = _confusion_scores(tables.counts.sum(axis=2))
    boot = _bootstrap(tables, n_resamples, seed)
    out = pd.DataFrame(index=pd.Index(tables.variants, name="variant"))
    for metric in METRICS:
        out[metric] = _seed_mean(per_seed[metric], _mean_weights(tables))
    for metric in METRICS:
        out[f"{metric}_std"] = _seed_std(per_seed[metric], tables.n_seeds)
    for metric in METRICS:
        out[f"{metric}_ci_lo"], out[f"{metric}_ci_hi"] = _percentile_ci(boot[metric], level)
    return out.assign(n_seeds=tables.n_seeds, n_subjects=len(tables.subjects), n_clips=tables.n_clips)


def _sign_flips(n_subjects: int, n_permutations: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Sign vectors [P, N]: all 2^N when that is at most n_permutations (exact), else n_permutations random."""
    if 2 ** n_subjects <= n_permutations:
        bits = (np.arange(2 ** n_subjects)[:, None] >> np.arange(n_subjects)) & 1
        return 1.0 - 2.0 * bits, True
    return rng.choice([-1.0, 1.0], size=(n_permutations, n_subjects)), False


def _sign_flip_p(d: np.ndarray, signs: np.ndarray, exact: bool) -> float:
    """Two-sided p of mean(d) against its sign-flip distribution: the exact fraction or (hits + 1) / (P + 1)."""
    observed = abs(d.mean())
    hits = np.count_nonzero(np.abs(signs @ d) / len(d) >= observed - TOL)
    return hits / len(signs) if exact else (hits + 1) / (len(signs) + 1)


def paired_comparisons(predictions: pd.DataFrame, reference: str = "AMAN", metrics=("uf1", "uar"),
                       n_resamples: int = 2000, n_permutations: int = 10000, seed: int = 0,
                       level: float = 0.95) -> list[dict]:
    """Reference minus each other variant per metric: the seed-mean difference on all clips, its paired
    subject-and-seed bootstrap CI (the draws of bootstrap_scores) and a sign-flip permutation p over subjects.

    The permutation test's per-subject difference is the metric on that subject's clips alone (macro over the
    classes in its gt or pred, zero_division 0), averaged over seeds.
    """
    _check_resampling(n_resamples, level)
    if isinstance(n_permutations, bool) or int(n_permutations) != n_permutations or n_permutations < 1:
        raise ValueError(f"n_permutations must be an integer >= 1, got {n_permutations!r}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty selection of {METRICS}, got {metrics!r}")
    tables = _tables(predictions)
    if reference not in tables.variants:
        raise ValueError(f"reference {reference!r} is not among the variants {tables.variants}")
    a = tables.variants.index(reference)
    weights = _mean_weights(tables)
    overall = {m: _seed_mean(v, weights) for m, v in _confusion_scores(tables.counts.sum(axis=2)).items()}
    per_subject = {m: _seed_mean(np.moveaxis(v, 1, -1), weights[:, None, :])
                   for m, v in _confusion_scores(tables.counts).items()}
    boot = _bootstrap(tables, n_resamples, seed)
    signs, exact = _sign_flips(len(tables.subjects), n_permutations, _streams(seed)[1])
    rows = []
    for b, name in enumerate(tables.variants):
        if b == a:
            continue
        for metric in metrics:
            lo, hi = _percentile_ci(boot[metric][:, a] - boot[metric][:, b], level)
            p = _sign_flip_p(per_subject[metric][a] - per_subject[metric][b], signs, exact)
            rows.append({"a": reference, "b": name, "metric": metric,
                         "diff": float(overall[metric][a] - overall[metric][b]),
                         "ci": [float(lo), float(hi)], "p_value": float(p)})
    return rows


def _mechanism_inputs(preferred: pd.Series, truth: pd.Series,
                      clusters: pd.Series | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two variables and cluster codes (one per clip without clusters), aligned on the index and checked."""
    preferred, truth = pd.Series(preferred), pd.Series(truth)
    clusters = pd.Series(np.arange(len(preferred)), index=preferred.index) if clusters is None else pd.Series(clusters)
    for name, series in (("truth", truth), ("clusters", clusters)):
        if len(series) != len(preferred) or set(series.index) != set(preferred.index):
            raise ValueError(f"spearman_mechanism: {name} ({len(series)} values) does not have the clips of "
                             f"preferred_factor ({len(preferred)} values) as its index")
    if not preferred.index.is_unique:
        raise ValueError("spearman_mechanism: the index repeats clips")
    truth, clusters = truth.reindex(preferred.index), clusters.reindex(preferred.index)
    nans = {name: int(s.isna().sum()) for name, s in
            (("preferred_factor", preferred), ("truth", truth), ("clusters", clusters)) if s.isna().any()}
    if nans:
        raise ValueError(f"spearman_mechanism: {sum(nans.values())} NaN values ({nans}); drop those clips first")
    x, y = preferred.to_numpy(float), truth.to_numpy(float)
    if _without_spread(x, y):
        raise ValueError(f"spearman_mechanism: needs at least 3 clips and non-constant values (n={len(x)})")
    return x, y, pd.factorize(clusters)[0]


def _without_spread(preferred, truth) -> str | None:
    """Why Spearman's rho of these values is undefined (fewer than 3 clips, or one side constant), or None."""
    preferred, truth = np.asarray(preferred, float), np.asarray(truth, float)
    if len(preferred) < 3:
        return f"{len(preferred)} clips with a preferred factor"
    if np.ptp(preferred) == 0:
        return "the preferred factor is the same for every clip"
    return "every clip has the same true motion" if np.ptp(truth) == 0 else None


def _weighted_ranks(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mid-ranks [R, n] of x in each resample where point i occurs weights[r, i] times (ties averaged)."""
    order = np.argsort(x, kind="stable")
    new_value = np.r_[True, x[order][1:] != x[order][:-1]]
    group_w = np.add.reduceat(weights[:, order], np.flatnonzero(new_value), axis=1)
    mid = np.cumsum(group_w, axis=1) - (group_w - 1) / 2
    ranks = np.empty_like(weights, dtype=float)
    ranks[:, order] = mid[:, np.cumsum(new_value) - 1]
    return ranks


def _weighted_spearman(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Spearman's rho [R] of each resample given as point multiplicities [R, n]; NaN where a side is constant."""
    rx, ry = _weighted_ranks(x, weights), _weighted_ranks(y, weights)
    total = weights.sum(axis=1, keepdims=True)
    dx = rx - (weights * rx).sum(axis=1, keepdims=True) / total
    dy = ry - (weights * ry).sum(axis=1, keepdims=True) / total
    with np.errstate(divide="ignore", invalid="ignore"):
        return (weights * dx * dy).sum(1) / np.sqrt((weights * dx ** 2).sum(1) * (weights * dy ** 2).sum(1))


def spearman_mechanism(preferred_factor: pd.Series, truth: pd.Series, n_resamples: int = 2000, seed: int = 0,
                       level: float = 0.95, clusters: pd.Series | None = None) -> dict:
    """Spearman's rho between each clip's preferred factor and its true peak displacement, with a percentile
    bootstrap CI and a two-sided p-value from the same resamples (twice the share of resampled rho on the far side
    of 0), resampling clusters (subjects) when given, else clips; undefined resamples are dropped. Clips of one
    subject share its motion, so a p-value that counted them as independent would be far too small."""
    _check_resampling(n_resamples, level)
    x, y, codes = _mechanism_inputs(preferred_factor, truth, clusters)
    rho = spearmanr(x, y).statistic
    n_groups = codes.max() + 1
    group_w = _row_counts(np.random.default_rng(seed).integers(0, n_groups, (n_resamples, n_groups)), n_groups)
    boot = np.concatenate([_weighted_spearman(x, y, group_w[start:start + CHUNK][:, codes].astype(float))
                           for start in range(0, n_resamples, CHUNK)])
    lo, hi = np.nanquantile(boot, [(1 - level) / 2, (1 + level) / 2])
    boot = boot[np.isfinite(boot)]
    far = min((boot <= 0).sum(), (boot >= 0).sum())
    p = min(1.0, 2 * (far + 1) / (len(boot) + 1))
    return {"spearman_r": float(rho), "ci": [float(lo), float(hi)], "p_value": p, "n": len(x)}


def preferred_factor(alpha: np.ndarray, factors) -> np.ndarray:
    """Per clip the alpha-weighted mean factor averaged over frames, from alpha [N, F, K] over K factor slots. A
    frame whose alpha is 0 for every factor (a saturated attention) has no preferred factor and is skipped; a clip
    with no such frame gets NaN."""
    alpha, factors = np.asarray(alpha, dtype=float), np.asarray(factors, dtype=float).ravel()
    if alpha.ndim != 3 or alpha.shape[-1] != len(factors) or 0 in alpha.shape:
        raise ValueError(f"preferred_factor: alpha must be [N, F, K] with K = {len(factors)} factors and no empty "
                         f"axis, got shape {alpha.shape}")
    if not np.isfinite(alpha).all() or (alpha < 0).any():
        raise ValueError("preferred_factor: alpha must be finite and non-negative")
    total = alpha.sum(-1)  # N, F
    per_frame = np.divide(alpha @ factors, total, out=np.full(total.shape, np.nan), where=total > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a clip without a weighted frame: NaN, counted by callers
        return np.nanmean(per_frame, axis=1)


def mechanism_data(runs, truth: pd.DataFrame) -> pd.DataFrame:
    """Per clip: subject, true peak displacement and preferred factor averaged over the runs (AMAN's seeds). Frames
    whose alpha has no weight are skipped; attrs counts them ('frames_without_weight', over all runs) and the clips
    left without a preferred factor in every run ('clips_without_weight'), which are dropped."""
    per_run, skipped = [], 0
    for run in runs:
        p = run.predictions
        alpha = np.stack(p["alpha"].to_list())
        skipped += int((alpha.sum(-1) <= 0).sum())
        per_run.append(pd.DataFrame({"subject": p["subject"].astype(str), "clip": p["clip"].astype(str),
                                     "preferred_factor": preferred_factor(alpha, run.config["factors"])}))
    mean = pd.concat(per_run).groupby(["subject", "clip"], sort=False, as_index=False)["preferred_factor"].mean()
    out = mean.dropna().merge(truth[["subject", "clip", "peak_px"]], on=["subject", "clip"], how="inner",
                              validate="1:1")
    out.attrs.update(frames_without_weight=skipped, clips_without_weight=int(mean["preferred_factor"].isna().sum()))
    return out


def mechanism_check(sweep, truth: pd.DataFrame | None, reference: str = "AMAN") -> dict | None:
    """Spearman's rho between AMAN's preferred factor and the true motion, subjects resampled; None without truth.
    It says how many clips it used (n) and how many frames and clips it skipped for want of alpha weight."""
    if truth is None:
        return None
    runs = [run for (variant, _), run in sweep.runs.items() if variant == reference]
    per_clip = mechanism_data(runs, truth)
    why = _without_spread(per_clip["preferred_factor"], per_clip["peak_px"])
    if why:
        return {"spearman_r": None, "ci": None, "p_value": None, "n": len(per_clip), "undefined": why,
                **per_clip.attrs}
    return {**spearman_mechanism(per_clip["preferred_factor"], per_clip["peak_px"], clusters=per_clip["subject"]),
            **per_clip.attrs}


MIN_SUBJECTS = 6
"""Subjects below which the kit's CIs and p-values are not 95% ones: a two-sided sign-flip test over S subjects
cannot give p < 0.05 below 6 (its smallest exact p is 2 / 2^S: 0.0625 at 5), and a bootstrap over 5 subjects has
only 126 distinct resamples (3 over 2), too few for 2.5% tails."""


def too_few_subjects(n_subjects: int | None) -> str | None:
    """The warning that replaces any conclusion when there are fewer than MIN_SUBJECTS subjects; None otherwise."""
    if n_subjects is None or n_subjects >= MIN_SUBJECTS:
        return None
    return (f"**Too few subjects for these statistics**: with {n_subjects} subjects (fewer than {MIN_SUBJECTS}) the "
            "intervals below are not 95% CIs and the p-values cannot reach 0.05, so no conclusion is drawn from them")


def mechanism_text(result: dict, n_subjects: int | None = None) -> str:
    """What the rho says, in words; nothing is concluded from fewer than MIN_SUBJECTS subjects."""
    if result.get("undefined"):
        return f"Spearman's rho is undefined here ({result['undefined']}; n = {result['n']} clips)."
    rho, (lo, hi) = result["spearman_r"], result["ci"]
    skipped = result.get("frames_without_weight", 0)
    skipped = f", {skipped} frames without alpha weight skipped" if skipped else ""
    head = (f"Spearman's rho {rho:.2f} (95% CI {lo:.2f} to {hi:.2f}, subjects resampled; n = {result['n']} clips"
            f"{skipped}): ")
    warning = too_few_subjects(n_subjects)
    if warning:
        return f"Spearman's rho {rho:.2f} (interval {lo:.2f} to {hi:.2f}; n = {result['n']} clips). {warning}."
    if hi < 0:
        return head + "smaller motions prefer larger factors, as the paper's premise predicts."
    if lo > 0:
        return head + "larger motions prefer larger factors, the opposite of the paper's premise."
    return head + "no monotone relation between motion and preferred factor that these data can detect."


SINGLE_FACTOR = "single factor "  # the prefix of the single-factor variants (train.ablation_variants)
MOTION_BINS = {2: ("small", "large"), 3: ("small", "mid", "large")}


def single_factors(variants) -> list[str]:
    """The single-factor variants among variant names, in their order."""
    return [v for v in variants if str(v).startswith(SINGLE_FACTOR)]


def best_single_factor(summary: pd.DataFrame, metric: str = "uf1") -> str | None:
    """The single factor with the highest seed-mean score in a bootstrap_scores table (chosen on the same test
    data, so it flatters the single factors: a comparison against it is conservative); None without one."""
    names = single_factors(summary.index)
    return str(summary.loc[names, metric].idxmax()) if names else None


def _peak_per_clip(df: pd.DataFrame, truth: pd.DataFrame) -> pd.Series:
    """The true peak displacement of each clip (`_clip` keys of checked predictions), from the truth table."""
    clips = df.drop_duplicates("_clip")[["_clip", "subject", "clip"]].astype(str)
    merged = clips.merge(truth[["subject", "clip", "peak_px"]].astype({"subject": str, "clip": str}),
                         on=["subject", "clip"], how="left", validate="1:1")
    if merged["peak_px"].isna().any():
        raise ValueError(f"accuracy_by_motion: the truth lacks {int(merged['peak_px'].isna().sum())} clips of the "
                         "predictions")
    return pd.Series(merged["peak_px"].to_numpy(float), index=merged["_clip"])


def motion_bins(peak_px, n_bins: int = 3) -> tuple[np.ndarray, list[str]]:
    """Quantile bins of the clips' true peak displacement: cut points at the 1/n_bins quantiles of the clips, a
    clip on a cut point in the lower bin (so equal motions share a bin and every clip is in one) -> bin number
    per clip and the bin names (small, mid, large for tertiles)."""
    peak = np.asarray(peak_px, dtype=float)
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 2:
        raise ValueError(f"n_bins must be an integer >= 2, got {n_bins!r}")
    cuts = np.quantile(peak, np.arange(1, n_bins) / n_bins)
    names = MOTION_BINS.get(n_bins) or [f"bin {i + 1} of {n_bins}" for i in range(n_bins)]
    return np.searchsorted(cuts, peak, side="left"), list(names)


def accuracy_by_motion(predictions: pd.DataFrame, truth: pd.DataFrame | None, n_bins: int = 3,
                       n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> pd.DataFrame | None:
    """Per variant and bin of the true motion (motion_bins: tertiles of the clips' peak_px by default), the
    seed-mean accuracy on the bin's clips with its 95% CI from bootstrap_scores' subject-and-seed bootstrap over
    the subjects with clips in the bin; `best_single_factor` marks the single factor most accurate in each bin.
    Accuracy is a share of clips, so the bins' accuracies weighted by their clips give the overall one (per seed
    and in the seed mean). None without truth (real data)."""
    if truth is None:
        return None
    df = _check_predictions(predictions)
    peak = _peak_per_clip(df, truth)
    codes, names = motion_bins(peak.to_numpy(), n_bins)
    code = pd.Series(codes, index=peak.index)
    rows = []
    for b, name in enumerate(names):
        clips = code.index[code.to_numpy() == b]
        if not len(clips):  # equal cut points (many equal motions) leave a bin empty
            continue
        part = bootstrap_scores(predictions[df["_clip"].isin(clips).to_numpy()], n_resamples, seed, level)
        rows.append(pd.DataFrame({
            "variant": part.index, "bin": name, "px_lo": peak[clips].min(), "px_hi": peak[clips].max(),
            "n_clips": len(clips), "n_subjects": part["n_subjects"].to_numpy(), "accuracy": part["accuracy"].to_numpy(),
            "accuracy_ci_lo": part["accuracy_ci_lo"].to_numpy(), "accuracy_ci_hi": part["accuracy_ci_hi"].to_numpy()}))
    out = pd.concat(rows, ignore_index=True)
    singles = out[out["variant"].isin(single_factors(out["variant"].unique()))]
    best = singles.loc[singles.groupby("bin", sort=False)["accuracy"].idxmax()].index if len(singles) else []
    out["best_single_factor"] = out.index.isin(best)
    return out


def oracle_check(sweep, summary: pd.DataFrame, n_resamples: int = 2000, n_permutations: int = 10000, seed: int = 0,
                 level: float = 0.95) -> dict | None:
    """The oracle (a positive control, amanlib.oracle) against the best single factor: per oracle in the sweep
    its target, how many clips got each factor, its seed-mean UF1/UAR with CIs and the oracle minus the best
    single factor (paired_comparisons with the oracle as reference). The best single factor is the one with the
    highest seed-mean UF1 on the same test data, which flatters it: conservative for the oracle. None without an
    oracle or a single factor (real data, or no ablations)."""
    best = best_single_factor(summary)
    if getattr(sweep, "oracle", None) is None or best is None:
        return None
    entries = []
    for name, choice in sweep.oracle.groupby("variant", sort=False):
        pair = sweep.predictions[sweep.predictions["variant"].isin([name, best])]
        counts = choice.groupby("factor").size()
        row = summary.loc[name]
        entries.append({
            "variant": name, "target_px": float(choice["target_px"].iloc[0]),
            "chosen_factors": {f"{f:g}": int(n) for f, n in counts.items()},
            **{m: float(row[m]) for m in ("uf1", "uar", "accuracy")},
            **{f"{m}_ci": [float(row[f"{m}_ci_lo"]), float(row[f"{m}_ci_hi"])] for m in ("uf1", "uar")},
            "minus_best_single_factor": paired_comparisons(pair, name, ("uf1", "uar"), n_resamples, n_permutations,
                                                           seed, level)})
    main = next((e for e in entries if e["variant"] == ORACLE_VARIANT), entries[0])
    return {"role": CONTROL_NOTE, **main,
            "target": "the magnified peak displacement (px at the clip's resolution) each clip's factor is chosen to "
                      "come nearest, fixed before any run",
            "best_single_factor": best,
            "best_single_factor_rule": "the single factor with the highest seed-mean UF1 on the same test data "
                                       "(it flatters the single factor: conservative for the oracle)",
            "sensitivity": [e for e in entries if e is not main]}


def oracle_vs_preferred(runs, truth: pd.DataFrame, factors, target_px: float = ORACLE_TARGET_PX) -> pd.DataFrame:
    """Per clip: subject, true peak displacement, AMAN's preferred factor (mechanism_data over `runs`, AMAN's
    seeds) and the factor the oracle chooses for target_px from the truth."""
    chosen = oracle_choice(truth, factors, target_px)[["subject", "clip", "factor"]]
    return mechanism_data(runs, truth).merge(chosen.rename(columns={"factor": "oracle_factor"}),
                                             on=["subject", "clip"], how="left", validate="1:1")
