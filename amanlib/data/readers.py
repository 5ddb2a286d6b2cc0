"""Readers for CASME II, SAMM and SMIC-HS as their owners ship them, into one clip table.

Every reader returns a DataFrame with the columns in `COLUMNS`, one row per clip: dataset ('casme2', 'samm',
'smic'), subject and clip as the dataset's folders name them (sub01/EP02_01f, 006/006_1_2, s01/s01_ne_01),
onset/apex/offset (nullable Int64 frame numbers; apex may be NA), emotion (as written in the source),
label/label_name (NA until a protocol in `composite` fills them) and frames_dir (the clip's folder, or NA
when no frames root was given). Text columns have pandas' "string" dtype.
"""
from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path
from typing import Literal

import pandas as pd

COLUMNS = ["dataset", "subject", "clip", "onset", "apex", "offset", "emotion", "label", "label_name", "frames_dir"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SMIC_EMOTIONS = ("negative", "positive", "surprise")
OnMissing = Literal["raise", "drop"]

CASME2_COLUMNS = {"subject": "Subject", "clip": "Filename", "onset": "OnsetFrame", "apex": "ApexFrame",
                  "offset": "OffsetFrame", "emotion": "Estimated Emotion"}
SAMM_COLUMNS = {"subject": "Subject", "clip": "Filename", "onset": "Onset Frame", "apex": "Apex Frame",
                "offset": "Offset Frame", "emotion": "Estimated Emotion"}

_FRAME_NUMBER = re.compile(r"(\d+)$")


def frame_index(frames_dir: str | Path) -> dict[int, Path]:
    """Frame number -> image path for a clip folder; the number is the digits ending the file stem
    (reg_img46.jpg, img46.jpg, 006_05562.jpg, image106720.bmp). Hidden files (macOS ._reg_img46.jpg) are
    skipped; two files with one number (reg_img046.jpg beside reg_img46.jpg) are an error naming both."""
    index = {}
    for path in sorted(Path(frames_dir).iterdir()):
        match = _FRAME_NUMBER.search(path.stem)
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or not match:
            continue
        number = int(match.group(1))
        if number in index:
            raise ValueError(f"{index[number]} and {path} are both frame {number}: keep one of them")
        index[number] = path
    return index


def _sheet_error(source: Path, problem: str) -> ValueError:
    return ValueError(f"{source}: {problem}")


def _take_columns(raw: pd.DataFrame, names: dict[str, str], source: Path) -> pd.DataFrame:
    """Rename the sheet's columns (matched ignoring case and surrounding spaces) to ours; error on any missing."""
    by_key = {str(c).strip().lower(): c for c in raw.columns}
    missing = [col for col in names.values() if col.strip().lower() not in by_key]
    if missing:
        raise _sheet_error(source, f"missing column(s) {missing}; found {[str(c) for c in raw.columns]}")
    out = pd.DataFrame({ours: raw[by_key[theirs.strip().lower()]].to_numpy() for ours, theirs in names.items()})
    out = out[~(out["subject"].isna() & out["clip"].isna())]  # trailing blank rows of a spreadsheet
    blank = out[out["subject"].isna() | out["clip"].isna()]
    if len(blank):
        raise _sheet_error(source, f"data row(s) {list(blank.index + 1)} lack a subject or a file name")
    return out.reset_index(drop=True)


def _frame_numbers(df: pd.DataFrame, source: Path) -> pd.DataFrame:
    """Onset/offset must be frame numbers (error naming the clip); a bad apex becomes NA with a warning."""
    df = df.copy()
    for col in ("onset", "offset"):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = df[values.isna() | (values % 1 != 0)]
        if len(bad):
            clips = [f"{s}/{c} ({v!r})" for s, c, v in zip(bad["subject"], bad["clip"], bad[col])]
            raise _sheet_error(source, f"{col} is not a frame number for clip(s) {clips}")
        df[col] = values.astype("Int64")
    reversed_ = df[df["offset"] < df["onset"]]
    if len(reversed_):
        clips = list(reversed_["subject"] + "/" + reversed_["clip"])
        raise _sheet_error(source, f"offset before onset for clip(s) {clips}")
    apex = pd.to_numeric(df["apex"], errors="coerce")
    for i in df.index[apex.isna() & df["apex"].notna()]:
        warnings.warn(f"{source}: clip {df.at[i, 'subject']}/{df.at[i, 'clip']} has apex {df.at[i, 'apex']!r}, "
                      "not a frame number: apex set to NA (fill it with amanlib.data.fill_apex)", stacklevel=3)
    outside = apex.notna() & ((apex < df["onset"]) | (apex > df["offset"]) | (apex % 1 != 0))
    for i in df.index[outside]:
        warnings.warn(f"{source}: clip {df.at[i, 'subject']}/{df.at[i, 'clip']} has apex {apex[i]:g} outside "
                      f"[{df.at[i, 'onset']}, {df.at[i, 'offset']}]: apex set to NA (fill it with "
                      "amanlib.data.fill_apex)", stacklevel=3)
    df["apex"] = apex.mask(outside).astype("Int64")
    return df


def _finish(df: pd.DataFrame, dataset: str, source: Path) -> pd.DataFrame:
    """Common schema, dtypes and a duplicate check."""
    df = df.assign(dataset=dataset, label=pd.array([pd.NA] * len(df), dtype="Int64"),
                   label_name=pd.Series([pd.NA] * len(df), dtype="string"),
                   frames_dir=pd.Series([pd.NA] * len(df), dtype="string"))
    for col in ("dataset", "subject", "clip", "emotion"):
        df[col] = df[col].astype("string").str.strip()
    dup = df[df.duplicated(["subject", "clip"], keep=False)]
    if len(dup):
        raise _sheet_error(source, f"clips listed more than once: {sorted(set(dup['subject'] + '/' + dup['clip']))}")
    return df[COLUMNS].reset_index(drop=True)


def check_frames(df: pd.DataFrame, frames_dirs: list[Path], on_missing: OnMissing = "raise") -> pd.DataFrame:
    """Set frames_dir and check every frame onset..offset exists; on a gap raise naming the clip and the path,
    or with on_missing='drop' drop those clips with one warning listing them all."""
    if on_missing not in ("raise", "drop"):
        raise ValueError(f"on_missing must be 'raise' or 'drop', not {on_missing!r}")
    problems = {}
    for i, folder in zip(df.index, frames_dirs):
        name = f"{df.at[i, 'dataset']} clip {df.at[i, 'subject']}/{df.at[i, 'clip']}"
        if not folder.is_dir():
            problems[i] = f"{name}: frames folder {folder} does not exist"
            continue
        have = frame_index(folder)
        missing = [n for n in range(int(df.at[i, "onset"]), int(df.at[i, "offset"]) + 1) if n not in have]
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            problems[i] = f"{name}: frame(s) {shown} of {df.at[i, 'onset']}..{df.at[i, 'offset']} missing in {folder}"
    df = df.assign(frames_dir=pd.Series([str(f) for f in frames_dirs], index=df.index, dtype="string"))
    if problems and on_missing == "raise":
        more = f" (and {len(problems) - 1} more clips with missing frames)" if len(problems) > 1 else ""
        raise FileNotFoundError(next(iter(problems.values())) + more)
    if problems:
        warnings.warn(f"dropped {len(problems)} clip(s) with missing frames:\n  " + "\n  ".join(problems.values()),
                      stacklevel=3)
    return df.drop(index=list(problems)).reset_index(drop=True)


def _frames_root(frames_root: str | Path) -> Path:
    root = Path(frames_root)
    if not root.is_dir():
        raise FileNotFoundError(f"frames root {root} does not exist")
    return root


def _file_start(path: Path) -> str:
    """What a file begins with, for errors: its first line when that is text, else its first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(80)
    if not head:
        return "an empty file"
    line = head.decode("utf-8-sig", errors="replace").split("\n")[0].rstrip("\r")
    return f"text starting {line!r}" if line.isprintable() and "\ufffd" not in line else f"bytes {head[:16]!r}"


def _open_workbook(path: Path) -> pd.ExcelFile:
    """The Excel workbook at path; an error naming the file when it is missing or no workbook (a renamed CSV)."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        return pd.ExcelFile(path)
    except (ValueError, KeyError, zipfile.BadZipFile) as err:  # pandas' answers for files of another format
        raise _sheet_error(path, f"not an Excel workbook (.xlsx or .xls); found {_file_start(path)}") from err


def _clean_text(value):
    """Text without UTF-8 BOMs and surrounding spaces (a BOM must never become part of a subject or clip name)."""
    return value.replace("\ufeff", "").strip() if isinstance(value, str) else value


def _read_excel(path: str | Path, **kwargs) -> pd.DataFrame:
    """A sheet of an annotation workbook (pandas.read_excel keywords) with headers and text cells cleaned."""
    with _open_workbook(Path(path)) as workbook:
        sheet = pd.read_excel(workbook, **kwargs)
    return sheet.rename(columns=_clean_text).apply(lambda column: column.map(_clean_text))


def casme2_subject(value) -> str:
    """CASME II subject as in its folders and the MEGC files: 1, '01', 'sub1' -> 'sub01'."""
    digits = re.fullmatch(r"(?:sub)?0*(\d+)", str(value).strip().removesuffix(".0"), flags=re.IGNORECASE)
    if not digits:
        raise ValueError(f"CASME II subject {value!r} is not a subject number")
    return f"sub{int(digits.group(1)):02d}"


def samm_subject(value) -> str:
    """SAMM subject as in its folders: 6, '6', '006' -> '006' (the MEGC file writes it unpadded)."""
    digits = re.fullmatch(r"0*(\d+)", str(value).strip().removesuffix(".0"))
    if not digits:
        raise ValueError(f"SAMM subject {value!r} is not a subject number")
    return f"{int(digits.group(1)):03d}"


def smic_subject(value) -> str:
    """SMIC subject in MEGC naming: 's1', 's01', 1 -> 's01'."""
    digits = re.fullmatch(r"s?0*(\d+)", str(value).strip(), flags=re.IGNORECASE)
    if not digits:
        raise ValueError(f"SMIC subject {value!r} is not a subject like s1 or s01")
    return f"s{int(digits.group(1)):02d}"


def read_casme2(coding_xlsx: str | Path, frames_root: str | Path | None = None, on_missing: OnMissing = "raise",
                dataset: str = "casme2") -> pd.DataFrame:
    """CASME II coding sheet (2014 or 2019 version) -> clip table; frames under <root>/sub01/EP02_01f/ as
    reg_imgN.jpg (Cropped release) or imgN.jpg (raw release). `dataset` names the rows (e.g. 'synthetic')."""
    source = Path(coding_xlsx)
    df = _take_columns(_read_excel(source), CASME2_COLUMNS, source)
    df["subject"] = [casme2_subject(s) for s in df["subject"]]
    df["clip"] = df["clip"].astype(str).str.strip()
    df = _finish(_frame_numbers(df, source), dataset, source)
    if frames_root is not None:
        root = _frames_root(frames_root)
        df = check_frames(df, [root / s / c for s, c in zip(df["subject"], df["clip"])], on_missing)
    return df


def _find_header_row(raw: pd.DataFrame, needed: list[str], source: Path, search_rows: int = 60) -> int:
    wanted = {n.lower() for n in needed}
    for row in range(min(search_rows, len(raw))):
        cells = {str(v).strip().lower() for v in raw.iloc[row] if pd.notna(v)}
        if wanted <= cells:
            return row
    raise _sheet_error(source, f"no header row with columns {needed} in the first {search_rows} rows")


def read_samm(codes_xlsx: str | Path, frames_root: str | Path | None = None, on_missing: OnMissing = "raise",
              sheet: str = "MICRO_ONLY") -> pd.DataFrame:
    """SAMM_Micro_FACS_Codes_v2.xlsx (sheet MICRO_ONLY; the header row, 14 in v2, is found by its column
    names) -> clip table; frames under <root>/006/006_1_2/006_05562.jpg."""
    source = Path(codes_xlsx)
    with _open_workbook(source) as workbook:
        sheets = workbook.sheet_names
    if sheet not in sheets:
        raise _sheet_error(source, f"no sheet {sheet!r}; sheets are {sheets}")
    raw = _read_excel(source, sheet_name=sheet, header=None)
    header = _find_header_row(raw, [SAMM_COLUMNS["subject"], SAMM_COLUMNS["clip"]], source)
    table = raw.iloc[header + 1:]
    table.columns = [str(c).strip() for c in raw.iloc[header]]
    df = _take_columns(table.reset_index(drop=True), SAMM_COLUMNS, source)
    df["subject"] = [samm_subject(s) for s in df["subject"]]
    df["clip"] = df["clip"].astype(str).str.strip()
    df = _finish(_frame_numbers(df, source), "samm", source)
    if frames_root is not None:
        root = _frames_root(frames_root)
        df = check_frames(df, [root / s / c for s, c in zip(df["subject"], df["clip"])], on_missing)
    return df


def read_smic(hs_root: str | Path, on_missing: OnMissing = "raise") -> pd.DataFrame:
    """SMIC-HS clip folders HS/s1/micro/{negative,positive,surprise}/s1_ne_01/ -> clip table in MEGC naming
    (s01, s01_ne_01). SMIC has no coding sheet: onset/offset are the first/last frame numbers, apex is NA.
    `hs_root` is the HS folder or its parent; subjects may be unpadded (s1, the release) or padded (s01)."""
    if on_missing not in ("raise", "drop"):
        raise ValueError(f"on_missing must be 'raise' or 'drop', not {on_missing!r}")
    root = Path(hs_root)
    if (root / "HS").is_dir():
        root = root / "HS"
    if not root.is_dir():
        raise FileNotFoundError(f"SMIC-HS root {root} does not exist")
    rows, folders = [], []
    subjects = sorted((p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"s\d+", p.name, re.IGNORECASE)),
                      key=lambda p: int(p.name[1:]))
    for subject_dir in subjects:
        subject = smic_subject(subject_dir.name)
        micro = subject_dir / "micro"
        if not micro.is_dir():
            continue  # subjects without micro-expressions have no micro folder in the release
        for emotion_dir in sorted(p for p in micro.iterdir() if p.is_dir()):
            if emotion_dir.name.lower() not in SMIC_EMOTIONS:
                raise ValueError(f"SMIC-HS: unexpected emotion folder {emotion_dir} (expected {SMIC_EMOTIONS})")
            for clip_dir in sorted(p for p in emotion_dir.iterdir() if p.is_dir()):
                match = re.fullmatch(r"s\d+(_.+)", clip_dir.name, re.IGNORECASE)
                if not match:
                    raise ValueError(f"SMIC-HS: clip folder {clip_dir} is not named like s1_ne_01")
                numbers = sorted(frame_index(clip_dir))
                rows.append({"subject": subject, "clip": subject + match.group(1),
                             "onset": numbers[0] if numbers else pd.NA, "apex": pd.NA,
                             "offset": numbers[-1] if numbers else pd.NA, "emotion": emotion_dir.name.lower()})
                folders.append(clip_dir)
    if not rows:
        raise ValueError(f"SMIC-HS: no clips under {root} (expected s1/micro/negative/s1_ne_01/ folders)")
    df = pd.DataFrame(rows)
    empty = df["onset"].isna()
    if empty.any():
        names = [f"smic clip {s}/{c}: no frames in {f}" for s, c, f in
                 zip(df.loc[empty, "subject"], df.loc[empty, "clip"], [f for f, e in zip(folders, empty) if e])]
        if on_missing == "raise":
            raise FileNotFoundError(names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else ""))
        warnings.warn(f"dropped {len(names)} clip(s) with missing frames:\n  " + "\n  ".join(names), stacklevel=2)
        folders = [f for f, e in zip(folders, empty) if not e]
        df = df[~empty].reset_index(drop=True)
    df = _finish(_frame_numbers(df, root), "smic", root)
    return check_frames(df, folders, on_missing)
