"""Everything written to a results folder: where each file lives, the clip table hand-off, run folders and
metrics.json. `LOSOResult.save` and `LOSOResult.load` are inverses; notebooks never build these paths."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cache import STAMP_FILE, damage, key_of
from .metrics import scores, write_megc_log
from .oracle import is_control
from .runtime import atomic_write, machine_info

OPTIMISTIC = "OPTIMISTIC: epoch chosen on the held-out subject's own accuracy (the authors' protocol)"
INDEX_DTYPES = {"dataset": str, "subject": str, "clip": str}


def work_dir(results_dir: str | Path) -> Path:
    """results_dir/work: the caches (features, trunks, runs) and the clip table."""
    path = Path(results_dir) / "work"
    path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir(results_dir: str | Path) -> Path:
    return Path(results_dir) / "figures"


def save_index(index: pd.DataFrame, results_dir, sources=None) -> None:
    """The clip table handed from notebook 01 to the others, and what it was made from (index.json)."""
    info = {"dataset": "composite" if index["dataset"].nunique() > 1 else str(index["dataset"].iloc[0]),
            "label_protocol": getattr(sources, "label_protocol", None), "seed": getattr(sources, "seed", None),
            "synthetic_regime": _regime(sources) if _is_synthetic(index) else None}
    save_json(info, work_dir(results_dir) / "index.json")
    atomic_write(work_dir(results_dir) / "index.csv", lambda tmp: index.to_csv(tmp, index=False))


def _is_synthetic(index: pd.DataFrame) -> bool:
    return bool((index["dataset"] == "synthetic").all())


def _regime(sources) -> str | None:
    """The synthetic regime the sources ask for (narrow, wide, or custom when fields override its motion)."""
    if sources is None:
        return None
    from .data.synthetic import regime_of, resolve_config
    return regime_of(resolve_config(**sources.synthetic))


def read_index_info(results_dir) -> dict:
    """dataset, label_protocol, seed and synthetic regime of the saved clip table."""
    path = Path(results_dir) / "work" / "index.json"
    empty = {"dataset": None, "label_protocol": None, "seed": None, "synthetic_regime": None}
    return {**empty, **json.loads(path.read_text())} if path.exists() else empty


def read_index(results_dir) -> pd.DataFrame:
    path = Path(results_dir) / "work" / "index.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: make the clip table first (notebook 01_dataset_prep, "
                                "amanlib.results.save_index)")
    return pd.read_csv(path, dtype=INDEX_DTYPES)


def class_names(index: pd.DataFrame) -> list[str]:
    """Class names ordered by label."""
    pairs = index[["label", "label_name"]].drop_duplicates().sort_values("label")
    return pairs["label_name"].tolist()


def _plain(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def save_json(obj: dict, path: str | Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=_plain)))


def _relative(results_dir, path) -> str:
    return Path(path).resolve().relative_to(Path(results_dir).resolve()).as_posix()


def update_metrics(results_dir, **fields) -> dict:
    """Merge fields into results_dir/metrics.json (written atomically); run_dir is stored relative to
    results_dir so the folder can move."""
    path = Path(results_dir) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    if "run_dir" in fields:
        fields["run_dir"] = _relative(results_dir, fields["run_dir"])
    if "run_dirs" in fields:
        fields["run_dirs"] = [_relative(results_dir, p) for p in fields["run_dirs"]]
    metrics.update(fields)
    save_json(metrics, path)
    return metrics


METRICS_FIELDS = ("dataset", "epoch_selection", "optimistic", "model", "backbone", "magnifier", "factors", "clips",
                  "subjects", "seeds", "uf1", "uar", "accuracy", "uf1_ci", "uar_ci", "per_subset", "ablations",
                  "comparisons", "mechanism", "protocol_gap", "method", "fidelity", "run_dir", "run_dirs")
"""The fields of metrics.json that notebook 05 and `amanlib readme` read (record_training writes them all)."""


def read_metrics(results_dir) -> dict:
    """metrics.json of a results folder; an error naming the file when it is missing, unreadable or lacks a field
    the kit reads (METRICS_FIELDS)."""
    path = Path(results_dir) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train first (amanlib.sweep.run_ablations and "
                                "amanlib.results.record_training; notebook 04_training)")
    try:
        metrics = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not readable JSON ({e}): run notebook 04 (training) again to write it") from None
    missing = [f for f in METRICS_FIELDS if f not in metrics] if isinstance(metrics, dict) else list(METRICS_FIELDS)
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it was not written by this amanlib's notebook 04; "
                         "run notebook 04 (training) again to write it")
    return metrics


def metrics_run_dir(results_dir, metrics: dict) -> Path:
    """The AMAN run folder (first seed) metrics.json points at (stored relative to results_dir, or absolute)."""
    return Path(results_dir) / metrics["run_dir"]


def aman_runs(results_dir, metrics: dict) -> list["LOSOResult"]:
    """The AMAN runs of every seed metrics.json names."""
    return [LOSOResult.load(Path(results_dir) / p) for p in metrics["run_dirs"]]


@dataclass
class LOSOResult:
    """One LOSO run: per-clip predictions and attention, per-epoch history, scores, and its settings."""

    predictions: pd.DataFrame  # dataset, subject, clip, gt, pred, fold, epoch, pred_last, pred_best_test, alpha, beta
    history: pd.DataFrame  # fold, epoch, lr, train_loss, train_acc, test_acc, val_uf1
    scores: pd.DataFrame  # megc_scores of pred
    out_dir: Path
    config: dict = field(repr=False, default_factory=dict)  # the run's config.json: settings and factor values

    @property
    def optimistic(self) -> bool:
        return self.config.get("epoch_selection") == "paper"

    def save(self) -> None:
        """predictions.csv, history.csv, scores.csv, attention.npz, megc_log.txt and config.json in out_dir."""
        out, p = self.out_dir, self.predictions
        scalar = p.drop(columns=["alpha", "beta"])
        atomic_write(out / "predictions.csv", lambda tmp: scalar.to_csv(tmp, index=False))
        atomic_write(out / "history.csv", lambda tmp: self.history.to_csv(tmp, index=False))
        atomic_write(out / "scores.csv", lambda tmp: self.scores.to_csv(tmp))
        alpha, beta = attention(p)
        clips = p["clip"].to_numpy(str)
        atomic_write(out / "attention.npz", lambda tmp: np.savez(tmp, clip=clips, alpha=alpha, beta=beta))
        write_megc_log(p, out / "megc_log.txt", comment=OPTIMISTIC if self.optimistic else None)
        save_json(self.config, out / "config.json")

    @classmethod
    def load(cls, run_dir: str | Path) -> "LOSOResult":
        """Read back what save wrote; a stamped run folder is checked against its stamp first (cache.damage)."""
        run_dir = Path(run_dir)
        if not (run_dir / "predictions.csv").is_file():
            raise FileNotFoundError(f"{run_dir} holds no finished LOSO run (predictions.csv is missing)")
        problem = damage(run_dir) if (run_dir / STAMP_FILE).is_file() else None
        if problem is not None:
            raise ValueError(f"LOSO run {run_dir} is damaged ({problem}): run notebook 04 (training) again; it "
                             "trains that run again")
        p = pd.read_csv(run_dir / "predictions.csv", dtype=INDEX_DTYPES)
        attention = np.load(run_dir / "attention.npz")
        p["alpha"], p["beta"] = list(attention["alpha"]), list(attention["beta"])
        return cls(p, pd.read_csv(run_dir / "history.csv"), pd.read_csv(run_dir / "scores.csv", index_col=0), run_dir,
                   json.loads((run_dir / "config.json").read_text()))


def attention(predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """alpha [N, F, K] and beta [N, F] of a run's predictions."""
    return np.stack(predictions["alpha"].to_list()), np.stack(predictions["beta"].to_list())


