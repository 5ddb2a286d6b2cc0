"""Sweep speed: every fold x variant x seed as one batched program (run_sweep) against a loop of run_loso.

Pooled features [N, F, K, 512] with a class signal in the performance issue's shape (96 clips of 12 subjects,
4 frames, 10 factor slots: the synthetic default until 2026-11-25), the paper's 13 ablation variants and 5
seeds, 50 epochs. Both engines run in
this process on the same inputs; the predictions are compared and the ratio of seconds is printed. The loop
can be limited to the first --loop-runs (variant, seed) pairs (its time is then scaled to all pairs, said
so in the output). Also counts the matrix-product FLOPs of one sweep with torch.utils.flop_counter
(FlopCounterMode over a one-epoch sweep, every step and the epoch's predictions, times the epochs; element-wise
work is not counted) and prints the load average, as timings on a shared machine depend on it. Writes
results/bench/sweep.csv.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from amanlib.sweep import run_sweep
from amanlib.train import TrainConfig, ablation_variants, run_loso


def sweep_flops(x, index, cfg, variants, seeds, factors) -> int:
    """Matrix-product FLOPs of one sweep: counted over one epoch (every epoch does the same work) times the epochs."""
    with tempfile.TemporaryDirectory() as tmp, FlopCounterMode(display=False) as counter:
        run_sweep(x, index, cfg=dataclasses.replace(cfg, epochs=1), variants=variants, seeds=seeds, runs_dir=tmp,
                  factors=factors, progress=False)
    return counter.get_total_flops() * cfg.epochs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--subjects", type=int, default=12)
    p.add_argument("--clips-per-subject", type=int, default=8)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--loop-runs", type=int, default=None, help="run_loso runs to time (default: all pairs)")
    p.add_argument("--out", default="results/bench/sweep.csv")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    n = args.subjects * args.clips_per_subject
    index = pd.DataFrame({"dataset": "synthetic", "subject": [f"s{i // args.clips_per_subject:02d}" for i in range(n)],
                          "clip": [f"c{i:03d}" for i in range(n)], "label": torch.randint(0, 3, (n,), generator=g)})
    factors = [1.0] + np.round(np.linspace(2, 12, 9), 2).tolist()
    x = torch.randn(n, args.frames, len(factors), 512, generator=g)
    x[:, :, 5:] += 0.3 * torch.randn(3, 512, generator=g)[torch.as_tensor(index["label"])][:, None, None]
    cfg = TrainConfig(epochs=args.epochs, device="cpu")
    variants = ablation_variants(factors)
    seeds = list(range(args.seeds))
    pairs = [(v, s) for v in variants for s in seeds]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        swept = run_sweep(x, index, cfg=cfg, variants=variants, seeds=seeds, runs_dir=Path(tmp) / "sweep",
                          factors=factors, progress=False)
        sweep_s = time.perf_counter() - start
        looped = pairs[:args.loop_runs] if args.loop_runs else pairs
        start = time.perf_counter()
        same = 0
        for v, s in looped:
            vcfg = TrainConfig(epochs=args.epochs, device="cpu", seed=s, factor_slots=v.factor_slots,
                               use_alpha=v.use_alpha, use_beta=v.use_beta)
            alone = run_loso(x, index, cfg=vcfg, runs_dir=Path(tmp) / "loop", progress=False)
            same += np.array_equal(alone.predictions["pred"].to_numpy(), swept.runs[(v.name, s)].predictions["pred"])
        loop_s = (time.perf_counter() - start) * len(pairs) / len(looped)
    load_after = os.getloadavg()
    flops = sweep_flops(x, index, cfg, variants, seeds, factors)
    table = pd.DataFrame([{"method": "loop of run_loso" + ("" if len(looped) == len(pairs) else
                                                           f" ({len(looped)} of {len(pairs)} runs timed, scaled)"),
                           "seconds": loop_s},
                          {"method": "run_sweep (one batched program)", "seconds": sweep_s}])
    table["speedup"] = loop_s / table["seconds"]
    table["models"] = len(pairs) * args.subjects
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.assign(matmul_flops=[None, flops]).to_csv(args.out, index=False)  # counted for the sweep only
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {args.subjects} folds x {len(variants)} variants x {len(seeds)} seeds, {args.epochs} epochs")
    print(table.round(2).to_string(index=False))
    print(f"predictions identical for {same} of {len(looped)} (variant, seed) runs compared")
    print(f"FLOPs of one sweep: {flops / 1e12:.3f} TFLOP in matrix products (FlopCounterMode over one epoch x "
          f"{args.epochs}; element-wise work not counted), {flops / sweep_s / 1e9:.1f} GFLOP/s in run_sweep")
    print(f"load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)}, after "
          f"{tuple(round(v, 2) for v in load_after)} on {os.cpu_count()} CPUs")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
