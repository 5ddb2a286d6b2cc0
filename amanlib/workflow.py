"""The steps the notebooks string together: choose the data, the backbone and the magnifier; record metrics.

Each function is one decision a notebook makes, kept here so the notebooks hold only narrative and plots.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from . import data
from .features import load_trunk
from .runtime import atomic_write

log = logging.getLogger(__name__)

PROTOCOLS = {"megc2019_3class": data.megc2019_3class, "casme2_5class": data.casme2_5class,
             "samm_5class": data.samm_5class}
DATASETS = ("synthetic", "casme2", "samm", "smic", "composite")


def _need(value, name: str, dataset: str):
    if value is None:
        raise ValueError(f"dataset '{dataset}' needs the parameter {name}")
    return value


def load_dataset(dataset: str = "synthetic", protocol: str = "megc2019_3class", seed: int = 0,
                 data_dir: str | Path = "data", synthetic: dict | None = None, casme2_coding=None,
                 casme2_frames=None, samm_codes=None, samm_frames=None, smic_hs=None, gt_csv=None,
                 apex_method: str = "diff", on_missing: str = "raise") -> pd.DataFrame:
    """The labelled clip table for one dataset and protocol; clips without apex get one estimated."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {protocol!r}")
    if dataset == "synthetic":
        return data.make_synthetic(Path(data_dir) / "synthetic", seed=seed, **(synthetic or {}))
    read = {
        "casme2": lambda: data.read_casme2(_need(casme2_coding, "casme2_coding", dataset),
                                           _need(casme2_frames, "casme2_frames", dataset), on_missing=on_missing),
        "samm": lambda: data.read_samm(_need(samm_codes, "samm_codes", dataset),
                                       _need(samm_frames, "samm_frames", dataset), on_missing=on_missing),
        "smic": lambda: data.read_smic(_need(smic_hs, "smic_hs", dataset), on_missing=on_missing),
    }
    if dataset == "composite":
        if protocol != "megc2019_3class":
            raise ValueError("the composite is defined for protocol 'megc2019_3class' only")
        index = data.megc2019_composite(read["casme2"](), read["samm"](), read["smic"]())
    else:
        index = PROTOCOLS[protocol](read[dataset]())
    if gt_csv is not None:
        data.validate_against_gt(index, gt_csv).raise_if_mismatch()
    # SMIC has no apex, and CASME II's '/' apexes are read as missing: estimate them for the selected clips only
    return data.fill_apex(index, method=apex_method) if index["apex"].isna().any() else index


def work_dir(results_dir: str | Path) -> Path:
    path = Path(results_dir) / "work"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_index(index: pd.DataFrame, results_dir) -> Path:
    """The clip table handed from notebook 01 to the others."""
    path = work_dir(results_dir) / "index.csv"
    return atomic_write(path, lambda tmp: index.to_csv(tmp, index=False))


def read_index(results_dir) -> pd.DataFrame:
    path = Path(results_dir) / "work" / "index.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run notebooks/01_dataset_prep.ipynb first")
    return pd.read_csv(path, dtype={"subject": str, "clip": str, "dataset": str})


def class_names(index: pd.DataFrame) -> list[str]:
    """Class names ordered by label."""
    pairs = index[["label", "label_name"]].drop_duplicates().sort_values("label")
    return pairs["label_name"].tolist()


def choose_backbone(backbone: str, results_dir, fer_checkpoint=None, seed: int = 0, data_dir="data",
                    pretrain_epochs: int = 10, device="auto") -> dict:
    """Pick the trunk: 'fer' (the user's FER+ file), 'synthetic_macro' (the kit's pre-training), 'random',
    or 'auto' (FER+ when a path is given, else synthetic_macro). Returns {trunk, name, checkpoint, note}."""
    from .pretrain import PretrainConfig, pretrain_trunk
    if backbone == "auto":
        backbone = "fer" if fer_checkpoint else "synthetic_macro"
    if backbone == "fer":
        path = _need(fer_checkpoint, "fer_checkpoint", "backbone 'fer'")
        return {"trunk": load_trunk(path), "name": "fer+", "checkpoint": str(path),
                "note": f"FER+ ResNet-18 from {path}, as in the paper"}
    if backbone == "synthetic_macro":
        macro = data.make_synthetic_macro(Path(data_dir) / "synthetic_macro", seed=seed)
        path = work_dir(results_dir) / f"trunk_synthetic_macro_seed{seed}_e{pretrain_epochs}.pth"
        summary = pretrain_trunk(macro, path, PretrainConfig(epochs=pretrain_epochs, seed=seed, device=device))
        return {"trunk": load_trunk(path), "name": "synthetic_macro", "checkpoint": str(path),
                "note": (f"NOT the paper's FER+ backbone: ResNet-18 pre-trained by the kit on {len(macro)} synthetic "
                         f"macro-expression images (held-out accuracy {summary['val_accuracy']:.2f})")}
    if backbone == "random":
        return {"trunk": load_trunk(None, allow_random=True), "name": "random", "checkpoint": None,
                "note": "RANDOM ResNet-18 weights: features are weak; results are not comparable to the paper"}
    raise ValueError(f"backbone must be auto, fer, synthetic_macro or random, got {backbone!r}")


def save_json(obj: dict, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=_plain)))


def update_metrics(results_dir, **fields) -> dict:
    """Merge fields into results_dir/metrics.json (written atomically)."""
    path = Path(results_dir) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics.update(fields)
    save_json(metrics, path)
    return metrics


def _plain(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def magnifier(method: str, checkpoint=None, download: bool = True, device="auto"):
    """A magnifier by name; for 'learning' the authors' checkpoint, fetched and verified when absent and allowed."""
    from .magnify import default_checkpoint_path, download_magnet_checkpoint, load_magnifier
    if method != "learning":
        return load_magnifier(method)
    path = Path(checkpoint) if checkpoint else default_checkpoint_path()
    if not path.exists() and download:
        log.warning("magnification checkpoint %s is absent: downloading the authors' file", path)
        try:
            download_magnet_checkpoint(path)
        except OSError as e:
            raise RuntimeError(f"could not download the magnification checkpoint to {path} ({e}); get "
                               "mag_imple/learning_based_mag.pth.tar from https://github.com/weimengting/AMAN "
                               "and pass its path as magnet_checkpoint (or set AMANLIB_MAGNET_CHECKPOINT)") from e
    return load_magnifier("learning", checkpoint=path, device=device)
