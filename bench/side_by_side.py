"""Full-model training: M folds' models side by side against one model alone, as a ratio measured in the same run.

Alone: run_loso's training step (amanlib.train._Fold.train_epoch over one batch). Side by side: the sweep's step
(amanlib.sweep._FullProgram) of M models, each on its own batch; both at the synthetic default's shape (2 frames,
5 slots or 1, batch 4, precision auto) with bench/gpu_checks.py's timing (fastest of `--repeats` after a warm-up).
The ratio is the time of a model's step alone over its share of a side-by-side step (> 1: side by side is faster).
Writes results/bench/side_by_side.csv.

    python bench/side_by_side.py                                    # this CPU: M = 1, 4, 8
    python bench/side_by_side.py --device cuda --models 1 16 64 192
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import pandas as pd
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import flops  # noqa: E402
import gpu_checks  # noqa: E402


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--slots", type=int, nargs="+", default=[5, 1], help="factor slots per model (AMAN: 5)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=gpu_checks.H200_BF16_DENSE_TFLOPS)
    ap.add_argument("--out", type=Path, default=Path("results/bench/side_by_side.csv"))
    args = ap.parse_args(argv)
    device, d = torch.device(args.device), gpu_checks.SYNTHETIC_DEFAULT
    layer4 = flops.model_stages()["layer4_train"]
    shapes = [(d["frames"], k, d["batch"]) for k in args.slots]
    alone = gpu_checks.train_step_speed(device, shapes, clips=d["batch"], repeats=args.repeats,
                                        peak=args.peak_tflops, layer4_train=layer4)
    side = gpu_checks.side_by_side_step_speed(device, shapes, args.models, repeats=args.repeats,
                                              peak=args.peak_tflops, layer4_train=layer4)
    base = {r["factors"]: r["step_ms"] for r in alone}
    table = pd.DataFrame([{"device": str(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "machine": platform.processor() or platform.machine(), "slots": r["factors"],
                           "models": r["models"], "dtype": r["dtype"], "cudnn_benchmark": r["cudnn_benchmark"],
                           "alone_step_ms": base[r["factors"]],
                           "side_by_side_step_ms_per_model": r["step_ms_per_model"],
                           "ratio_alone_over_side_by_side": base[r["factors"]] / r["step_ms_per_model"],
                           "tflop_per_s": r["tflop_per_s"]} for r in side])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return table


if __name__ == "__main__":
    main()
