"""Everything written to a results folder: where each file lives, the clip table hand-off, run folders and
metrics.json. `LOSOResult.save` and `LOSOResult.load` are inverses; notebooks never build these paths."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .metrics import scores, write_megc_log
from .runtime import atomic_write

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
            "label_protocol": getattr(sources, "label_protocol", None), "seed": getattr(sources, "seed", None)}
    save_json(info, work_dir(results_dir) / "index.json")
    atomic_write(work_dir(results_dir) / "index.csv", lambda tmp: index.to_csv(tmp, index=False))


def read_index_info(results_dir) -> dict:
    """dataset, label_protocol and seed of the saved clip table."""
    path = Path(results_dir) / "work" / "index.json"
    return json.loads(path.read_text()) if path.exists() else {"dataset": None, "label_protocol": None, "seed": None}


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


def update_metrics(results_dir, **fields) -> dict:
    """Merge fields into results_dir/metrics.json (written atomically); run_dir is stored relative to
    results_dir so the folder can move."""
    path = Path(results_dir) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    if "run_dir" in fields:
        fields["run_dir"] = Path(fields["run_dir"]).resolve().relative_to(Path(results_dir).resolve()).as_posix()
    metrics.update(fields)
    save_json(metrics, path)
    return metrics


def read_metrics(results_dir) -> dict:
    path = Path(results_dir) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train first (notebook 04_training)")
    return json.loads(path.read_text())


def metrics_run_dir(results_dir, metrics: dict) -> Path:
    """The AMAN run folder metrics.json points at (stored relative to results_dir, or absolute)."""
    return Path(results_dir) / metrics["run_dir"]


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
        """Read back what save wrote."""
        run_dir = Path(run_dir)
        if not (run_dir / "predictions.csv").is_file():
            raise FileNotFoundError(f"{run_dir} holds no finished LOSO run (predictions.csv is missing)")
        p = pd.read_csv(run_dir / "predictions.csv", dtype=INDEX_DTYPES)
        attention = np.load(run_dir / "attention.npz")
        p["alpha"], p["beta"] = list(attention["alpha"]), list(attention["beta"])
        return cls(p, pd.read_csv(run_dir / "history.csv"), pd.read_csv(run_dir / "scores.csv", index_col=0), run_dir,
                   json.loads((run_dir / "config.json").read_text()))


def attention(predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """alpha [N, F, K] and beta [N, F] of a run's predictions."""
    return np.stack(predictions["alpha"].to_list()), np.stack(predictions["beta"].to_list())


def protocol_gap(predictions: pd.DataFrame, epoch_selection: str) -> pd.DataFrame:
    """Scores of the chosen epoch, the last epoch and the best epoch on each test subject (optimistic)."""
    p = predictions
    return pd.DataFrame({f"chosen epoch ({epoch_selection})": scores(p["gt"], p["pred"]),
                         "last epoch": scores(p["gt"], p["pred_last"]),
                         "best epoch on test subject (optimistic)": scores(p["gt"], p["pred_best_test"])}).T


def run_title(metrics: dict) -> str:
    return (f"{metrics['model']}, epochs {metrics['epoch_selection']}"
            + (" (OPTIMISTIC)" if metrics["optimistic"] else ""))


def headline(metrics: dict) -> str:
    return json.dumps({k: metrics[k] for k in ("model", "label_protocol", "epoch_selection", "uf1", "uar", "accuracy")},
                      indent=1)


def record_training(results_dir, index: pd.DataFrame, cache, aman: LOSOResult, table: pd.DataFrame) -> dict:
    """Write metrics.json anew from a training run: everything in it comes from the run, its features and
    the clip table it was trained on, so no field can describe another run."""
    cfg, p = aman.config, aman.predictions
    info = read_index_info(results_dir)
    full = table[table.subset == "full"]
    fields = {
        "dataset": info["dataset"], "label_protocol": info["label_protocol"],
        "epoch_selection": cfg["epoch_selection"], "optimistic": aman.optimistic,
        "model": "AMAN, frozen layer4" if cfg["frozen_layer4"] else "AMAN", "backbone": cache.backbone["name"],
        "magnifier": cache.inputs["magnifier"]["name"], "factors": cache.factors, "n_frames": cache.inputs["n_frames"],
        "clips": len(index), "subjects": int((index.dataset + "/" + index.subject).nunique()), "seed": cfg["seed"],
        **{k: v for k, v in scores(p["gt"], p["pred"]).items() if k != "n"},
        "per_subset": aman.scores.drop(columns="epoch_selection").to_dict(orient="index"),
        "paper_protocol_on_same_run": scores(p["gt"], p["pred_best_test"]),
        "ablations": {r.variant: {"uf1": r.uf1, "uar": r.uar, "accuracy": r.accuracy} for r in full.itertuples()},
        "run_dir": aman.out_dir,
    }
    path = Path(results_dir) / "metrics.json"
    path.unlink(missing_ok=True)  # a new run: nothing of an earlier one survives
    return update_metrics(results_dir, **fields)
