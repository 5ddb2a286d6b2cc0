"""fp32 against bf16 autocast, images per second, on the native ISA and on a simulated AVX2 one.

Three workloads, each timed in fp32 and in bf16 autocast ('bf16_emulated': bf16 even where the CPU emulates
it, to measure what that costs):
  magnify   the authors' learning-based magnifier on one synthetic clip (an onset and --mag-frames frames,
            128x128, the kit's synthetic size) at the default factors (amanlib.features.DEFAULT_FACTORS),
            as magnify_clip calls it; images = frames x factors
  trunk     amanlib.backbone.ResNet18Trunk (random weights) through amanlib.features.extract_features:
            --trunk-batch 128x128 images resized to 224, channels_last, inference_mode
  pretrain  one step of amanlib/pretrain.py's loop: torchvision resnet18 (4 classes), --train-batch random
            crops of 160 px from 224 px images, flip and affine, channels_last, AdamW, backward and step
Each is warmed up (--warmup calls), then fp32 and bf16 calls alternate --repeats times (--train-repeats for
pretrain), so load from other processes hits both alike; the median call is kept and bf16 is printed as a
ratio of fp32 measured in the same process.

The ISA is whatever this process runs under (torch.backends.cpu.get_cpu_capability(), ONEDNN_MAX_CPU_ISA).
`--isa both` (the default) measures here, then runs this script again in a subprocess with
ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, which simulates a CPU with AVX2 but no AVX-512 (so no native
bf16), and collects its rows. Emulated bf16 is slow (a pre-training step can take 10-60 s). Writes
results/bench/precision.csv (one row per workload, ISA and precision, with the CPU model and whether bf16 was
native) and prints a markdown table for README (`--table` prints it again from the CSV, measuring nothing).

    python bench/precision.py                              # both ISAs, all workloads: about 5-15 min
    python bench/precision.py --isa native --quick         # a check that it runs: under a minute
    python bench/precision.py --workloads trunk --repeats 9
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torchvision import models
from torchvision.transforms import v2

from amanlib.backbone import ResNet18Trunk, preprocess
from amanlib.features import DEFAULT_FACTORS, extract_features
from amanlib.magnify import LearningBasedMagnifier, default_checkpoint_path
from amanlib.runtime import atomic_write, autocast, cpu_model, native_bf16, onednn_isa, resolve_precision

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("AMANLIB_REFERENCE", REPO.parent / "shared" / "reference"))
REFERENCE_CKPT = REFERENCE / "magnet" / "learning_based_mag.pth.tar"
OUT = REPO / "results" / "bench" / "precision.csv"
WORKLOADS = ("magnify", "trunk", "pretrain")
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
PRECISIONS = {"fp32": "fp32", "bf16": "bf16_emulated"}  # label -> amanlib precision: bf16 wherever, knowingly
SIZE = 128  # the kit's synthetic images
MACRO_CLASSES = 4
DEFAULTS = {"repeats": (5, 1), "train_repeats": (3, 1), "warmup": (1, 1), "mag_frames": (2, 1),
            "trunk_batch": (64, 8), "train_batch": (32, 8), "crop": (160, 96)}  # option: (default, with --quick)


def find_checkpoint(arg: str | None) -> Path | None:
    """The magnifier's checkpoint: --checkpoint, else $AMANLIB_MAGNET_CHECKPOINT / the cache, else the reference."""
    for path in (arg, default_checkpoint_path(), REFERENCE_CKPT):
        if path is not None and Path(path).is_file():
            return Path(path)
    return None


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """n smooth random images [n, 3, size, size] in [0, 1] (face-like spatial statistics, not noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(1, size // 8), max(1, size // 8), generator=g)
    return F.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 1)


def magnify_workload(args, checkpoint: Path):
    """(images per call, {precision: call}): one clip through the learning-based magnifier, as magnify_clip."""
    net = LearningBasedMagnifier.from_checkpoint(checkpoint, device="cpu").net
    clip = smooth_images(1, SIZE, args.seed).expand(args.mag_frames + 1, -1, -1, -1).clone()
    clip[1:] = torch.roll(clip[1:], shifts=1, dims=-1)  # a small motion against the onset
    onset, frames = clip[:1], clip[1:]
    factors = [float(f) for f in DEFAULT_FACTORS]
    calls = {}
    for label, precision in PRECISIONS.items():
        mag = LearningBasedMagnifier(net, autocast_dtype=resolve_precision(precision, "cpu"))
        calls[label] = lambda mag=mag: mag(onset, frames, factors)
    return args.mag_frames * len(factors), calls


def trunk_workload(args):
    """(images per call, {precision: call}): one batch of 128 px images through extract_features (to 224)."""
    torch.manual_seed(args.seed)
    trunk = ResNet18Trunk().eval()
    images = smooth_images(args.trunk_batch, SIZE, args.seed)
    calls = {label: lambda dtype=resolve_precision(precision, "cpu"): extract_features(
        images, trunk, batch_size=args.trunk_batch, device="cpu", dtype=torch.float16, progress=False,
        autocast_dtype=dtype) for label, precision in PRECISIONS.items()}
    return args.trunk_batch, calls


def pretrain_workload(args):
    """(images per call, {precision: call}): one optimiser step of amanlib/pretrain.py's loop, a net per
    precision (each step changes its weights, which does not change its speed)."""
    images = preprocess(smooth_images(args.train_batch, 224, args.seed))  # as _train: preprocessed 224 px
    labels = torch.arange(args.train_batch) % MACRO_CLASSES
    augment = v2.Compose([v2.RandomCrop(args.crop), v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=5)])
    device = torch.device("cpu")
    calls = {}
    for label, precision in PRECISIONS.items():
        torch.manual_seed(args.seed)
        net = models.resnet18(num_classes=MACRO_CLASSES).to(device, memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
        dtype = resolve_precision(precision, device)

        def step(net=net, opt=opt, dtype=dtype):
            x = augment(images).to(device, memory_format=torch.channels_last)
            with autocast(device, dtype):
                loss = F.cross_entropy(net(x).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        calls[label] = step
    return args.train_batch, calls


def median_seconds(calls: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each call over `repeats` runs after `warmup` runs, the calls interleaved."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def isa_label(capability: str, cap: str | None) -> str:
    return f"{capability} (oneDNN {cap})" if cap else capability


def measure(args) -> list[dict]:
    """Rows for every workload in this process's ISA."""
    capability, cap = torch.backends.cpu.get_cpu_capability(), onednn_isa()
    machine = dict(isa=isa_label(capability, cap), cpu_capability=capability, onednn_max_cpu_isa=cap,
                   simulated=False, native_bf16=native_bf16("cpu"), cpu=cpu_model(), threads=torch.get_num_threads(),
                   date=datetime.date.today().isoformat(), load_before=round(os.getloadavg()[0], 2))
    print(f"# ISA {machine['isa']}, native bf16 {machine['native_bf16']}, {machine['cpu']}, "
          f"{machine['threads']} threads, load average {machine['load_before']}", flush=True)
    rows = []
    for workload in args.workloads:
        if workload == "magnify":
            checkpoint = find_checkpoint(args.checkpoint)
            if checkpoint is None:
                print("magnify: no checkpoint found (pass --checkpoint or set AMANLIB_MAGNET_CHECKPOINT); skipped",
                      file=sys.stderr)
                continue
            images, calls = magnify_workload(args, checkpoint)
            repeats = args.repeats
            setting = f"1 clip: {args.mag_frames} frames x {len(DEFAULT_FACTORS)} factors, {SIZE} px"
        elif workload == "trunk":
            images, calls = trunk_workload(args)
            repeats, setting = args.repeats, f"batch {args.trunk_batch}, {SIZE} px resized to 224"
        else:
            images, calls = pretrain_workload(args)
            repeats, setting = args.train_repeats, f"one step, batch {args.train_batch}, crops of {args.crop} px"
        with torch.inference_mode(workload != "pretrain"):
            seconds = median_seconds(calls, args.warmup, repeats)
        fp32 = images / seconds["fp32"]
        for precision, s in seconds.items():
            rows.append(dict(workload=workload, setting=setting, precision=precision, images_per_s=images / s,
                             ratio_to_fp32=images / s / fp32, images_per_call=images, seconds_per_call=s,
                             repeats=repeats, **machine))
        bf16 = rows[-1]
        print(f"{workload:8s} {machine['isa']:>22s}  fp32 {fp32:8.2f} img/s  bf16 {bf16['images_per_s']:8.2f} img/s"
              f"  bf16/fp32 {bf16['ratio_to_fp32']:5.2f}x  ({images} images per call, median of {repeats})",
              flush=True)
    return rows


