"""Benchmark the magnifiers: images/s, batched over K factors vs one call per factor, plus FLOPs per stage.

The Lagrangian magnifier's optical flow runs in OpenCV, which FlopCounterMode cannot see: its FLOPs are its warps.

The per-factor baseline re-runs the whole pipeline for every factor, as the authors' demo does (their
network is re-encoded for each amplification). FLOPs (convolutions/matmuls, counted by
torch.utils.flop_counter; FFTs are not counted) let a GPU time be estimated from a device's throughput.
Writes results/bench/magnify.csv and prints speed-up ratios measured in the same run.

    python bench/magnify.py                       # CPU (and CUDA when present), 224 and 384 px, K = 9, B = 1
    python bench/magnify.py --batch 4 --repeats 5 --sizes 224 384 512
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from amanlib.magnify import LearningBasedMagnifier, default_checkpoint_path, load_magnifier
from amanlib.runtime import native_bf16

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("AMANLIB_REFERENCE", REPO.parent / "shared" / "reference"))
REFERENCE_CKPT = REFERENCE / "magnet" / "learning_based_mag.pth.tar"


def find_checkpoint(arg: str | None) -> Path | None:
    for path in (arg, default_checkpoint_path(), REFERENCE_CKPT):
        if path is not None and Path(path).is_file():
            return Path(path)
    return None


def pair(batch: int, size: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random onset and a slightly shifted frame, [B, 3, size, size] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, size // 8, size // 8, generator=g)
    onset = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 1)
    frames = torch.roll(onset, shifts=1, dims=-1)
    return onset.to(device), frames.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Fastest of `repeats` runs of each function, interleaved so that load from other processes on a shared
    machine hits every contender alike (the minimum is the least disturbed run)."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def variants(device: torch.device, checkpoint: Path | None, cpu_bf16: bool, compare_layout: bool):
    """(method, variant label, magnifier) for every configuration to time on this device."""
    if checkpoint is not None:
        net = LearningBasedMagnifier.from_checkpoint(checkpoint, device=device).net
        yield "learning", "channels_last", LearningBasedMagnifier(net, channels_last=True)
        if compare_layout:
            yield "learning", "contiguous", LearningBasedMagnifier(net, channels_last=False)
        if device.type == "cuda":
            half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            label = f"channels_last+{str(half).removeprefix('torch.')}"
            yield "learning", label, LearningBasedMagnifier(net, channels_last=True, autocast_dtype=half)
        elif cpu_bf16:
            bf16 = LearningBasedMagnifier(net, autocast_dtype=torch.bfloat16)
            yield "learning", "channels_last+bfloat16", bf16
    else:
        print("learning: no checkpoint found (pass --checkpoint); skipped", file=sys.stderr)
    yield "eulerian", "default", load_magnifier("eulerian")
    yield "phase", "default", load_magnifier("phase")
    yield "lagrangian", "default", load_magnifier("lagrangian")


def measure(magnifier, onset, frames, factors: list[float], repeats: int, baseline: bool) -> list[dict]:
    """Rows for the batched call and (when baseline) one call per factor, with FLOPs per stage and per image."""
    device, (B, k) = frames.device, (frames.shape[0], len(factors))
    magnifier(onset, frames, factors[:1])  # warm-up: kernels, caches, plenoptic pyramid masks
    contenders = {"batched": lambda: magnifier(onset, frames, factors)}
    if baseline:
        contenders["per_factor"] = lambda: [magnifier(onset, frames, [f]) for f in factors]
    seconds = best_times(contenders, device, repeats)
    one_factor = torch.tensor(factors[:1], device=device)
    with torch.inference_mode():
        state = magnifier.prepare(onset, frames)
        flops_pair = count_flops(lambda: magnifier.prepare(onset, frames)) / B
        flops_factor = count_flops(lambda: magnifier.render(state, one_factor)) / B
    rows = []
    for mode, s in seconds.items():
        pair_share = 1 / k if mode == "batched" else 1  # the encoder / pyramid runs once per call
        gflop_per_image = (flops_pair * pair_share + flops_factor) / 1e9
        rows.append(dict(
            mode=mode, seconds=s, images_per_s=B * k / s, gflop_per_pair_stage=flops_pair / 1e9,
            gflop_per_factor_stage=flops_factor / 1e9, gflop_per_image=gflop_per_image,
            gflop_per_s=gflop_per_image * B * k / s,
        ))
    return rows


def run(args) -> pd.DataFrame:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    factors = torch.linspace(2, 12, args.factors).tolist()
    checkpoint = find_checkpoint(args.checkpoint)
    machine = dict(threads=torch.get_num_threads(), machine=platform.processor() or platform.machine())
    cpu_bf16 = native_bf16("cpu") if args.cpu_bf16 == "auto" else args.cpu_bf16 == "on"
    rows, fp32_out = [], {}
    for device in devices:
        for method, variant, magnifier in variants(device, checkpoint, cpu_bf16, args.compare_layout):
            for size in args.sizes:
                onset, frames = pair(args.batch, size, device, args.seed)
                baseline = variant in ("channels_last", "default") or args.all_baselines
                found = measure(magnifier, onset, frames, factors, args.repeats, baseline)
                out = magnifier(onset, frames, factors)
                reference = fp32_out.setdefault((device.type, method, size), out)  # the first variant is fp32
                mse = float(((out - reference) ** 2).mean())
                psnr = 10 * math.log10(1 / mse) if mse > 0 else float("inf")
                setting = dict(device=device.type, method=method, variant=variant, size=size, batch=args.batch,
                               factors=len(factors), psnr_vs_fp32_db=psnr)
                rows += [{**setting, **row, **machine} for row in found]
                speed = {row["mode"]: row["images_per_s"] for row in found}
                line = f"{device.type:4s} {method:8s} {variant:22s} {size:4d}px  batched {speed['batched']:7.2f} img/s"
                if "per_factor" in speed:
                    ratio = speed["batched"] / speed["per_factor"]
                    line += f"  per-factor {speed['per_factor']:7.2f} img/s  ratio {ratio:5.2f}x"
                first = next(r for r in rows if (r["device"], r["method"], r["size"]) == (device.type, method, size))
                if first["variant"] != variant:
                    line += (f"  {speed['batched'] / first['images_per_s']:4.2f}x the fp32 variant, "
                             f"PSNR {psnr:.1f} dB against it")
                print(line, flush=True)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    parser.add_argument("--factors", type=int, default=9, help="K, factors spread evenly over [2, 12]")
    parser.add_argument("--batch", type=int, default=1, help="B, frame pairs per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the fastest is kept)")
    parser.add_argument("--checkpoint", help="learning_based_mag.pth.tar (default: the cache, then the reference)")
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--cpu-bf16", choices=("auto", "on", "off"), default="auto",
                        help="also time CPU bf16 (auto: where the CPU has AVX512-BF16 or AMX; emulated it is slow)")
    parser.add_argument("--compare-layout", action="store_true", help="also time learning without channels_last")
    parser.add_argument("--all-baselines", action="store_true", help="per-factor baseline for every variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "magnify.csv")
    args = parser.parse_args(argv)
    table = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
