"""CUDA against CPU, bf16 against fp32, and measured speed: the checks of bench/gpu.sh (issue 23), as one JSON file.

1. agreement: a tiny LOSO problem (the full model: layer4 trained per fold) trained by amanlib.train.run_loso with
   the same seed in fp32 on the GPU (TF32 off, cuDNN deterministic) and on the CPU: are the predictions identical,
   and how far apart are alpha, beta and the per-epoch training loss; one fold trained the same way gives the
   largest logit and parameter difference. The sweep's engine on the GPU (every fold's model side by side,
   amanlib.sweep) against run_loso's there, the same way. Then bf16 autocast on the GPU against fp32 on the GPU:
   UF1 of each and their difference with a paired bootstrap CI over subjects.
2. speed (bf16 autocast, channels_last, as the kit runs on a GPU; the side-by-side parts first): images/s of the
   learning-based magnifier (as amanlib calls it per clip: one onset, F frames, K factors), of the ResNet-18 trunk
   at 224 px, and of the full model's training step, one fold's model alone (amanlib.train._Fold.train_epoch,
   run_loso's step) and M folds' models side by side (amanlib.sweep._FullProgram, the sweep's step, M = 1 to 320),
   each with the FLOPs bench/flops.py counts, the TFLOP/s reached and its share of the H200's dense bf16 peak; and
   layer4's 3x3 convolution for 160 models side by side as the kit runs it (one grouped conv2d, cudnn.benchmark off
   and on) against unfold + one batched matmul.
3. projections from those measurements: notebook 04's full-model sweep on the synthetic default (the issue's
   `results/gpu` run) with one fold after another and with the folds side by side, and the MEGC2019 composite's
   full-model LOSO (AMAN variant, one seed) on one GPU, beside bench/flops.py's paper estimate.

    python bench/gpu_checks.py --device cuda --out $OUT/gpu_checks.json
    python bench/gpu_checks.py --device cpu --tiny --out /tmp/gpu_checks.json   # the CPU dry run (tests)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import flops  # noqa: E402  (bench/flops.py: FLOP counts on meta tensors)
from amanlib import sweep  # noqa: E402
from amanlib.metrics import uf1  # noqa: E402
from amanlib.sweep import run_sweep  # noqa: E402
from amanlib.train import TrainConfig, Variant, _Fold, loso_folds, make_loss, make_optimizer, run_loso  # noqa: E402

H200_BF16_DENSE_TFLOPS = 790.0  # measured on the device (KINDS.md: 8192^3 bf16 matmul, 769-798 TFLOP/s)
SYNTHETIC_DEFAULT = dict(subjects=32, clips_per_subject=9, frames=2, magnified=5, epochs=50, batch=4, seeds=5)


# ---------------------------------------------------------------------------------------------------- problem
def toy_problem(n_subjects: int, per_subject: int, F: int, K: int, C: int, size: int, seed: int = 0):
    """A clip table and trunk-feature maps [N, F, K, C, size, size] (fp16, as the feature cache) whose label is
    added to the first two channels: a full-model problem layer4 can learn (as tests/test_train.py's toy_maps)."""
    rng = np.random.default_rng(seed)
    index = pd.DataFrame([{"dataset": "casme2", "subject": f"sub{s:02d}", "clip": f"EP{s:02d}_{c:02d}",
                           "label": int(rng.integers(3))} for s in range(n_subjects) for c in range(per_subject)])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(index), F, K, C, size, size, generator=g)
    x[..., :2, :, :] += torch.tensor(index["label"].to_list(), dtype=torch.float32)[:, None, None, None, None, None]
    return index, x.half()


def strict_fp32(on: bool) -> dict:
    """TF32 off and cuDNN deterministic (on=True), or back to what it was; returns the previous settings."""
    before = dict(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn_tf32=torch.backends.cudnn.allow_tf32,
                  deterministic=torch.backends.cudnn.deterministic, benchmark=torch.backends.cudnn.benchmark)
    if on:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return before