BEST_TEST = "best epoch on test subject (optimistic)"


def protocol_gap(runs, epoch_selection: str) -> pd.DataFrame:
    """Scores of the chosen epoch, the last epoch and the best epoch on each test subject (optimistic), each the
    mean over the runs of its per-run scores, so every row compares the same runs and the chosen epoch matches
    metrics.json's seed mean. `runs`: LOSOResults or their predictions (one per seed, as aman_runs gives), or
    one predictions table whose `seed` column tells the runs apart."""
    if isinstance(runs, pd.DataFrame):
        runs = [p for _, p in runs.groupby("seed")] if "seed" in runs else [runs]
    if not runs:
        raise ValueError("protocol_gap: no runs given; pass results.aman_runs(results_dir, metrics)")
    columns = {f"chosen epoch ({epoch_selection})": "pred", "last epoch": "pred_last", BEST_TEST: "pred_best_test"}
    predictions = [getattr(r, "predictions", r) for r in runs]
    return pd.DataFrame({row: pd.DataFrame([scores(p["gt"], p[col]) for p in predictions]).mean()
                         for row, col in columns.items()}).T.astype({"n": int})


def run_title(metrics: dict) -> str:
    return (f"{metrics['model']}, epochs {metrics['epoch_selection']}"
            + (" (OPTIMISTIC)" if metrics["optimistic"] else "") + f", fidelity {metrics['fidelity']['name']}")


