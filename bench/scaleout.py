"""Ray's overhead: the same LOSO run (full model, toy maps) on the local executor and on a local Ray instance.

Both engines train the same folds in this process's run folders; the predictions are compared and the
seconds printed as a ratio, with Ray's start-up apart. On the composite the units are hours of GPU work
(bench/flops.py prints the estimated composite time on N GPUs), so this start-up and the per-task overhead
are what Ray costs there. Writes results/bench/scaleout.csv.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from amanlib.executors import make_executor
from amanlib.train import TrainConfig, run_loso


def toy(subjects: int, clips: int, frames: int, factors: int, size: int):
    """A clip table and 6-D trunk maps [N, F, K, 256, size, size] with a class signal."""
    g = torch.Generator().manual_seed(0)
    n = subjects * clips
    labels = torch.randint(0, 3, (n,), generator=g)
    index = pd.DataFrame({"dataset": "synthetic", "subject": [f"s{i // clips:02d}" for i in range(n)],
                          "clip": [f"c{i:03d}" for i in range(n)], "label": labels.numpy()})
    x = torch.randn(n, frames, factors, 256, size, size, generator=g)
    x[:, :, :, :3] += labels[:, None, None, None, None, None].float()
    return index, x.half()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--clips-per-subject", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cpus-per-task", type=float, default=1)
    p.add_argument("--out", default="results/bench/scaleout.csv")
    args = p.parse_args(argv)
    index, x = toy(args.subjects, args.clips_per_subject, frames=2, factors=3, size=6)
    cfg = TrainConfig(epochs=args.epochs, device="cpu", layer4_bn="per_slice")
    torch.set_num_threads(max(1, round(args.cpus_per_task)))  # as a Ray task has: the same sums, bit for bit
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        local = run_loso(x, index, cfg=cfg, runs_dir=Path(tmp) / "local", progress=False)
        local_s = time.perf_counter() - start
        start = time.perf_counter()
        with make_executor("ray", cpus_per_task=args.cpus_per_task) as ex:
            startup_s = time.perf_counter() - start
            start = time.perf_counter()
            ray = run_loso(x, index, cfg=cfg, runs_dir=Path(tmp) / "ray", progress=False, executor=ex)
            ray_s = time.perf_counter() - start
        same = np.array_equal(local.predictions["pred"].to_numpy(), ray.predictions["pred"].to_numpy())
    table = pd.DataFrame([{"executor": "local", "seconds": local_s, "startup_seconds": 0.0},
                          {"executor": "ray (local instance)", "seconds": ray_s, "startup_seconds": startup_s}])
    table["over_local"] = table["seconds"] / local_s
    table["folds"] = args.subjects
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}; {args.subjects} folds x "
          f"{args.epochs} epochs of the full model on toy maps")
    print(table.round(2).to_string(index=False))
    print(f"predictions identical: {same}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
