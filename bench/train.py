"""Training speed: amanlib's engine vs a baseline written the way the authors' code runs.

Baseline (weimengting/AMAN main/train.py): a DataLoader over per-sample feature files read from disk every
epoch, batch 4, and a forward pass with a Python loop over frames and factors. Engine: one feature tensor,
index-slice batches, one layer4 call over all B*F*K maps (plus bf16 autocast and channels_last on CUDA).
Both train the same model on the same shapes; seconds per epoch are measured in this run and printed as
a ratio, with FLOPs per stage so a GPU time can be estimated. Writes results/bench/train.csv.
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
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from amanlib.model import AMAN
from amanlib.train import TrainConfig, _Fold, pool_features
from amanlib.runtime import resolve_device

COMPOSITE = dict(clips=442, folds=68, epochs=50, frames=11, factors=9)


class LoopAMAN(AMAN):
    """The authors' forward: layer4 called once per (frame, factor) in nested Python loops."""

    def forward(self, x, return_attention=False):
        v_frames, betas = [], []
        for j in range(x.shape[1]):
            fs = [self.avgpool(self.layer4(x[:, j, i])).flatten(1) for i in range(x.shape[2])]
            alphas = torch.stack([self.alpha(f) for f in fs], 2)
            v = (torch.stack(fs, 2) * alphas).sum(2) / alphas.sum(2)
            v_frames.append(v)
            betas.append(self.beta(v))
        b, vf = torch.stack(betas), torch.stack(v_frames)
        return self.pred_fc((vf * b).sum(0) / b.sum(0))


class FileDataset(Dataset):
    """One .npy file per clip, read at every access, as the authors' loader does."""

    def __init__(self, paths, labels):
        self.paths, self.labels = paths, labels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(np.load(self.paths[i])).float(), int(self.labels[i])


def baseline_epoch(model, loader, device) -> float:
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, eps=1e-8, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        loss = loss_fn(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def engine_epoch(fold: _Fold, rows: np.ndarray, device) -> float:
    start = time.perf_counter()
    fold.train_epoch(rows)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def train_flops(model: AMAN, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one forward + backward step (counted by torch's FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--factors", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per method (the first is a warm-up)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="results/bench/train.csv")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak (bf16 on GPUs) in TFLOP/s, to print the share reached")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    N, F, K = args.clips, args.frames, args.factors
    features = torch.randn(N, F, K, 256, 14, 14).half()
    labels = torch.randint(0, 3, (N,))
    rows = np.arange(N)
    cfg = TrainConfig(device=str(device), batch_size=4)

    # FLOPs per stage for one clip; a GPU time is FLOPs / (peak * utilisation)
    model = AMAN(3)
    step = train_flops(model, features[:1].float(), labels[:1])
    with FlopCounterMode(display=False) as fc:
        model.pool(features[:1].float())
    pool = fc.get_total_flops()

    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(N):
            paths.append(Path(tmp) / f"clip{i:04d}.npy")
            np.save(paths[-1], features[i].numpy())
        loader = DataLoader(FileDataset(paths, labels.numpy()), batch_size=4, shuffle=True)
        torch.manual_seed(0)
        loop_model = LoopAMAN(3).to(device)
        base = [baseline_epoch(loop_model, loader, device) for _ in range(args.epochs)]
    fold = _Fold(cfg, features.to(device) if device.type == "cuda" else features, labels, 3, device, seed=0)
    fold.model.channels_last = device.type != "cpu"
    eng = [engine_epoch(fold, rows, device) for _ in range(args.epochs)]
    start = time.perf_counter()
    pooled = pool_features(features, None, device, progress=False)
    pool_s = time.perf_counter() - start
    frozen_fold = _Fold(cfg, pooled, labels, 3, device, seed=0)
    frozen = [engine_epoch(frozen_fold, rows, device) for _ in range(args.epochs)]

    timed = lambda ts: min(ts[1:]) if len(ts) > 1 else ts[0]
    maps = N * F * K
    composite_maps_per_epoch = COMPOSITE["clips"] * COMPOSITE["frames"] * COMPOSITE["factors"]
    scale = COMPOSITE["folds"] * COMPOSITE["epochs"] * composite_maps_per_epoch / maps
    for method, seconds in [("baseline (authors' style)", timed(base)), ("engine", timed(eng)),
                            ("engine, frozen layer4", timed(frozen))]:
        rows_out.append({"method": method, "device": str(device), "clips": N, "frames": F, "factors": K,
                         "s_per_epoch": seconds, "est_composite_loso_h": seconds * scale / 3600})
    table = pd.DataFrame(rows_out)
    table["speedup_vs_baseline"] = table.s_per_epoch.iloc[0] / table.s_per_epoch
    table["achieved_gflop_s"] = [step * N / t / 1e9 for t in table.s_per_epoch[:2]] + [float("nan")]
    if args.peak_tflops:
        table["share_of_peak"] = table.achieved_gflop_s / (args.peak_tflops * 1e3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}")
    print(table.round(3).to_string(index=False))
    print(f"frozen-layer4 pooling (once per run): {pool_s:.2f} s for {N} clips")
    print(f"FLOPs per (frame, factor) map: layer4 forward {pool / (F * K) / 1e9:.3f} GFLOP; "
          f"per clip train step (fwd+bwd) {step / 1e9:.2f} GFLOP")
    total = step / (F * K) * composite_maps_per_epoch * COMPOSITE["epochs"] * COMPOSITE["folds"] * 67 / 68
    print(f"composite LOSO (68 folds x 50 epochs, F=11, K=9): {total / 1e15:.2f} PFLOP of training; "
          f"at 100 TFLOP/s sustained bf16 that is {total / 100e12 / 60:.1f} min")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
