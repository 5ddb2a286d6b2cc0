"""MEGC2019 scores (UF1 = macro F1, UAR = mean per-class recall) and the MEGC log format."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, recall_score

from .runtime import atomic_write

CLASSES = ("negative", "positive", "surprise")  # composite labels 0, 1, 2
SUBSETS = ("smic", "casme2", "samm")
LOG_COLUMNS = ["dataset", "subject", "clip", "gt", "pred"]
LOG_DATASETS = SUBSETS + ("synthetic",)  # the <db> of a fold header in an MEGC log


def uf1(y_true, y_pred) -> float:
    """Unweighted F1: the mean of per-class F1 over the classes that occur in y_true or y_pred."""
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def uar(y_true, y_pred) -> float:
    """Unweighted average recall: the mean of per-class recall over the classes present."""
    return float(recall_score(y_true, y_pred, average="macro", zero_division=0))


def accuracy(y_true, y_pred) -> float:
    return float(accuracy_score(y_true, y_pred))


def scores(y_true, y_pred) -> dict:
    return {"uf1": uf1(y_true, y_pred), "uar": uar(y_true, y_pred), "accuracy": accuracy(y_true, y_pred),
            "n": len(y_true)}


def megc_scores(df: pd.DataFrame) -> pd.DataFrame:
    """Scores for the whole set ('full') and each dataset present, as MEGC2019 reports them."""
    for col in ("dataset", "gt", "pred"):
        if col not in df:
            raise ValueError(f"megc_scores: column '{col}' is missing (have {list(df.columns)})")
    rows = {"full": scores(df["gt"], df["pred"])}
    extra = sorted(set(df.dataset) - set(SUBSETS))
    for name in [s for s in SUBSETS if s in set(df.dataset)] + extra:
        part = df[df.dataset == name]
        rows[name] = scores(part["gt"], part["pred"])
    out = pd.DataFrame.from_dict(rows, orient="index")
    out["n"] = out["n"].astype(int)
    return out


def _log_lines(path: Path) -> list[str]:
    """The lines of a log file (a UTF-8 BOM dropped); a directory, a missing or a non-text file is an error."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass the log files inside it")
    if not path.is_file():
        raise FileNotFoundError(f"MEGC log {path} does not exist")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text, so not an MEGC log ({err})") from None


def read_megc_log(path: str | Path, num_classes: int = len(CLASSES)) -> pd.DataFrame:
    """Parse an MEGC2019 log: '<db> <subject>' fold headers (db one of LOG_DATASETS), then '<clip> <gt> <pred>'
    lines with labels 0 .. num_classes - 1 (MEGC2019: negative, positive, surprise); '#' starts a comment. Any
    other line, a label outside the classes or a clip twice in one fold is an error naming the file, the line
    number and the line. `.attrs['optimistic']`: a comment marks the log OPTIMISTIC (epoch chosen on the test
    subject, as write_megc_log marks such runs)."""
    path = Path(path)
    rows, fold, seen, optimistic = [], None, {}, False
    for lineno, line in enumerate(_log_lines(path), 1):
        parts = line.split()
        if parts and parts[0].startswith("#"):
            optimistic = optimistic or "OPTIMISTIC" in line
            continue
        if not parts:
            continue
        if len(parts) == 2 and parts[0] in LOG_DATASETS:
            fold = parts
        elif len(parts) == 3 and fold is None:
            raise ValueError(f"{path}:{lineno}: clip line {line!r} before any '<db> <subject>' fold header")
        elif len(parts) == 3:
            try:
                gt, pred = int(parts[1]), int(parts[2])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: gt and pred must be integers, got {line!r}") from None
            if not (0 <= gt < num_classes and 0 <= pred < num_classes):
                raise ValueError(f"{path}:{lineno}: gt and pred must be classes 0 to {num_classes - 1}, got {line!r} "
                                 "(another protocol's log: pass its number of classes)")
            clip = (*fold, parts[0])
            if clip in seen:
                raise ValueError(f"{path}:{lineno}: clip {parts[0]} of fold '{' '.join(fold)}' is listed again (first "
                                 f"on line {seen[clip]}): a clip counts once")
            seen[clip] = lineno
            rows.append([*clip, gt, pred])
        else:
            raise ValueError(f"{path}:{lineno}: expected '<db> <subject>' (db one of {', '.join(LOG_DATASETS)}) or "
                             f"'<clip> <gt> <pred>', got {line!r}")
    if not rows:
        raise ValueError(f"{path}: no prediction lines found (is this an MEGC log?)")
    df = pd.DataFrame(rows, columns=LOG_COLUMNS)
    df.attrs["optimistic"] = optimistic
    return df


def write_megc_log(df: pd.DataFrame, path: str | Path, comment: str | None = None) -> Path:
    """Write predictions in MEGC2019 log format, one '<db> <subject>' block per fold, order kept.

    A comment (e.g. that the epoch was chosen on the test subject) goes first, behind '#'.
    """
    missing = [c for c in LOG_COLUMNS if c not in df]
    if missing:
        raise ValueError(f"write_megc_log: columns {missing} are missing (have {list(df.columns)})")
    lines = [f"# {comment}"] if comment else []
    for (dataset, subject), part in df.groupby(["dataset", "subject"], sort=False):
        lines.append(f"{dataset} {subject}")
        lines += [f"{c} {int(g)} {int(p)}" for c, g, p in zip(part["clip"], part["gt"], part["pred"])]
    return atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def megc_logs(folder: str | Path | None) -> dict[Path, pd.DataFrame]:
    """Every MEGC2019 log (*.txt) in a folder, read; {} for None."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"other_logs: {folder} is not a folder of MEGC2019 logs (*.txt)")
    return {path: read_megc_log(path) for path in sorted(folder.glob("*.txt"))}


def compare_logs(ours: pd.DataFrame, logs: dict[Path, pd.DataFrame], our_name: str) -> pd.DataFrame:
    """megc_scores of our predictions and of each log, one table with a 'method' column."""
    return pd.concat([megc_scores(ours).assign(method=our_name)]
                     + [megc_scores(df).assign(method=path.stem) for path, df in logs.items()])