def _fidelity(cache, config: dict) -> dict:
    """Which of the authors' choices a run made (amanlib.fidelity): its preset's name and the three choices."""
    from .fidelity import name_of
    choices = {"trunk_bn": cache.inputs["trunk"]["bn"], "layer4_bn": config["layer4_bn"],
               "layer4_init": config["layer4_init"]}
    return {"name": name_of(**choices), **choices}


def _by_fidelity(results_dir, entry: dict) -> dict:
    """AMAN's scores per fidelity preset on this clip table and these seeds: the earlier metrics.json's entries
    of the other presets when they were trained on the same clips and seeds and their runs still exist."""
    try:  # only this field is read: an older metrics.json of another schema may still hold it
        old = json.loads((Path(results_dir) / "metrics.json").read_text()).get("by_fidelity", {})
    except (OSError, ValueError, AttributeError):
        old = {}
    same = lambda e: e.get("clips_key") == entry["clips_key"] and e.get("seeds") == entry["seeds"] \
        and e.get("epoch_selection") == entry["epoch_selection"]  # noqa: E731
    kept = {name: e for name, e in old.items()
            if same(e) and all((Path(results_dir) / d).is_dir() for d in e["run_dirs"])}
    return {**kept, entry["fidelity"]: entry}


def fidelity_table(metrics: dict) -> pd.DataFrame:
    """AMAN under each fidelity preset trained on this clip table (notebook 05 shows it when there are two)."""
    return pd.DataFrame({name: {"UF1": f"{e['uf1']:.3f} [{e['uf1_ci'][0]:.3f}, {e['uf1_ci'][1]:.3f}]",
                                "UAR": f"{e['uar']:.3f} [{e['uar_ci'][0]:.3f}, {e['uar_ci'][1]:.3f}]",
                                "trunk bn": e["trunk_bn"], "layer4 bn": e["layer4_bn"],
                                "layer4 init": e["layer4_init"]}
                         for name, e in metrics.get("by_fidelity", {}).items()}).T


def headline(metrics: dict) -> str:
    return json.dumps({k: metrics[k] for k in ("model", "label_protocol", "epoch_selection", "uf1", "uar", "accuracy")},
                      indent=1)


def _precision_name(dtype: str | None) -> str:
    """A cache key's recorded autocast dtype by its precision name: 'fp32' (no autocast), 'bf16', else as recorded."""
    return {str(None): "fp32", str(torch.bfloat16): "bf16"}.get(str(dtype), str(dtype))


