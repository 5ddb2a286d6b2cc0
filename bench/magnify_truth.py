"""Every magnifier against the synthetic truth: how close each output is to the clip really magnified.

A small synthetic set is generated (CASME II layout, JPEG frames with noise); each magnifier gets a clip's onset
and apex frames as the kit reads them and the kit's factors (features.DEFAULT_FACTORS), and its outputs are
compared with synthetic.render_magnified_truth (the same face with the apex's whole motion times the factor,
noise-free). Two scores per clip and factor:

* PSNR over the face: the central half of the image (25%-75% of each side), inside every synthetic face;
* the magnified displacement: dense flow (Farneback, 9 px window: not the Lagrangian magnifier's own DIS, so
  it is not scored by its own tracker) from the onset to the output, median over the action region (where the
  expression moves at least half its peak) of its projection on the true direction, over a x the true one.
  The truth's own row shows what the estimator reads on a perfect output (displacement_vs_truth divides by
  it); `frame` (the apex unmagnified) is the do-nothing baseline.

Scores are reported by tertile of the clips' true apex displacement (peak_px), over the clip x factor pairs whose
magnified motion does not fold the face over itself (where no single image is the truth). The truth moves every
point of the frame on along its true motion with the same forward warp the Lagrangian magnifier uses, so the
Lagrangian's shortfall is its optical flow's error and the frame's noise. Writes results/bench/magnify_truth.csv
and prints the tables.

    python bench/magnify_truth.py                     # 6 subjects x 3 clips, narrow regime, seed 0
    python bench/magnify_truth.py --regime wide --subjects 9
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from amanlib import plots
from amanlib.data import (REGIMES, load_clip_frames, make_synthetic, read_truth, render_magnified_truth,
                          select_frames, synthetic_root)
from amanlib.features import DEFAULT_FACTORS
from amanlib.magnify import METHODS, default_checkpoint_path, magnifier_for
from amanlib.magnify.lagrangian import luminance_u8
from amanlib.magnify.truth_scores import SCORES, TERTILES, summary

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("AMANLIB_REFERENCE", REPO.parent / "shared" / "reference"))
REFERENCE_CKPT = REFERENCE / "magnet" / "learning_based_mag.pth.tar"


def face_box(height: int, width: int) -> tuple[slice, slice]:
    """The central half of the image, inside every synthetic face."""
    return slice(height // 4, 3 * height // 4), slice(width // 4, 3 * width // 4)


def psnr(images: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """PSNR in dB over the face box, per image: [K, 3, H, W] twice -> [K]."""
    rows, cols = face_box(*images.shape[-2:])
    mse = ((images - truth)[..., rows, cols] ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / mse)


def action_region(motion: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """Where the expression moves at least half its peak [H, W] bool, the true direction there [H, W, 2] and the
    true displacement (median), px. motion [2, H, W]: expression plus a near-uniform drift (its median over the
    image, taken out to find the expression)."""
    expression = motion - motion.flatten(1).median(dim=1).values[:, None, None]
    strength, norm = expression.norm(dim=0), motion.norm(dim=0)
    region = strength >= 0.5 * strength.max()
    direction = (motion / norm.clamp(min=1e-6)).permute(1, 2, 0)
    return region.numpy(), direction.numpy(), float(norm[region].median())


def measured_displacement(onset: torch.Tensor, images: torch.Tensor, region: np.ndarray,
                          direction: np.ndarray) -> np.ndarray:
    """Median over the region of the flow onset -> each image projected on the direction, px: [K] for onset
    [3, H, W] and images [K, 3, H, W]."""
    reference, targets = luminance_u8(onset[None])[0], luminance_u8(images)
    out = []
    for target in targets:
        flow = cv2.calcOpticalFlowFarneback(reference, target, None, pyr_scale=0.5, levels=3, winsize=9,
                                            iterations=3, poly_n=5, poly_sigma=1.1, flags=0)  # H, W, 2 (dx, dy)
        out.append(np.median((flow * direction).sum(-1)[region]))
    return np.array(out)


def magnifiers(checkpoint: str | None, precision: str):
    """(name, magnifier) for every method of the kit; learning only with its checkpoint."""
    for method in METHODS:
        if method == "learning":
            found = next((Path(p) for p in (checkpoint, default_checkpoint_path(), REFERENCE_CKPT)
                          if p is not None and Path(p).is_file()), None)
            if found is None:
                print("learning: no checkpoint (pass --checkpoint or set AMANLIB_REFERENCE); skipped", file=sys.stderr)
                continue
            yield method, magnifier_for(method, found, download=False, device="cpu", precision=precision)
        else:
            yield method, magnifier_for(method, device="cpu")


def score(data_root: Path, args) -> pd.DataFrame:
    settings = dict(seed=args.seed, regime=args.regime, n_subjects=args.subjects, clips_per_subject=args.clips)
    index = make_synthetic(data_root, **settings)
    folder = synthetic_root(data_root, **settings)
    recorded = read_truth(folder).set_index(["subject", "clip"])  # emotion, peak_px, ... per clip
    recorded["tertile"] = pd.qcut(recorded["peak_px"], 3, labels=TERTILES).astype(str)
    factors = [float(f) for f in args.factors]
    pairs = [load_clip_frames(select_frames(row, 2)) for _, row in index.iterrows()]  # onset, apex as the kit reads
    truths = [render_magnified_truth(folder, row["subject"], row["clip"], factors, frames=[int(row["apex"])])
              for _, row in index.iterrows()]
    candidates = {"truth": lambda onset, apex, i: truths[i].images[0],
                  "frame": lambda onset, apex, i: apex.expand(len(factors), -1, -1, -1)}
    for name, magnifier in magnifiers(args.checkpoint, args.precision):
        candidates[name] = lambda onset, apex, i, m=magnifier: m(onset[None], apex[None], factors)[0]
    rows = []
    for name, render in candidates.items():
        start = time.perf_counter()
        for i, ((onset, apex), (_, row)) in enumerate(zip(pairs, index.iterrows())):
            images = render(onset, apex, i)  # K, 3, H, W
            region, direction, true_px = action_region(truths[i].motion[0])
            clip = recorded.loc[(row["subject"], row["clip"])]
            for a, folded, db, px in zip(factors, truths[i].folded[0].tolist(),
                                         psnr(images, truths[i].images[0]).tolist(),
                                         measured_displacement(onset, images, region, direction)):
                rows.append(dict(method=name, subject=row["subject"], clip=row["clip"], emotion=clip["emotion"],
                                 peak_px=clip["peak_px"], tertile=clip["tertile"], factor=a, folded=folded,
                                 psnr_face_db=db, displacement_px=px, true_displacement_px=a * true_px,
                                 displacement_ratio=px / (a * true_px)))
        print(f"{name:10s} scored in {time.perf_counter() - start:5.1f} s", flush=True)
    table = pd.DataFrame(rows)
    keys = ["subject", "clip", "factor"]
    truth_reads = table[table["method"] == "truth"].set_index(keys)["displacement_px"]
    table["displacement_vs_truth"] = table["displacement_px"] / truth_reads.reindex(table.set_index(keys).index).values
    return table.assign(regime=args.regime, seed=args.seed, learning_precision=args.precision,
                        threads=torch.get_num_threads(),
                        machine=platform.processor() or platform.machine())


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--clips", type=int, default=3, help="clips per subject")
    parser.add_argument("--regime", default="narrow", choices=REGIMES, help="synthetic regime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--factors", type=float, nargs="+", default=DEFAULT_FACTORS)
    parser.add_argument("--checkpoint", help="learning_based_mag.pth.tar (default: the cache, then the reference)")
    parser.add_argument("--precision", default="fp32", help="of the learning-based network (runtime.PRECISIONS)")
    parser.add_argument("--data", type=Path, help="where to generate the set (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "magnify_truth.csv")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        table = score(args.data or Path(tmp), args)
    ranges = table.groupby("tertile")["peak_px"].agg(["min", "max"]).loc[list(TERTILES)]
    print("true apex displacement by tertile (px): "
          + ", ".join(f"{t} {r['min']:.2f}-{r['max']:.2f}" for t, r in ranges.iterrows()))
    folded = table[table["method"] == "truth"]["folded"]
    print(f"{int(folded.sum())} of {len(folded)} clip x factor pairs fold the face over itself (no single truth): "
          "left out below")
    with pd.option_context("display.float_format", "{:.2f}".format, "display.width", 160,
                           "display.max_columns", None):
        print(summary(table)[[(s, t) for s in SCORES for t in TERTILES]])
        print(summary(table, "factor"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    figure = args.out.with_suffix(".png")
    plots.save(plots.magnifiers_against_truth(summary(table, "factor"), f"magnifiers against the synthetic truth "
                                              f"({args.regime} regime, apex)"), figure)
    print(f"wrote {args.out} and {figure}")
    return table


if __name__ == "__main__":
    main()
