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
    results_dir so the folder can move (run_dirs and runs too)."""
    path = Path(results_dir) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    if "run_dir" in fields:
        fields["run_dir"] = _relative(results_dir, fields["run_dir"])
    if "run_dirs" in fields:
        fields["run_dirs"] = [_relative(results_dir, p) for p in fields["run_dirs"]]
    if "runs" in fields:
        fields["runs"] = {variant: [_relative(results_dir, p) for p in paths]
                          for variant, paths in fields["runs"].items()}
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


def sweep_predictions(results_dir, metrics: dict) -> pd.DataFrame:
    """Every variant's predictions seed by seed (variant and seed columns), from the runs metrics.json names: the
    table notebook 04's statistics were computed from, e.g. to pool several results folders (bench/trunk_seeds.py)."""
    if "runs" not in metrics:
        raise ValueError(f"{Path(results_dir) / 'metrics.json'} names only AMAN's runs (written before the kit "
                         "recorded every variant's): run notebook 04 (training) again to write them")
    return pd.concat([LOSOResult.load(Path(results_dir) / folder).predictions.assign(variant=variant, seed=seed)
                      for variant, folders in metrics["runs"].items()
                      for seed, folder in zip(metrics["seeds"], folders)], ignore_index=True)


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
        "runs": {variant: [sweep.runs[(variant, s)].out_dir for s in seeds] for variant in summary.index},
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
                "a two-sided sign-flip permutation test over subjects on per-subject differences averaged over seeds. "
                "The trunk is held fixed: where it is the kit's own pre-training (synthetic data), another trunk seed "
                "or CPU can move every mean by more than these CIs (README: across machines).")


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