def record_training(results_dir, index: pd.DataFrame, cache, sweep, summary: pd.DataFrame, comparisons: pd.DataFrame,
                    mechanism: dict | None, reference: str = "AMAN", oracle: dict | None = None,
                    by_motion: pd.DataFrame | None = None) -> dict:
    """Write metrics.json anew from a sweep (every variant x seed) and its statistics: everything in it comes
    from the runs, their features and the clip table they were trained on, so no field can describe another run.
    On synthetic data also `oracle` (stats.oracle_check: the positive control against the best single factor)
    and `by_motion` (stats.accuracy_by_motion, as by_motion_record writes it); None on real data."""
    diverged = sweep.history[~np.isfinite(sweep.history["train_loss"].astype(float))]
    if len(diverged):  # runs cached before the kit checked for divergence
        variant, seed = diverged[["variant", "seed"]].iloc[0]
        folder = sweep.runs[(variant, seed)].out_dir
        raise ValueError(f"metrics.json is not written: {variant} seed {seed} has a non-finite training loss "
                         f"({folder / 'history.csv'}; {diverged.groupby(['variant', 'seed']).ngroups} runs in all): "
                         f"delete such run folders (rm -r {folder}) and train again")
    runs = {seed: run for (variant, seed), run in sweep.runs.items() if variant == reference}
    seeds = sorted(runs)
    first = runs[seeds[0]]
    cfg = first.config
    info = read_index_info(results_dir)
    per_seed = sweep.scores[sweep.scores["subset"] == "full"]
    ablations = {}
    for variant, row in summary.iterrows():
        mine = per_seed[per_seed["variant"] == variant].sort_values("seed")
        ablations[variant] = {
            **{m: float(row[m]) for m in ("uf1", "uar", "accuracy")},
            **{f"{m}_std": float(row[f"{m}_std"]) for m in ("uf1", "uar")},
            **{f"{m}_ci": [float(row[f"{m}_ci_lo"]), float(row[f"{m}_ci_hi"])] for m in ("uf1", "uar")},
            "per_seed": {m: mine[m].astype(float).tolist() for m in ("uf1", "uar", "accuracy")}}
    aman = ablations[reference]
    subsets = sweep.scores[(sweep.scores["variant"] == reference)].groupby("subset")[["uf1", "uar", "accuracy"]].mean()
    fields = {
        "dataset": info["dataset"], "synthetic_regime": info["synthetic_regime"],
        "label_protocol": info["label_protocol"],
        "epoch_selection": cfg["epoch_selection"], "optimistic": first.optimistic,
        "model": "AMAN, frozen layer4" if cfg["frozen_layer4"] else "AMAN", "backbone": cache.backbone["name"],
        "magnifier": cache.inputs["magnifier"]["name"], "factors": cache.factors, "n_frames": cache.inputs["n_frames"],
        "precision": {part: _precision_name(cache.inputs[part]["dtype"]) for part in ("magnifier", "trunk")},
        "machine": machine_info(cfg.get("device", "auto")),
        "clips": len(index), "subjects": int((index.dataset + "/" + index.subject).nunique()),
        "seed": info["seed"], "seeds": seeds,
        "uf1": aman["uf1"], "uar": aman["uar"], "accuracy": aman["accuracy"],
        "uf1_ci": aman["uf1_ci"], "uar_ci": aman["uar_ci"],
        "per_subset": subsets.to_dict(orient="index"),
        "protocol_gap": protocol_gap(list(runs.values()), cfg["epoch_selection"]).to_dict(orient="index"),
        "ablations": ablations,
        "comparisons": [] if comparisons is None else [
            {"a": r.a, "b": r.b, "metric": r.metric, "diff": float(r.diff), "ci": [float(x) for x in r.ci],
             "p_value": float(r.p_value)} for r in comparisons.itertuples()],
        "mechanism": mechanism,
        "oracle": oracle,
        "by_motion": by_motion_record(by_motion),
        "method": STATS_METHOD,
        "fidelity": _fidelity(cache, cfg),
        "run_dir": first.out_dir,
        "run_dirs": [runs[s].out_dir for s in seeds],
    }
    fidelity = fields["fidelity"]
    fields["by_fidelity"] = _by_fidelity(results_dir, {
        "fidelity": fidelity["name"], **{k: v for k, v in fidelity.items() if k != "name"},
        "clips_key": key_of(index[["dataset", "subject", "clip", "label"]].astype(str).values.tolist()),
        "seeds": seeds, "epoch_selection": cfg["epoch_selection"],
        **{k: aman[k] for k in ("uf1", "uar", "uf1_ci", "uar_ci")},
        "run_dirs": [_relative(results_dir, runs[s].out_dir) for s in seeds]})
    path = Path(results_dir) / "metrics.json"
    path.unlink(missing_ok=True)  # a new run: nothing of an earlier one survives
    return update_metrics(results_dir, **fields)


