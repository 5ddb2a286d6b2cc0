"""Protocols that select clips and fill label/label_name: the MEGC2019 composite and the 5-class sets.

The MEGC2019 rules (negative = Repression, Anger, Contempt, Disgust, Fear, Sadness; positive = Happiness;
surprise = Surprise) are applied per dataset as the organisers' file combined_3class_gt.csv shows them:
CASME II contributes only disgust and repression as negative (its 7 sadness and 2 fear clips are not in
the file, which is how the mapping gives 147 CASME II clips), and the organisers left out two CASME II clips
(`MEGC2019_EXCLUDED`). With these rules the three coding sheets give the file's 442 clips exactly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .readers import COLUMNS, casme2_subject, samm_subject, smic_subject


@dataclass(frozen=True)
class Protocol:
    """Which clips a protocol keeps and their labels: per dataset, emotion (lower case) -> class name."""
    name: str
    classes: tuple[str, ...]
    mapping: dict[str, dict[str, str]]
    dropped: dict[str, frozenset[str]]  # emotions known to be left out (others are reported as unknown)
    excluded: tuple[tuple[str, str, str], ...] = field(default=())  # (dataset, subject, clip) left out by name


_MEGC_CASME2 = {"disgust": "negative", "repression": "negative", "happiness": "positive", "surprise": "surprise"}
MEGC2019_EXCLUDED = (("casme2", "sub04", "EP12_01f"),  # disgust, apex '/' in the 2014 sheet
                     ("casme2", "sub05", "EP09_05f"))  # disgust, apex == onset
MEGC2019 = Protocol(
    name="megc2019",
    classes=("negative", "positive", "surprise"),
    mapping={
        "casme2": _MEGC_CASME2,
        "synthetic": _MEGC_CASME2,
        "samm": {e: "negative" for e in ("anger", "contempt", "disgust", "fear", "sadness")}
        | {"happiness": "positive", "surprise": "surprise"},
        "smic": {"negative": "negative", "positive": "positive", "surprise": "surprise"},
    },
    dropped={"casme2": frozenset({"others", "fear", "sadness"}), "synthetic": frozenset({"others"}),
             "samm": frozenset({"other", "others"}), "smic": frozenset()},
    excluded=MEGC2019_EXCLUDED,
)
CASME2_5CLASS = Protocol(
    name="casme2_5class",
    classes=("happiness", "surprise", "disgust", "repression", "others"),
    mapping={name: {e: e for e in ("happiness", "surprise", "disgust", "repression", "others")}
             for name in ("casme2", "synthetic")},
    dropped={"casme2": frozenset({"fear", "sadness"}), "synthetic": frozenset()},
)
SAMM_5CLASS = Protocol(
    name="samm_5class",
    classes=("anger", "contempt", "happiness", "surprise", "others"),
    mapping={"samm": {e: e for e in ("anger", "contempt", "happiness", "surprise")} | {"other": "others",
                                                                                      "others": "others"}},
    dropped={"samm": frozenset({"disgust", "fear", "sadness"})},
)
GT_DATASET_ORDER = ("casme2", "smic", "samm")  # the order of combined_3class_gt.csv


def apply_protocol(df: pd.DataFrame, protocol: Protocol) -> pd.DataFrame:
    """Keep the clips the protocol maps, with label (index into protocol.classes) and label_name filled.
    Emotions the protocol does not know are dropped with a warning naming clips and spellings."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"clip table lacks column(s) {missing} (make it with amanlib.data.read_*)")
    unknown_sets = sorted(set(df["dataset"]) - set(protocol.mapping))
    if unknown_sets:
        raise ValueError(f"protocol {protocol.name} has no rules for dataset(s) {unknown_sets}; "
                         f"it covers {sorted(protocol.mapping)}")
    emotion = df["emotion"].astype("string").str.strip().str.lower()
    class_name = pd.Series(pd.NA, index=df.index, dtype="string")
    known = pd.Series(False, index=df.index)
    for dataset, mapping in protocol.mapping.items():
        rows = df["dataset"] == dataset
        class_name[rows] = emotion[rows].map(mapping).astype("string")
        known |= rows & emotion.isin(set(mapping) | protocol.dropped.get(dataset, frozenset()))
    if (~known).any():
        odd = df[~known]
        listing = ", ".join(f"{d} {s}/{c} ({e!r})" for d, s, c, e in
                            zip(odd["dataset"], odd["subject"], odd["clip"], odd["emotion"]))
        warnings.warn(f"protocol {protocol.name}: unknown emotion for {len(odd)} clip(s), dropped: {listing}",
                      stacklevel=2)
    keys = set(zip(df["dataset"], df["subject"], df["clip"]))
    excluded = [k for k in protocol.excluded if k in keys]
    is_excluded = pd.Series([k in set(excluded) for k in zip(df["dataset"], df["subject"], df["clip"])],
                            index=df.index)
    out = df[class_name.notna() & ~is_excluded].copy()
    out["label_name"] = class_name[out.index]
    out["label"] = out["label_name"].map({c: i for i, c in enumerate(protocol.classes)}).astype("Int64")
    return out.reset_index(drop=True)


