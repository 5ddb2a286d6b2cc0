"""Magnifiers scored against the synthetic truth (bench/magnify_truth.py writes the scores, README shows them).

Per clip and factor the bench records the PSNR over the face against the truly magnified frame and the magnified
displacement over factor x the true one; this module sums them per method and tertile of true motion.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

TERTILES = ("low", "mid", "high")
SCORES = {"psnr_face_db": "mean", "displacement_ratio": "median", "displacement_vs_truth": "median"}  # how summed


def summary(table: pd.DataFrame, by: str = "tertile") -> pd.DataFrame:
    """Per method and tertile (or factor), over the clips and factors where the truth does not fold: mean PSNR
    over the face, median displacement over a x the true one and over the estimator's reading of the truth."""
    unfolded = table[~table["folded"].astype(bool)]
    grouped = unfolded.groupby(["method", by], sort=False)
    out = pd.concat({score: grouped[score].agg(how).unstack() for score, how in SCORES.items()}, axis=1)
    return out.loc[list(dict.fromkeys(table["method"]))]


def markdown(path: str | Path) -> str:
    """README's table of the magnifiers against the truth, from the bench's CSV."""
    table = pd.read_csv(path)
    scores = summary(table)
    ranges = table.groupby("tertile")["peak_px"].agg(["min", "max"])
    folded = table[table["method"] == "truth"]["folded"].astype(bool)
    first = table.iloc[0]
    tertiles = ", ".join(f"{t} {ranges.loc[t, 'min']:.2f}-{ranges.loc[t, 'max']:.2f} px" for t in TERTILES)
    lines = [f"| method | PSNR over the face (dB), {' / '.join(TERTILES)} motion | magnified displacement / the "
             f"truth's, {' / '.join(TERTILES)} |", "|---|---|---|"]
    for method, row in scores.iterrows():
        if method == "truth":
            continue
        psnr = " / ".join(f"{row[('psnr_face_db', t)]:.1f}" for t in TERTILES)
        ratio = " / ".join(f"{row[('displacement_vs_truth', t)]:.2f}" for t in TERTILES)
        lines.append(f"| {method} | {psnr} | {ratio} |")
    n_clips = table[["subject", "clip"]].drop_duplicates().shape[0]
    factors = ", ".join(f"{f:g}" for f in sorted(table["factor"].unique()))
    lines.append("")
    lines.append(f"{n_clips} clips of the {first['regime']} regime (seed {first['seed']}; true apex displacement "
                 f"{tertiles}) at factors {factors}, "
                 f"apex against onset; {int(folded.sum())} of {len(folded)} clip x factor pairs fold the face over "
                 f"itself and are left out; `frame` is the unmagnified apex; learning ran in {first['learning_precision']} "
                 f"on {first['threads']} threads ({first['machine']}).")
    return "\n".join(lines) + "\n"