STATS_METHOD = ("95% CIs: percentile bootstrap over subjects and training seeds together (2,000 resamples, seeded; "
                "clips of one subject move together); differences between variants: the same paired resampling, and "
                "a two-sided sign-flip permutation test over subjects on per-subject differences averaged over seeds.")


def comparisons_text(comparisons, n_subjects: int | None = None) -> str:
    """In words, per metric: which variants AMAN beats and which beat it (95% CI excluding zero), and how many the
    data cannot tell apart from it. `comparisons`: metrics.json's list or its DataFrame. With fewer than
    stats.MIN_SUBJECTS subjects it says so instead, and concludes nothing."""
    from .stats import too_few_subjects
    warning = too_few_subjects(n_subjects)
    if warning:
        return warning + "."
    def said(rows) -> str:
        return "; ".join(f"{r.b} ({r.diff:+.3f}, CI {r.ci[0]:+.3f} to {r.ci[1]:+.3f}, p {r.p_value:.3g})" for r in rows)

    lines = []
    table = pd.DataFrame(comparisons)
    controls = table[table["b"].map(is_control)]  # the oracle reads the truth: stated apart, never beaten or lost to
    for metric, part in table.drop(controls.index).groupby("metric", sort=False):
        above = [r for r in part.itertuples() if r.ci[0] > 0]
        below = [r for r in part.itertuples() if r.ci[1] < 0]
        a, unclear = part["a"].iloc[0], len(part) - len(above) - len(below)
        lines.append(f"**{metric.upper()}**: {a} scores higher than " + (said(above) if above else "no variant")
                     + " and lower than " + (said(below) if below else "no variant")
                     + f", each with a 95% CI excluding zero; for the other {unclear} variants the data cannot tell "
                     "the difference from zero.")
    for metric, part in controls.groupby("metric", sort=False):
        lines.append(f"**{metric.upper()}, against the positive control** (each clip's factor chosen from the "
                     f"synthetic truth, not a method): {part['a'].iloc[0]} minus " + said(part.itertuples()) + ".")
    return "\n\n".join(lines)


def variant_table(metrics: dict) -> pd.DataFrame:
    """Per variant: mean UF1/UAR with 95% CIs, and the difference to AMAN with its CI and p-value; the oracle is
    named a positive control."""
    diffs = {(c["b"], c["metric"]): c for c in metrics["comparisons"]}
    rows = []
    for variant, a in metrics["ablations"].items():
        row = {"variant": f"{variant}: positive control" if is_control(variant) else variant}
        for m in ("uf1", "uar"):
            row[m.upper()] = f"{a[m]:.3f} [{a[m + '_ci'][0]:.3f}, {a[m + '_ci'][1]:.3f}]"
            c = diffs.get((variant, m))
            row[f"AMAN - variant, {m.upper()}"] = (f"{c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}], "
                                                   f"p {c['p_value']:.3g}") if c else ""
        rows.append(row)
    return pd.DataFrame(rows)


BY_MOTION_METHOD = ("Bins: quantiles of the clips' true peak displacement (tertiles; a clip on a cut point in the "
                    "lower bin). Accuracy: mean over seeds on the bin's clips; 95% CI: the subject-and-seed bootstrap "
                    "over the subjects with clips in the bin.")


def by_motion_record(table: pd.DataFrame | None) -> dict | None:
    """metrics.json's `by_motion` from stats.accuracy_by_motion: the bins (px range, clips), per variant and bin
    the accuracy, its CI and clips, and the most accurate single factor per bin."""
    if table is None:
        return None
    bins = table.drop_duplicates("bin")
    return {"bins": {r.bin: {"px": [float(r.px_lo), float(r.px_hi)], "n_clips": int(r.n_clips)}
                     for r in bins.itertuples()},
            "variants": {v: {r.bin: {"accuracy": float(r.accuracy), "ci": [float(r.accuracy_ci_lo),
                                                                         float(r.accuracy_ci_hi)],
                                     "n_clips": int(r.n_clips)} for r in part.itertuples()}
                         for v, part in table.groupby("variant", sort=False)},
            "best_single_factor_by_bin": {r.bin: r.variant for r in table[table["best_single_factor"]].itertuples()},
            "method": BY_MOTION_METHOD}