def megc2019_3class(df: pd.DataFrame) -> pd.DataFrame:
    """One dataset (or several) under the MEGC2019 rules: labels 0 negative, 1 positive, 2 surprise."""
    return apply_protocol(df, MEGC2019)


def casme2_5class(df: pd.DataFrame) -> pd.DataFrame:
    """CASME II 5-class set used by AMAN: happiness, surprise, disgust, repression, others (246 clips)."""
    return apply_protocol(df, CASME2_5CLASS)


def samm_5class(df: pd.DataFrame) -> pd.DataFrame:
    """SAMM 5-class set used by AMAN: anger, contempt, happiness, surprise, others (136 clips)."""
    return apply_protocol(df, SAMM_5CLASS)


def megc2019_composite(casme2: pd.DataFrame | None = None, samm: pd.DataFrame | None = None,
                       smic: pd.DataFrame | None = None) -> pd.DataFrame:
    """The MEGC2019 composite (442 clips, 68 subjects with all three) from the readers' tables, rows in the
    organisers' order (CASME II, SMIC, SAMM). Any dataset may be None when you do not have it."""
    given = {"casme2": casme2, "samm": samm, "smic": smic}
    parts = {}
    for name, df in given.items():
        if df is None:
            continue
        other = sorted(set(df["dataset"]) - {name})
        if other:
            raise ValueError(f"megc2019_composite: the {name} argument holds dataset(s) {other}")
        parts[name] = megc2019_3class(df)
    if not parts:
        raise ValueError("megc2019_composite needs at least one of casme2, samm, smic")
    return pd.concat([parts[n] for n in GT_DATASET_ORDER if n in parts], ignore_index=True)