def child_argv(args, rows_out: Path) -> list[str]:
    """This script's options for a subprocess measuring under another ISA, its rows into rows_out."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--isa", "native", "--rows-out", str(rows_out),
            "--workloads", *args.workloads, "--repeats", str(args.repeats), "--train-repeats", str(args.train_repeats),
            "--warmup", str(args.warmup), "--mag-frames", str(args.mag_frames), "--trunk-batch", str(args.trunk_batch),
            "--train-batch", str(args.train_batch), "--crop", str(args.crop), "--seed", str(args.seed)]
    return argv + (["--checkpoint", args.checkpoint] if args.checkpoint else [])


def measure_avx2(args) -> list[dict]:
    """Rows measured by this script run again under the simulated AVX2 ISA."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_out = Path(tmp) / "rows.json"
        subprocess.run(child_argv(args, rows_out), env={**os.environ, **AVX2_ENV}, cwd=REPO, check=True)
        rows = json.loads(rows_out.read_text())
    for row in rows:
        if not row["cpu_capability"].upper().startswith("AVX2"):
            print(f"warning: under {AVX2_ENV} torch reported {row['cpu_capability']}, not AVX2", file=sys.stderr)
            break
    for row in rows:
        row["simulated"] = True
    return rows


def markdown(table: pd.DataFrame) -> str:
    """README's table: a row per workload, fp32 and bf16 images/s (with bf16/fp32) for each ISA."""
    isas = list(dict.fromkeys(table.isa))
    names = {isa: sel.cpu_capability.iloc[0] + (", simulated" if sel.simulated.iloc[0] else "")
             for isa, sel in table.groupby("isa", sort=False)}
    head = "| workload |" + "".join(f" {names[isa]} fp32 | {names[isa]} bf16 (x fp32) |" for isa in isas)
    lines = [head, "|---|" + "---|---|" * len(isas)]
    for workload in dict.fromkeys(table.workload):
        cells = []
        for isa in isas:
            sel = table[(table.workload == workload) & (table.isa == isa)].set_index("precision")
            if {"fp32", "bf16"} <= set(sel.index):
                fp32, bf16 = sel.loc["fp32"], sel.loc["bf16"]
                cells += [f"{fp32.images_per_s:.3g} img/s",
                          f"{bf16.images_per_s:.3g} img/s ({bf16.ratio_to_fp32:.2f}x)"]
            else:
                cells += ["", ""]
        setting = table[table.workload == workload].setting.iloc[0]
        lines.append(f"| {workload} ({setting}) | " + " | ".join(cells) + " |")
    first = table.iloc[0]
    natives = ", ".join(f"{names[isa]}: {'native' if n else 'emulated'}"
                        for isa, n in dict(zip(table.isa, table.native_bf16)).items())
    lines.append("")
    simulated = " (simulated: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2)" if table.simulated.any() else ""
    repeats = ", ".join(f"{w} {r}" for w, r in table.groupby("workload", sort=False).repeats.max().items())
    lines.append(f"{first.cpu}, {first.threads} threads, {first.date}; bf16 {natives}{simulated}; median of the "
                 f"timed calls after a warm-up ({repeats}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", choices=("both", "native", "avx2"), default="both",
                        help="native: this process's ISA; avx2: a subprocess under ONEDNN_MAX_CPU_ISA=AVX2 "
                             "ATEN_CPU_CAPABILITY=avx2; both (default): one after the other")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, help="timed calls of magnify and trunk (median kept; default 5)")
    parser.add_argument("--train-repeats", type=int, help="timed pre-training steps (median kept; default 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls of each before timing (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="a check that it runs: defaults of 1 repeat, 1 frame, batches of 8, crops of 96 (options "
                             "given still apply); writes a CSV only where --out is given")
    parser.add_argument("--mag-frames", type=int, help="frames of the clip (default 2, the kit's n_frames)")
    parser.add_argument("--trunk-batch", type=int, help="default 64")
    parser.add_argument("--train-batch", type=int, help="default 32")
    parser.add_argument("--crop", type=int, help="pre-training crop (default 160)")
    parser.add_argument("--checkpoint", help="learning_based_mag.pth.tar (default: $AMANLIB_MAGNET_CHECKPOINT or "
                                             "the cache, then the reference copy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help=f"the CSV (default {OUT.relative_to(REPO)})")
    parser.add_argument("--table", action="store_true", help="print README's table from --out; measure nothing")
    parser.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)  # a child's rows, as JSON
    args = parser.parse_args(argv)
    if args.table:
        table = pd.read_csv(args.out or OUT)
        print(markdown(table), end="")
        return table
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    rows = measure(args) if args.isa in ("both", "native") else []
    if args.rows_out is not None:
        args.rows_out.write_text(json.dumps(rows))
        return pd.DataFrame(rows)
    if args.isa in ("both", "avx2"):
        rows += measure_avx2(args)
    table = pd.DataFrame(rows)
    out = args.out or (None if args.quick else OUT)
    if out is not None:
        atomic_write(out, lambda tmp: table.to_csv(tmp, index=False))
        print(f"wrote {out}")
    print()
    print(markdown(table), end="")
    return table


if __name__ == "__main__":
    main()