def by_motion_frame(metrics: dict) -> pd.DataFrame | None:
    """metrics.json's `by_motion` as a long table (variant, bin, px_lo, px_hi, n_clips, accuracy, accuracy_ci_lo,
    accuracy_ci_hi, best_single_factor), as stats.accuracy_by_motion returned it; None on real data."""
    record = metrics.get("by_motion")
    if not record:
        return None
    best = record["best_single_factor_by_bin"]
    return pd.DataFrame([{"variant": v, "bin": b, "px_lo": record["bins"][b]["px"][0],
                          "px_hi": record["bins"][b]["px"][1], "n_clips": e["n_clips"], "accuracy": e["accuracy"],
                          "accuracy_ci_lo": e["ci"][0], "accuracy_ci_hi": e["ci"][1],
                          "best_single_factor": best.get(b) == v}
                         for v, per_bin in record["variants"].items() for b, e in per_bin.items()])


def by_motion_table(metrics: dict) -> pd.DataFrame | None:
    """Accuracy by true motion for display: a row per variant (the oracle named a positive control), a column per
    bin (its px range and clips), cells 'mean [95% CI]', the best single factor of each bin starred."""
    frame = by_motion_frame(metrics)
    if frame is None:
        return None
    column = {b: f"{b} motion ({e['px'][0]:.2f}-{e['px'][1]:.2f} px, {e['n_clips']} clips)"
              for b, e in metrics["by_motion"]["bins"].items()}
    cells = frame.assign(
        variant=frame["variant"].map(lambda v: f"{v}: positive control" if is_control(v) else v),
        column=frame["bin"].map(column),
        cell=[f"{r.accuracy:.3f} [{r.accuracy_ci_lo:.3f}, {r.accuracy_ci_hi:.3f}]" + (" *" if r.best_single_factor
                                                                                   else "")
              for r in frame.itertuples()])
    return cells.pivot(index="variant", columns="column", values="cell").reindex(
        index=list(dict.fromkeys(cells["variant"])), columns=list(column.values()))


def oracle_text(oracle: dict | None) -> str:
    """The positive control in words: the oracle's target and choices, and the oracle minus the best single factor."""
    if not oracle:
        return "No oracle: it needs the synthetic truth and the single-factor variants."
    diffs = "; ".join(f"{c['metric'].upper()} {c['diff']:+.3f} (95% CI {c['ci'][0]:+.3f} to {c['ci'][1]:+.3f}, "
                      f"p {c['p_value']:.3g})" for c in oracle["minus_best_single_factor"])
    chosen = ", ".join(f"x{f}: {n}" for f, n in oracle["chosen_factors"].items())
    lines = [f"**Positive control, not a method**: `{oracle['variant']}` gives each clip the magnified factor whose "
             f"factor x true peak displacement is nearest {oracle['target_px']:g} px (fixed in advance; clips per "
             f"factor: {chosen}). Oracle minus the best single factor ({oracle['best_single_factor']}, chosen on the "
             f"same test data, which is conservative for the oracle): {diffs}."]
    for e in oracle.get("sensitivity", []):
        c = next(c for c in e["minus_best_single_factor"] if c["metric"] == "uf1")
        lines.append(f"Sensitivity, target {e['target_px']:g} px: UF1 minus {oracle['best_single_factor']} "
                     f"{c['diff']:+.3f} (95% CI {c['ci'][0]:+.3f} to {c['ci'][1]:+.3f}).")
    return "\n\n".join(lines)