def class_counts(df: pd.DataFrame, classes: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Per-dataset table: clips per class, clips and subjects (the table of the MEGC2019 description)."""
    classes = classes or tuple(pd.unique(df.sort_values("label")["label_name"]))
    table = pd.crosstab(df["dataset"], df["label_name"]).reindex(columns=list(classes), fill_value=0)
    table["clips"] = df.groupby("dataset").size()
    table["subjects"] = df.groupby("dataset")["subject"].nunique()
    table.columns.name = None
    return table


_SUBJECT_NAMING = {"casme2": casme2_subject, "samm": samm_subject, "smic": smic_subject}


def _key_frame(dataset: pd.Series, subject: pd.Series, clip: pd.Series) -> pd.DataFrame:
    """(dataset, subject, clip) in one naming: the gt file writes SAMM subjects unpadded, SMIC padded."""
    dataset = dataset.astype(str).str.strip().str.lower()
    subject = [_SUBJECT_NAMING.get(d, str)(s) for d, s in zip(dataset, subject)]
    clip = [str(c).strip() for c in clip]
    clip = [s + c[c.index("_"):] if d == "smic" and "_" in c else c for d, s, c in zip(dataset, subject, clip)]
    return pd.DataFrame({"dataset": list(dataset), "subject": subject, "clip": clip})


def read_gt(gt_csv: str | Path) -> pd.DataFrame:
    """The organisers' combined_3class_gt.csv (no header: dataset, subject, clip, label)."""
    path = Path(gt_csv)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file {path} does not exist")
    gt = pd.read_csv(path, header=None, dtype=str, skipinitialspace=True)
    if gt.shape[1] != 4:
        raise ValueError(f"{path}: expected 4 columns (dataset, subject, clip, label), found {gt.shape[1]}")
    gt.columns = ["dataset", "subject", "clip", "label"]
    labels = pd.to_numeric(gt["label"], errors="coerce")
    if labels.isna().any():
        raise ValueError(f"{path}: non-numeric label on line(s) {list(gt.index[labels.isna()] + 1)}")
    keys = _key_frame(gt["dataset"], gt["subject"], gt["clip"])
    return keys.assign(label=labels.astype(int).to_numpy())


@dataclass
class GTReport:
    """Clip-by-clip comparison with a ground-truth file; str() is a readable report."""
    gt_csv: Path
    missing: pd.DataFrame  # in the gt file, not in the table
    extra: pd.DataFrame  # in the table, not in the gt file
    wrong_label: pd.DataFrame  # in both, labels differ (label_gt, label)
    compared: int

    @property
    def ok(self) -> bool:
        return self.missing.empty and self.extra.empty and self.wrong_label.empty

    def __str__(self) -> str:
        if self.ok:
            return f"all {self.compared} clips match {self.gt_csv}"
        lines = [f"mismatches against {self.gt_csv} ({self.compared} clips compared):"]
        for title, rows in (("missing from the table", self.missing), ("not in the ground truth", self.extra),
                            ("different label", self.wrong_label)):
            if len(rows):
                lines.append(f"  {len(rows)} {title}:")
                lines += ["    " + " ".join(map(str, r)) for r in rows.itertuples(index=False)]
        return "\n".join(lines)

    def raise_if_mismatch(self) -> None:
        if not self.ok:
            raise ValueError(str(self))


def validate_against_gt(df: pd.DataFrame, gt_csv: str | Path, datasets: tuple[str, ...] | None = None) -> GTReport:
    """Compare a labelled clip table (e.g. megc2019_composite) with the organisers' file, clip by clip.
    Only the datasets present in `df` (or those in `datasets`) are compared."""
    for col in ("dataset", "subject", "clip", "label"):
        if col not in df.columns:
            raise ValueError(f"validate_against_gt: the table lacks column {col!r}")
    if df["label"].isna().any():
        raise ValueError("validate_against_gt: the table has clips without a label; apply a protocol first")
    gt = read_gt(gt_csv)
    ours = _key_frame(df["dataset"], df["subject"], df["clip"]).assign(label=df["label"].astype(int).to_numpy())
    datasets = tuple(datasets or sorted(set(ours["dataset"])))
    gt = gt[gt["dataset"].isin(datasets)]
    ours = ours[ours["dataset"].isin(datasets)]
    key = ["dataset", "subject", "clip"]
    both = gt.merge(ours, on=key, how="outer", suffixes=("_gt", ""), indicator=True)
    both[["label_gt", "label"]] = both[["label_gt", "label"]].astype("Int64")
    return GTReport(
        gt_csv=Path(gt_csv),
        missing=both.loc[both["_merge"] == "left_only", key + ["label_gt"]].reset_index(drop=True),
        extra=both.loc[both["_merge"] == "right_only", key + ["label"]].reset_index(drop=True),
        wrong_label=both.loc[(both["_merge"] == "both") & (both["label_gt"] != both["label"]),
                             key + ["label_gt", "label"]].reset_index(drop=True),
        compared=int(len(both)),
    )
