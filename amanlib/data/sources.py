"""Where a user's clips come from: one dataclass of the dataset choice and paths, and the clip table it gives."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import pandas as pd

from .composite import casme2_5class, megc2019_3class, megc2019_composite, samm_5class, validate_against_gt
from .frames import fill_apex
from .readers import read_casme2, read_samm, read_smic
from .synthetic import make_synthetic

LABEL_PROTOCOLS = {"megc2019_3class": megc2019_3class, "casme2_5class": casme2_5class, "samm_5class": samm_5class}
DATASETS = ("synthetic", "casme2", "samm", "smic", "composite")
NEEDS = {"casme2": ("casme2_coding", "casme2_frames"), "samm": ("samm_codes", "samm_frames"), "smic": ("smic_hs",),
         "composite": ("casme2_coding", "casme2_frames", "samm_codes", "samm_frames", "smic_hs")}


def source_problems(dataset: str, label_protocol: str, given: Mapping[str, object]) -> list[tuple[str, str]]:
    """The rules between the dataset and its other settings, as (setting, what is wrong) for each one broken; a path
    missing from `given` is not judged (the notebook parameters check reads only what a run passes)."""
    problems = []
    missing = [name for name in NEEDS.get(dataset, ()) if name in given and given[name] is None]
    if missing:
        problems.append(("dataset", f"{dataset!r} needs {', '.join(NEEDS[dataset])}; not given: {', '.join(missing)}"))
    if dataset == "composite" and label_protocol != "megc2019_3class":
        problems.append(("label_protocol", f"dataset 'composite' needs 'megc2019_3class', got {label_protocol!r}"))
    return problems


@dataclass(frozen=True)
class Sources:
    """The dataset to read and the user's files for it; `synthetic` holds SyntheticConfig overrides."""

    dataset: str = "synthetic"
    label_protocol: str = "megc2019_3class"
    seed: int = 0  # synthetic data generation
    data_dir: str | Path = "data"  # where the synthetic sets are written
    synthetic: dict = field(default_factory=dict)
    casme2_coding: str | Path | None = None
    casme2_frames: str | Path | None = None
    samm_codes: str | Path | None = None
    samm_frames: str | Path | None = None
    smic_hs: str | Path | None = None
    gt_csv: str | Path | None = None  # the organisers' combined_3class_gt.csv, to check the composite
    apex_method: str = "diff"
    on_missing: str = "raise"

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"Sources.dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.label_protocol not in LABEL_PROTOCOLS:
            raise ValueError(f"Sources.label_protocol must be one of {tuple(LABEL_PROTOCOLS)}, "
                             f"got {self.label_protocol!r}")
        problems = source_problems(self.dataset, self.label_protocol,
                                   {name: getattr(self, name) for name in NEEDS.get(self.dataset, ())})
        if problems:
            raise ValueError("; ".join(f"Sources.{name}: {text}" for name, text in problems))


def load_dataset(sources: Sources) -> pd.DataFrame:
    """The labelled clip table of the sources; clips without apex (SMIC, CASME II's '/') get one estimated."""
    s = sources
    if s.dataset == "synthetic":
        return make_synthetic(Path(s.data_dir) / "synthetic", seed=s.seed, label_protocol=s.label_protocol,
                              **s.synthetic)
    read = {"casme2": lambda: read_casme2(s.casme2_coding, s.casme2_frames, on_missing=s.on_missing),
            "samm": lambda: read_samm(s.samm_codes, s.samm_frames, on_missing=s.on_missing),
            "smic": lambda: read_smic(s.smic_hs, on_missing=s.on_missing)}
    if s.dataset == "composite":
        index = megc2019_composite(read["casme2"](), read["samm"](), read["smic"]())
    else:
        index = LABEL_PROTOCOLS[s.label_protocol](read[s.dataset]())
    if s.gt_csv is not None:
        validate_against_gt(index, s.gt_csv).raise_if_mismatch()
    return fill_apex(index, method=s.apex_method) if index["apex"].isna().any() else index