def readme_table(metrics: dict) -> str:
    """README's results block, rendered from metrics.json: the run in one line, the table of variants, the
    half-width of the key comparison, the mechanism check and the method."""
    table = variant_table(metrics)
    head = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    rows = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in table.itertuples(index=False))
    regime = f", {metrics['synthetic_regime']} regime" if metrics.get("synthetic_regime") else ""
    run = (f"{metrics['model']} on {metrics['dataset']}{regime} ({metrics['clips']} clips, "
           f"{metrics['subjects']} subjects, "
           f"label protocol {metrics['label_protocol']}), epoch selection {metrics['epoch_selection']}"
           f"{' (' + OPTIMISTIC + ')' if metrics['optimistic'] else ''}, backbone "
           f"{metrics['backbone']}, magnifier {metrics['magnifier']} at factors {metrics['factors']}, "
           f"{metrics['n_frames']} frames, training seeds {metrics['seeds']}.")
    from .stats import mechanism_text, too_few_subjects
    warning = too_few_subjects(metrics["subjects"])
    notes = [run] + ([warning + "."] if warning else []) + [(head + rows).rstrip("\n")]
    key = [c for c in metrics["comparisons"] if c["b"] == "no magnification" and c["metric"] == "uf1"]
    if key:
        half = (key[0]["ci"][1] - key[0]["ci"][0]) / 2
        notes.append(f"AMAN minus no magnification, UF1: {key[0]['diff']:+.3f}, 95% CI half-width {half:.3f}.")
    if metrics["comparisons"]:
        notes.append(comparisons_text(metrics["comparisons"], metrics["subjects"]))
    if metrics.get("mechanism"):
        notes.append(f"Mechanism check: {mechanism_text(metrics['mechanism'], metrics['subjects'])}")
    notes.append(metrics["method"])
    return "\n\n".join(notes) + "\n"


def _diff(c: dict) -> str:
    return f"{c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"


def regime_verdict(metrics: dict) -> str:
    """One regime's answer to AMAN's claim in a paragraph, UF1 differences with 95% CIs: AMAN against the best single
    factor, no magnification and the oracle; the oracle against the best single factor (can adapting pay at all?);
    the best single factor per tertile of true motion; the mechanism check."""
    uf1 = {c["b"]: c for c in metrics["comparisons"] if c["metric"] == "uf1"}
    from .stats import single_factors
    best = max(single_factors(metrics["ablations"]), key=lambda v: metrics["ablations"][v]["uf1"])
    said = [f"AMAN minus the best single factor ({best}) {_diff(uf1[best])}"]
    if "no magnification" in uf1:
        said.append(f"minus no magnification {_diff(uf1['no magnification'])}")
    oracle = metrics.get("oracle")
    if oracle:
        said.append(f"minus the oracle {_diff(uf1[oracle['variant']])}")
        control = next(c for c in oracle["minus_best_single_factor"] if c["metric"] == "uf1")
        said.append(f"oracle (target {oracle['target_px']:g} px) minus {oracle['best_single_factor']} {_diff(control)}")
    by_motion = metrics.get("by_motion")
    if by_motion:
        said.append("best single factor by tertile of true motion: " + ", ".join(
            f"{b} ({by_motion['bins'][b]['px'][0]:.2f}-{by_motion['bins'][b]['px'][1]:.2f} px) "
            f"{v.replace('single factor ', 'x')}" for b, v in by_motion["best_single_factor_by_bin"].items()))
    if metrics.get("mechanism"):
        m = metrics["mechanism"]
        said.append(f"mechanism rho {m['spearman_r']:+.2f} [{m['ci'][0]:+.2f}, {m['ci'][1]:+.2f}]")
    regime = metrics.get("synthetic_regime") or metrics["dataset"]
    return f"**{regime}** ({metrics['clips']} clips, {metrics['subjects']} subjects; UF1): " + "; ".join(said) + "."


def magnifier_comparison(results_dir, other_dir, n_resamples: int = 2000, n_permutations: int = 10000) -> dict:
    """AMAN with the magnifier of the results folder `other_dir` minus AMAN with the one of `results_dir`, trained on
    the same clips with the same seeds and settings otherwise: UF1 and UAR with the paired subject-and-seed
    bootstrap CI and sign-flip p of stats.paired_comparisons."""
    from .stats import paired_comparisons
    tagged, names = [], []
    for folder in (other_dir, results_dir):
        metrics = read_metrics(folder)
        names.append(f"AMAN ({metrics['magnifier']})")
        tagged += [r.predictions.assign(variant=names[-1], seed=r.config["seed"]) for r in aman_runs(folder, metrics)]
    runs = pd.concat(tagged, ignore_index=True)
    clips = {v: set(map(tuple, g[["seed", "dataset", "subject", "clip"]].astype(str).to_numpy()))
             for v, g in runs.groupby("variant")}
    if len(names) != len(set(names)) or clips[names[0]] != clips[names[1]]:
        raise ValueError(f"{other_dir} and {results_dir} must hold AMAN runs of two magnifiers on the same clips and "
                         f"seeds (found {names})")
    return {"variant": names[0], "baseline": names[1],
            "comparisons": paired_comparisons(runs, names[0], ("uf1", "uar"), n_resamples, n_permutations)}