def restore(settings: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = settings["matmul"]
    torch.backends.cudnn.allow_tf32 = settings["cudnn_tf32"]
    torch.backends.cudnn.deterministic = settings["deterministic"]
    torch.backends.cudnn.benchmark = settings["benchmark"]


def fast_uf1(gt: np.ndarray, pred: np.ndarray, classes: int) -> float:
    """amanlib.metrics.uf1 (macro F1 over the classes in gt or pred, 0 where undefined) in NumPy, for bootstraps."""
    tp = np.bincount(gt[gt == pred], minlength=classes)
    n_gt, n_pred = np.bincount(gt, minlength=classes), np.bincount(pred, minlength=classes)
    present = (n_gt + n_pred) > 0
    f1 = np.divide(2 * tp, n_gt + n_pred, out=np.zeros(classes), where=present)
    return float(f1[present].mean())


def paired_uf1_ci(pred_a: pd.DataFrame, pred_b: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict:
    """UF1(a) - UF1(b) on the same clips, with a 95% bootstrap CI over subjects (resampled with replacement)."""
    key = ["dataset", "subject", "clip"]
    both = pred_a[key + ["gt", "pred"]].merge(pred_b[key + ["pred"]], on=key, suffixes=("_a", "_b"))
    subjects = both["dataset"] + "/" + both["subject"]
    groups = [np.flatnonzero(subjects.to_numpy() == s) for s in subjects.unique()]
    gt, a, b = (both[c].to_numpy(int) for c in ("gt", "pred_a", "pred_b"))
    classes = int(max(gt.max(), a.max(), b.max())) + 1
    assert abs(fast_uf1(gt, a, classes) - uf1(gt, a)) < 1e-9  # the same UF1 as the kit's
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        rows = np.concatenate([groups[i] for i in rng.integers(len(groups), size=len(groups))])
        diffs.append(fast_uf1(gt[rows], a[rows], classes) - fast_uf1(gt[rows], b[rows], classes))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"uf1_a": uf1(gt, a), "uf1_b": uf1(gt, b), "difference": uf1(gt, a) - uf1(gt, b),
            "ci95": [float(lo), float(hi)], "clips": len(both), "subjects": len(groups),
            "same_predictions": float((a == b).mean())}


def compare_runs(a, b) -> dict:
    """How far two LOSO results of the same problem and seed are apart."""
    pa, pb = a.predictions.reset_index(drop=True), b.predictions.reset_index(drop=True)
    alpha = np.abs(np.stack(pa.alpha) - np.stack(pb.alpha))
    beta = np.abs(np.stack(pa.beta) - np.stack(pb.beta))
    loss = np.abs(a.history.train_loss.to_numpy() - b.history.train_loss.to_numpy())
    first = int(np.flatnonzero(loss > 0)[0]) if (loss > 0).any() else None
    return {"predictions_identical": bool((pa.pred.to_numpy() == pb.pred.to_numpy()).all()),
            "same_prediction_share": float((pa.pred.to_numpy() == pb.pred.to_numpy()).mean()),
            "max_alpha_diff": float(alpha.max()), "max_beta_diff": float(beta.max()),
            "max_train_loss_diff": float(loss.max()), "first_epoch_row_with_a_loss_diff": first,
            "uf1": [uf1(pa["gt"], pa["pred"]), uf1(pb["gt"], pb["pred"])]}


def one_fold(cfg: TrainConfig, x, index, device: str, epochs: int) -> tuple[torch.Tensor, dict]:
    """Fold 0 trained `epochs` epochs on `device`: its test logits (eval mode, fp32) and parameters, on the CPU."""
    labels = torch.tensor(index["label"].to_numpy())
    _, test, train = loso_folds(index)[0]
    fold = _Fold(dataclasses.replace(cfg, device=device), x, labels, 3, torch.device(device), seed=cfg.seed,
                 fit_rows=train)
    for _ in range(epochs):
        fold.train_epoch(train)
    fold.model.eval()
    with torch.inference_mode():
        logits = fold.logits(fold.batch(torch.from_numpy(test)))[0].float().cpu()
    return logits, {k: v.detach().float().cpu() for k, v in fold.model.state_dict().items() if v.is_floating_point()}


def agreement(device: str, tiny: bool, work: Path) -> dict:
    shape = dict(n_subjects=2, per_subject=2, F=1, K=1, C=8, size=4) if tiny else \
        dict(n_subjects=6, per_subject=8, F=2, K=3, C=256, size=14)
    epochs = 1 if tiny else 4
    index, x = toy_problem(**shape)
    cfg = TrainConfig(epochs=epochs, step_size=max(1, epochs // 2), batch_size=4, device="cpu", precision="fp32",
                      seed=0)
    before = strict_fp32(True)
    t0 = time.perf_counter()
    try:
        cpu = run_loso(x, index, cfg=cfg, runs_dir=work / "cpu_fp32", progress=False)
        t_cpu = time.perf_counter() - t0
        gpu = run_loso(x, index, cfg=dataclasses.replace(cfg, device=device), runs_dir=work / "gpu_fp32",
                       progress=False)
        t_gpu = time.perf_counter() - t0 - t_cpu
        side = run_sweep(x, index, cfg=dataclasses.replace(cfg, device=device), runs_dir=work / "gpu_side_by_side",
                         variants=[Variant("AMAN", tuple(range(x.shape[2])))], progress=False).runs["AMAN", cfg.seed]
        logits_cpu, params_cpu = one_fold(cfg, x, index, "cpu", epochs)
        logits_gpu, params_gpu = one_fold(cfg, x, index, device, epochs)
    finally:
        restore(before)
    bf16_cfg = dataclasses.replace(cfg, device=device, precision="bf16_emulated")  # even where emulated (CPU dry run)
    bf16 = run_loso(x, index, cfg=bf16_cfg, runs_dir=work / "gpu_bf16", progress=False)
    fp32_vs_cpu = compare_runs(gpu, cpu)
    fp32_vs_cpu.update(max_logit_diff=float((logits_gpu - logits_cpu).abs().max()),
                       max_logit=float(logits_cpu.abs().max()),
                       max_param_diff=max(float((params_gpu[k] - params_cpu[k]).abs().max()) for k in params_cpu),
                       seconds={"cpu": t_cpu, device: t_gpu})
    bf16_vs_fp32 = paired_uf1_ci(bf16.predictions, gpu.predictions)
    bf16_vs_fp32["within_ci"] = bool(bf16_vs_fp32["ci95"][0] <= 0 <= bf16_vs_fp32["ci95"][1])
    bf16_vs_fp32.update({k: v for k, v in compare_runs(bf16, gpu).items() if k.startswith("max_")})
    return {"problem": {**shape, "clips": len(index), "epochs": epochs, "batch": cfg.batch_size, "seed": cfg.seed,
                        "model": "AMAN, full model (layer4 trained per fold)"},
            "fp32_settings": "TF32 off (matmul and cuDNN), cudnn.deterministic, cudnn.benchmark off",
            f"{device}_fp32_vs_cpu_fp32": fp32_vs_cpu, f"{device}_bf16_vs_{device}_fp32": bf16_vs_fp32,
            f"{device}_fp32_side_by_side_vs_alone": compare_runs(side, gpu)}


# ---------------------------------------------------------------------------------------------------- speed
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Fastest of `repeats` timed calls of fn after `warmup` untimed ones (seconds)."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def rate(images: int, seconds: float, flop: float, peak: float) -> dict:
    tflops = flop / seconds / 1e12
    return {"images_per_s": images / seconds, "seconds": seconds, "gflop": flop / 1e9, "tflop_per_s": tflops,
            "share_of_peak": tflops / peak}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def magnifier_speed(device: torch.device, sizes, F: int, K: int, repeats: int, peak: float) -> list[dict]:
    """The authors' MagNet (random weights: the speed is the same) as the kit calls it per clip."""
    from amanlib.magnify import LearningBasedMagnifier
    from amanlib.magnify.learning import MagNet
    dtype = autocast_dtype(device)
    magnifier = LearningBasedMagnifier(MagNet().to(device), channels_last=True, autocast_dtype=dtype)
    factors = torch.linspace(2, 12, K).tolist()
    rows = []
    for size in sizes:
        onset, frames = torch.rand(1, 3, size, size, device=device), torch.rand(F, 3, size, size, device=device)
        seconds = timed(lambda: magnifier(onset, frames, factors), device, repeats)
        stages = flops.magnifier_stages(size)
        flop = stages["onset"] + F * stages["frame"] + F * K * stages["factor"]
        rows.append({"stage": "magnifier (learning)", "size": size, "frames": F, "factors": K,
                     "dtype": str(dtype or torch.float32), **rate(F * K, seconds, flop, peak)})
    return rows


def trunk_speed(device: torch.device, batches, size: int, repeats: int, peak: float) -> list[dict]:
    from amanlib.backbone import ResNet18Trunk
    dtype = autocast_dtype(device)
    trunk = ResNet18Trunk().to(device).eval().to(memory_format=torch.channels_last)
    per_image = flops.count(lambda: flops.meta_model(ResNet18Trunk())(torch.zeros(1, 3, size, size,
                                                                                   device=flops.META)))
    rows = []
    for batch in batches:
        x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype or torch.float32, enabled=dtype is not None):
                trunk(x)
        seconds = timed(run, device, repeats)
        rows.append({"stage": "trunk conv1..layer3", "size": size, "batch": batch, "dtype": str(dtype or torch.float32),
                     **rate(batch, seconds, batch * per_image, peak)})
    return rows


def train_step_speed(device: torch.device, shapes, clips: int, repeats: int, peak: float, layer4_train: float):
    """The engine's full-model training step (amanlib.train._Fold.train_epoch, precision auto) on features
    [clips, F, K, 256, 14, 14]: images = (frame, factor) slices through layer4, forward + backward."""
    labels = torch.randint(0, 3, (clips,), generator=torch.Generator().manual_seed(0))
    rows = []
    for F, K, batch in shapes:
        x = torch.randn(clips, F, K, 256, 14, 14, generator=torch.Generator().manual_seed(0)).half()
        x = x.to(device) if device.type == "cuda" else x
        fold = _Fold(TrainConfig(device=str(device), batch_size=batch), x, labels, 3, device, seed=0)
        order = np.arange(clips)
        seconds = timed(lambda: fold.train_epoch(order), device, repeats)
        steps = math.ceil(clips / batch)
        slices = clips * F * K
        rows.append({"stage": "full-model training step", "frames": F, "factors": K, "batch": batch,
                     "dtype": str(fold.dtype or torch.float32), "step_ms": 1e3 * seconds / steps,
                     **rate(slices, seconds, slices * layer4_train, peak)})
        del fold, x
    return rows


def side_by_side_step_speed(device: torch.device, shapes, models: list[int], repeats: int, peak: float,
                            layer4_train: float) -> list[dict]:
    """The sweep's full-model training step (amanlib.sweep._FullProgram, precision auto): M folds' models side by side
    in one layer4 of grouped convolutions, one step of `batch` clips each; images = slices through layer4 (all
    models), and the GPU memory it peaked at."""
    rows = []
    for F, K, batch in shapes:
        for M in models:
            index, _ = toy_problem(n_subjects=M + 1, per_subject=batch + 1, F=1, K=1, C=1, size=1)  # the clip table
            x = torch.randn(len(index), F, K, 256, 14, 14, device=device, dtype=torch.half)  # speed only: any values
            labels = torch.tensor(index["label"].to_numpy(), device=device)
            cfg = TrainConfig(device=str(device), batch_size=batch)
            built = time.perf_counter()
            group = sweep._full_groups(index, loso_folds(index), [cfg], M, 2 ** 30, F, K)[0]
            program = sweep._full_program(group, x, 3, device, sweep.ACCELERATOR_FULL_MAPS)
            built = time.perf_counter() - built
            optimizer, _ = make_optimizer(program.heads.leaves(), cfg)
            clips = torch.tensor(np.stack([d["fit"][:batch] for d in group]), device=device)  # M, batch
            program.train(True)

            def step():
                logits = program(clips)[0].float()
                make_loss("none")(logits.transpose(1, 2), labels[clips]).mean(1).sum().backward()
                program.heads.step(optimizer, 0)

            # cuDNN's heuristics may pick a slow algorithm for convolutions of this many groups: on CUDA the largest
            # program is timed again with cudnn.benchmark (which times the algorithms once per shape)
            tries = [False, True] if device.type == "cuda" and M == max(models) else [False]
            for benchmark in tries:
                before, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, benchmark
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    seconds = timed(step, device, repeats, warmup=2 if benchmark else 1)
                finally:
                    torch.backends.cudnn.benchmark = before
                slices = M * batch * F * K
                rows.append({"stage": "full-model training step, models side by side", "models": M, "frames": F,
                             "factors": K, "batch": batch, "dtype": str(program.dtype or torch.float32),
                             "cudnn_benchmark": benchmark, "step_ms": 1e3 * seconds,
                             "step_ms_per_model": 1e3 * seconds / M, "build_s": built,
                             "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
                             else None, **rate(slices, seconds, slices * layer4_train, peak)})
            del program, optimizer, x
    return rows


def grouped_conv_speed(device: torch.device, models: int, maps: int, repeats: int, peak: float) -> list[dict]:
    """layer4's 3x3 convolution of 512 channels on 7x7 maps, for M models side by side on `maps` maps each, forward
    and backward (input and weight gradients), in bf16 autocast on CUDA (autocast_dtype): as one grouped conv2d (the
    kit's side_by_side; cudnn.benchmark off and, on CUDA, on) and as im2col (unfold) + one batched matmul."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(maps, models * 512, 7, 7, device=device, generator=g, requires_grad=True)
    w = torch.randn(models * 512, 512, 3, 3, device=device, generator=g, requires_grad=True)
    dtype = autocast_dtype(device)
    flop = 3 * 2 * maps * 49 * models * 512 * 512 * 9  # forward, and the two gradients

    def grouped():
        with torch.autocast(device.type, dtype or torch.float32, enabled=dtype is not None):
            torch.nn.functional.conv2d(x, w, padding=1, groups=models).float().sum().backward()

    def unfolded():
        with torch.autocast(device.type, dtype or torch.float32, enabled=dtype is not None):
            cols = torch.nn.functional.unfold(x.view(maps * models, 512, 7, 7), 3, padding=1)  # n*M, 512*9, 49
            cols = cols.view(maps, models, 512 * 9, 49).permute(1, 0, 3, 2).reshape(models, maps * 49, 512 * 9)
            torch.bmm(cols, w.view(models, 512, 512 * 9).transpose(1, 2)).float().sum().backward()

    rows = []
    tries = [("grouped conv2d", grouped, False), ("unfold + bmm", unfolded, False)]
    if device.type == "cuda":
        tries.insert(1, ("grouped conv2d", grouped, True))
    for how, fn, benchmark in tries:
        before, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, benchmark
        try:
            seconds = timed(fn, device, repeats, warmup=2)
        finally:
            torch.backends.cudnn.benchmark = before
        rows.append({"stage": f"layer4 3x3 conv, {how}", "models": models, "maps": maps, "cudnn_benchmark": benchmark,
                     "dtype": str(dtype or torch.float32), **rate(models * maps, seconds, flop, peak)})
    return rows


def speed(device: torch.device, tiny: bool, peak: float) -> dict:
    model = flops.model_stages()
    if tiny:
        mag = magnifier_speed(device, [16], F=1, K=2, repeats=1, peak=peak)
        trunk = trunk_speed(device, [1], size=32, repeats=1, peak=peak)
        steps = train_step_speed(device, [(1, 1, 2)], clips=2, repeats=1, peak=peak, layer4_train=model["layer4_train"])
    else:
        mag = magnifier_speed(device, [128, 224, 384], F=11, K=9, repeats=5, peak=peak)
        trunk = trunk_speed(device, [64, 256], size=224, repeats=5, peak=peak)
        d = SYNTHETIC_DEFAULT
        shapes = [(d["frames"], d["magnified"], d["batch"]), (d["frames"], 1, d["batch"]),  # synthetic: AMAN, 1 slot
                  (11, 9, 4), (11, 9, 32), (d["frames"], d["magnified"], 64)]  # composite; larger batches
        steps = train_step_speed(device, shapes, clips=64, repeats=3, peak=peak, layer4_train=model["layer4_train"])
    return {"magnifier": mag, "trunk": trunk, "train_step": steps,
            "flops_note": "FLOPs as bench/flops.py counts them (convolutions and matmuls, multiply-add = 2); "
                          "training: layer4 forward + backward per slice "
                          f"({model['layer4_train'] / 1e9:.3f} GFLOP), heads and optimiser not counted"}


def side_by_side(device: torch.device, tiny: bool, peak: float) -> dict:
    """The sweep's side-by-side step (synthetic default: 5 slots and 1, up to the programs bench/gpu.sh's run trains)
    and layer4's convolution in its two forms."""
    layer4 = flops.model_stages()["layer4_train"]
    if tiny:
        return {"side_by_side_step": side_by_side_step_speed(device, [(1, 1, 2)], [1, 2], 1, peak, layer4),
                "conv": grouped_conv_speed(device, models=2, maps=4, repeats=1, peak=peak)}
    d = SYNTHETIC_DEFAULT  # AMAN's program: 5 seeds x 32 folds; the one-slot variants': twice that
    steps = side_by_side_step_speed(device, [(d["frames"], d["magnified"], d["batch"])], [1, 32, 160], 3, peak, layer4)
    steps += side_by_side_step_speed(device, [(d["frames"], 1, d["batch"])], [1, 32, 320], 3, peak, layer4)
    return {"side_by_side_step": steps,
            "conv": grouped_conv_speed(device, models=160, maps=40, repeats=3, peak=peak)}  # the AMAN program's step


