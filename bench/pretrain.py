"""What the trunk pre-training buys: held-out accuracy and seconds against epochs and crop size.

Each setting pre-trains the kit's synthetic-macro ResNet-18 from scratch (a fresh cache folder) on the default
macro set, in `--precision` (default auto, as `make reproduce`: bf16 only where native); seconds are printed as
ratios against the default setting timed in the same run. Held-out accuracy is over the 4 held-out subjects'
images (its binomial standard error is printed beside it). Writes results/bench/pretrain.csv.

    python bench/pretrain.py                            # epochs 6 8 10 x crops 128 160
    python bench/pretrain.py --epochs 10 --crops 112 128 160
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import pandas as pd

from amanlib.data import make_synthetic_macro
from amanlib.pretrain import PretrainConfig, pretrain_trunk
from amanlib.runtime import PRECISIONS, resolve_precision

REPO = Path(__file__).resolve().parents[1]
DEFAULT = PretrainConfig()


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, nargs="+", default=[6, 8, 10])
    ap.add_argument("--crops", type=int, nargs="+", default=[128, 160])
    ap.add_argument("--precision", default="auto", choices=PRECISIONS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "results" / "bench" / "pretrain.csv"))
    args = ap.parse_args(argv)
    settings = [(e, c) for c in args.crops for e in args.epochs]
    baseline = (DEFAULT.epochs, DEFAULT.crop)
    if baseline not in settings:
        settings.insert(0, baseline)
    precision = "bf16" if resolve_precision(args.precision, "cpu") else "fp32"  # what auto resolved to
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        macro = make_synthetic_macro(Path(tmp) / "macro", seed=args.seed)
        for epochs, crop in settings:
            cfg = PretrainConfig(epochs=epochs, crop=crop, seed=args.seed, device="cpu", precision=args.precision)
            start = time.perf_counter()
            trained = pretrain_trunk(macro, Path(tmp) / f"trunks-{epochs}-{crop}", cfg, progress=False)
            seconds = time.perf_counter() - start
            acc, n = trained.val_accuracy, trained.summary["val_images"]
            rows.append({"epochs": epochs, "crop": crop, "precision": precision, "seconds": seconds,
                         "val_accuracy": acc, "val_se": math.sqrt(acc * (1 - acc) / n), "val_images": n})
            print(f"epochs {epochs:>2} crop {crop}: {seconds:6.1f} s, held-out accuracy {acc:.3f} "
                  f"(SE {rows[-1]['val_se']:.3f}, {n} images)", flush=True)
    table = pd.DataFrame(rows)
    base = table[(table.epochs == baseline[0]) & (table.crop == baseline[1])].iloc[0]
    table["time_vs_default"] = table.seconds / base.seconds
    table["accuracy_minus_default"] = table.val_accuracy - base.val_accuracy
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