def magnifiers_markdown(results_dir) -> str | None:
    """README's magnifiers block: every magnifier against the synthetic truth (results/bench/magnify_truth.csv) and,
    when results/lagrangian holds a run (make reproduce-lagrangian), AMAN with Lagrangian against learning-based
    magnification; None when neither exists."""
    from .magnify.truth_scores import markdown
    results_dir = Path(results_dir)
    bench, other = results_dir / "bench" / "magnify_truth.csv", results_dir / "lagrangian"
    parts = [markdown(bench)] if bench.is_file() else []
    if (other / "metrics.json").is_file():
        parts.append(magnifier_text(magnifier_comparison(results_dir, other)) + "\n")
    return "\n".join(parts) if parts else None


def magnifier_text(comparison: dict) -> str:
    """README's line for magnifier_comparison."""
    said = "; ".join(f"{c['metric'].upper()} {_diff(c)} (p {c['p_value']:.2g})" for c in comparison["comparisons"])
    return f"**{comparison['variant']} minus {comparison['baseline']}** (95% CI, subjects and seeds resampled): {said}."


REGIMES_START = "<!-- regimes: rendered from results/metrics.json and results/wide/metrics.json -->"
REGIMES_END = "<!-- end of regimes -->"
README_START, README_END = "<!-- results table: rendered from results/metrics.json -->", "<!-- end of results table -->"
TIMING_START, TIMING_END = "<!-- timing: rendered from results/timing.json -->", "<!-- end of timing -->"
MAGNIFIERS_START = ("<!-- magnifiers: rendered from results/bench/magnify_truth.csv, results/metrics.json and "
                    "results/lagrangian/metrics.json -->")
MAGNIFIERS_END = "<!-- end of magnifiers -->"
DIFFERENCES_START = "<!-- differences from the authors' code: rendered from amanlib/fidelity.py -->"
DIFFERENCES_END = "<!-- end of differences -->"


def render_readme(readme: str | Path, metrics: dict, timing: dict | None = None, others: list[dict] = (),
                  magnifiers: str | None = None) -> bool:
    """Replace README's results table, its timing table (when `timing`, a results/timing.json, is given), its
    verdict per synthetic regime (metrics and `others`, e.g. results/wide/metrics.json), its magnifiers block (when
    `magnifiers`, its markdown, is given) and its table of differences from the authors' code (each between its
    markers) by the ones rendered from metrics, timing and amanlib.fidelity; True if README changed."""
    from . import timing as timings
    from .fidelity import differences_markdown
    readme = Path(readme)
    text = new = readme.read_text()
    blocks = [(README_START, README_END, readme_table(metrics)),
              (DIFFERENCES_START, DIFFERENCES_END, differences_markdown()),
              (REGIMES_START, REGIMES_END, "".join(regime_verdict(m) + "\n\n" for m in (metrics, *others)).rstrip()
               + "\n")]
    if timing is not None:
        blocks.append((TIMING_START, TIMING_END, timings.markdown(timing)))
    if magnifiers is not None:
        blocks.append((MAGNIFIERS_START, MAGNIFIERS_END, magnifiers))
    for start, end, block in blocks:
        if start not in new or end not in new:
            raise ValueError(f"{readme} lacks the markers {start!r} and {end!r}")
        head, rest = new.split(start, 1)
        new = head + start + "\n" + block + end + rest.split(end, 1)[1]
    if new != text:
        atomic_write(readme, lambda tmp: tmp.write_text(new))
    return new != text