def projections(measured: dict) -> dict:
    """Seconds and hours that the measured rates give for notebook 04's full-model sweep on the synthetic default
    (every variant, and bench/gpu.sh's default set) and for the composite."""
    steps = {(r["frames"], r["factors"], r["batch"]): r for r in measured.get("train_step", [])}
    out = {}
    d = SYNTHETIC_DEFAULT
    clips = d["subjects"] * d["clips_per_subject"]
    per_run_steps = d["subjects"] * d["epochs"] * math.ceil((clips - d["clips_per_subject"]) / d["batch"])
    # variants of factors [1, 2 .. 12 (5)] reading the 5 magnified slots / one slot each: all of them (AMAN and its
    # two one-attention ablations; no magnification, the 5 single factors and the oracle) and bench/gpu.sh's default
    # (AMAN; no magnification, the best single factor and the oracle)
    sets = {"every variant": (3, 7), "bench/gpu.sh's default variants": (1, 3)}
    alone = {k: steps.get((d["frames"], k, d["batch"])) for k in (d["magnified"], 1)}
    side = [r for r in measured.get("side_by_side_step", []) if r["batch"] == d["batch"]]
    best = {k: min((r for r in side if r["factors"] == k), key=lambda r: r["step_ms_per_model"], default=None)
            for k in (d["magnified"], 1)}  # per model-step at the fastest program measured
    for engine, per_step in (("one fold after another (run_loso's step)",
                              {k: r and r["step_ms"] for k, r in alone.items()}),
                             ("folds side by side (the sweep's step, amanlib.sweep._FullProgram)",
                              {k: r and r["step_ms_per_model"] for k, r in best.items()})):
        if not all(per_step.values()):
            continue
        for name, (wide, narrow) in sets.items():
            out[f"synthetic_default_full_model_sweep, {name}, {engine}"] = {
                "what": f"notebook 04 on the GPU: {wide} variants of 5 slots and {narrow} of one x {d['seeds']} "
                        f"seeds x {d['subjects']} folds x {d['epochs']} epochs, batch {d['batch']}; training steps "
                        "only (test passes, model building, pre-training and features not counted)",
                "seconds": d["seeds"] * per_run_steps * (wide * per_step[d["magnified"]] + narrow * per_step[1]) / 1e3,
                "step_ms_per_model": {f"{k} slots": v for k, v in per_step.items()}}
    if all(best.values()):
        out["side_by_side_programs_used"] = {f"{k} slots": {"models": r["models"], "cudnn_benchmark":
                                                            r["cudnn_benchmark"]} for k, r in best.items()}
    comp = steps.get((11, 9, 4))
    if comp:
        S, N, epochs = 68, 442, 50
        train_steps = S * epochs * math.ceil(N * (S - 1) / S / 4)
        out["composite_full_model_loso"] = {
            "what": "MEGC2019 composite, AMAN variant, one seed: 68 folds x 50 epochs, 11 frames x 9 factors, "
                    "batch 4, folds one after another (training steps only)",
            "hours_measured_engine": train_steps * comp["step_ms"] / 1e3 / 3600,
            "tflop_per_s_engine": comp["tflop_per_s"]}
        big = steps.get((11, 9, 32))
        if big:
            out["composite_full_model_loso"]["hours_at_batch_32_rate"] = \
                out["composite_full_model_loso"]["hours_measured_engine"] * comp["tflop_per_s"] / big["tflop_per_s"]
    return out


def paper_estimate() -> dict:
    """bench/flops.py's composite estimate (its defaults: 40% of an H100's 989 TFLOP/s) for comparison."""
    composite = flops.Scenario("MEGC2019 composite", 442, 68, 11, 9, False, (224, 384))
    mag = {s: flops.magnifier_stages(s) for s in composite.mag_sizes}
    table = flops.with_times(pd.DataFrame(flops.scenario_rows(composite, mag, flops.trunk_image(), flops.model_stages(),
                                                              50, 4, 5)), flops.H100_SXM_BF16_DENSE_TFLOPS, 0.4, [1])
    groups = table.groupby("group", sort=False)[["pflop", "hours_1gpu"]].sum()
    return {"assumption": "40% of 989 TFLOP/s (H100 SXM dense bf16), bench/flops.py defaults",
            "groups": {g: {"pflop": float(r.pflop), "hours_1gpu": float(r.hours_1gpu)} for g, r in groups.iterrows()}}


def composite_from_measured(measured: dict) -> dict:
    """The composite's magnification and trunk hours at the measured rates (TFLOP/s per stage)."""
    composite = flops.Scenario("MEGC2019 composite", 442, 68, 11, 9, False, (224, 384))
    mag = {s: flops.magnifier_stages(s) for s in composite.mag_sizes}
    table = pd.DataFrame(flops.scenario_rows(composite, mag, flops.trunk_image(), flops.model_stages(), 50, 4, 5))
    table["pflop"] = table.flops_per_unit * table.units / 1e15
    out = {}
    for r in measured["magnifier"]:
        group = table[table.group == f"magnification {r['size']}px"]
        if len(group):
            seconds = group.pflop.sum() * 1e15 / (r["tflop_per_s"] * 1e12)
            out[f"magnification_{r['size']}px_hours"] = float(seconds / 3600)
    trunk = max(measured["trunk"], key=lambda r: r["tflop_per_s"])
    out["trunk_hours"] = float(table[table.group == "trunk"].pflop.sum() * 1e15 / (trunk["tflop_per_s"] * 1e12) / 3600)
    return out


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU dry run)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write (rewritten after each part)")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    report = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
              "machine": platform.machine(), "tiny": args.tiny, "peak_tflops_bf16_dense": args.peak_tflops,
              "seconds": {}}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")

    parts = [("agreement", lambda: agreement(args.device, args.tiny, work)),
             ("side_by_side", lambda: side_by_side(device, args.tiny, args.peak_tflops)),
             ("speed", lambda: speed(device, args.tiny, args.peak_tflops)),
             ("projections", lambda: projections({**report.get("speed", {}), **report.get("side_by_side", {})})),
             ("composite_from_measured", lambda: composite_from_measured(report["speed"]) if "speed" in report else {}),
             ("paper_estimate", paper_estimate)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, part in parts:
            start = time.perf_counter()
            try:
                report[name] = part()
            except Exception as e:  # one part failing must not cost the others
                report[name] = {"error": f"{type(e).__name__}: {e}"}
            report["seconds"][name] = round(time.perf_counter() - start, 2)
            print(f"gpu_checks: {name} done in {report['seconds'][name]:.1f} s", flush=True)
            save()
    summary(report)
    return report


def summary(r: dict) -> None:
    """A few lines for the log."""
    a = r.get("agreement", {})
    for key, v in a.items():
        if isinstance(v, dict) and "uf1_a" in v:
            print(f"{key}: UF1 {v['uf1_a']:.3f} vs {v['uf1_b']:.3f}, difference {v['difference']:+.3f} "
                  f"CI [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}], same predictions {v['same_predictions']:.1%}")
        elif isinstance(v, dict) and "predictions_identical" in v:
            logit = f", max |logit diff| {v['max_logit_diff']:.2e}" if "max_logit_diff" in v else ""
            print(f"{key}: predictions identical {v['predictions_identical']} ({v['same_prediction_share']:.1%})"
                  f"{logit}, max |alpha diff| {v['max_alpha_diff']:.2e}, max |train loss diff| "
                  f"{v['max_train_loss_diff']:.2e}")
    if "error" in a:
        print(f"agreement: {a['error']}")
    for rows in [*r.get("side_by_side", {}).values(), *r.get("speed", {}).values()]:
        for row in rows if isinstance(rows, list) else []:
            shape = {k: row[k] for k in ("size", "frames", "factors", "batch", "models", "maps", "cudnn_benchmark")
                     if k in row}
            print(f"{row['stage']} {shape}: {row['images_per_s']:.0f} img/s, {row['tflop_per_s']:.1f} TFLOP/s "
                  f"({row['share_of_peak']:.1%} of peak)")
    for name, v in r.get("projections", {}).items():
        print(f"{name}: {json.dumps(v, default=str)}")


if __name__ == "__main__":
    main()
