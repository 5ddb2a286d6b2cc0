"""FLOPs per stage of the pipeline and the estimated time of the MEGC2019 composite on H100 GPUs.

Counted by torch.utils.flop_counter.FlopCounterMode on real module calls of amanlib with meta tensors (no
weights, no data, no compute): convolutions and matrix products only, one multiply-add = 2 FLOPs;
element-wise work (ReLU, sigmoid, pooling, padding, normalisation, the optimiser) is not counted. Stages:
the authors' learning-based magnifier split as the kit runs it (encoder of the onset once per clip; encoder,
g and texture branch once per frame; h and decoder per frame and factor), the ResNet-18 trunk per image,
layer4 per (frame, factor) slice and the attention heads per clip (forward, and forward + backward for
training), and the frozen-layer4 sweep's heads per model-step. Each count times its units in the composite
(442 clips, 68 subjects, 11 frames, 9 factors, 50 epochs, batch 4) and in the synthetic default gives PFLOP
and hours at a share of an H100's dense bf16 peak, on 1 and N GPUs. Writes results/bench/flops.csv.

    python bench/flops.py
    python bench/flops.py --gpus 1 8 64 --utilisation 0.3 --real-sizes 224 384 512
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from amanlib import params
from amanlib.backbone import ResNet18Trunk
from amanlib.data.synthetic import SyntheticConfig
from amanlib.features import DEFAULT_FACTORS
from amanlib.magnify import LearningBasedMagnifier
from amanlib.magnify.learning import MagNet
from amanlib.model import AMAN
from amanlib.train import ablation_variants

META = torch.device("meta")
NUM_CLASSES = 3  # MEGC2019's three classes (the synthetic default uses the same protocol)
# NVIDIA H100 SXM5, dense BF16 Tensor Core peak: 989.4 TFLOP/s in the Hopper architecture whitepaper
# (resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper); the datasheet
# (nvidia.com/en-us/data-center/h100) lists 1,979 TFLOP/s "with sparsity", twice the dense figure.
H100_SXM_BF16_DENSE_TFLOPS = 989.0
ISSUE_MAGNIFICATION_PFLOP = 2.7  # the issue's figure for the composite's magnification
ISSUE_FULL_LOSO_PFLOP = 340.0  # the issue's figure for a full-model LOSO, 68 folds x 50 epochs


@dataclass(frozen=True)
class Scenario:
    """One dataset setting: what the units of every stage are counted from."""

    name: str
    clips: int
    subjects: int
    frames: int
    magnified: int  # factors that go through the magnifier
    unmagnified_slot: bool  # the factor-1 slot (the frame itself: trunk and layer4, no magnification)
    mag_sizes: tuple[int, ...]  # magnification size(s) in px

    @property
    def slots(self) -> int:
        return self.magnified + self.unmagnified_slot

    @property
    def factors(self) -> list[float]:
        spread = torch.linspace(2, 12, self.magnified).tolist()
        return ([1.0] if self.unmagnified_slot else []) + [round(f, 2) for f in spread]


def count(fn) -> int:
    """FLOPs of fn() as FlopCounterMode counts them (convs and matmuls, multiply-add = 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def meta_model(module: torch.nn.Module) -> torch.nn.Module:
    """The module on the meta device in eval mode: train-mode BatchNorm updates its running statistics from
    batch values, which meta tensors do not have; the counted convolutions and products are the same."""
    return module.to(META).eval()


def magnifier_stages(size: int, device=META) -> dict[str, int]:
    """The learning-based magnifier built without the authors' checkpoint (FLOPs need no weights), split as
    `prepare` / `render` run it: encoder of the onset (once per clip), per frame (encoder, g, texture branch)
    and per (frame, factor) (h, decoder)."""
    magnifier = LearningBasedMagnifier(MagNet().to(device))
    onset, frames = torch.zeros(1, 3, size, size, device=device), torch.zeros(2, 3, size, size, device=device)
    one, two = count(lambda: magnifier.prepare(onset, frames[:1])), count(lambda: magnifier.prepare(onset, frames))
    state = magnifier.prepare(onset, frames[:1])
    factor = count(lambda: magnifier.render(state, torch.tensor([2.0], device=device)))
    return {"onset": 2 * one - two, "frame": two - one, "factor": factor}


def check_magnifier_split(size: int = 64, frames: int = 3, factors: int = 4) -> tuple[int, int]:
    """(counted, predicted from the stages) for one real call magnifier(onset, F frames, K factors) on the CPU."""
    torch.manual_seed(0)
    magnifier = LearningBasedMagnifier(MagNet())
    onset, clip = torch.rand(1, 3, size, size), torch.rand(frames, 3, size, size)
    counted = count(lambda: magnifier(onset, clip, torch.linspace(2, 12, factors).tolist()))
    stages = magnifier_stages(size)
    return counted, stages["onset"] + frames * stages["frame"] + frames * factors * stages["factor"]


def trunk_image() -> int:
    """ResNet-18 conv1..layer3 on one 224x224 image."""
    return count(lambda: meta_model(ResNet18Trunk())(torch.zeros(1, 3, 224, 224, device=META)))


def train_step(model: torch.nn.Module, x: torch.Tensor, pooled: bool) -> int:
    """Forward + cross-entropy + backward of the model (AMAN.attend when the input is pooled). The model is in
    eval mode (see `meta_model`): BatchNorm is not counted, the convolutions and products are those of training."""
    y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    forward = (lambda: model.attend(x)[0]) if pooled else (lambda: model(x))
    return count(lambda: torch.nn.functional.cross_entropy(forward(), y).backward())


def heads(frames: int, slots: int, batch: int = 1, train: bool = True, grad_input: bool = True,
          use_alpha: bool = True, use_beta: bool = True) -> int:
    """Alpha, beta and classifier on pooled features [batch, F, K, 512]; grad_input: the features need a
    gradient (full model: it flows on into layer4), not so for the frozen-layer4 path."""
    model = meta_model(AMAN(NUM_CLASSES, layer4=False, use_alpha=use_alpha, use_beta=use_beta))
    f = torch.zeros(batch, frames, slots, 512, device=META, requires_grad=grad_input and train)
    return train_step(model, f, pooled=True) if train else count(lambda: model.attend(f))


def aman(frames: int, slots: int, train: bool) -> int:
    """The whole model on one clip's trunk features [1, F, K, 256, 14, 14]."""
    model, x = meta_model(AMAN(NUM_CLASSES)), torch.zeros(1, frames, slots, 256, 14, 14, device=META)
    return train_step(model, x, pooled=False) if train else count(lambda: model(x))


def model_stages() -> dict[str, int]:
    """AMAN on one slice [1, 1, 1, 256, 14, 14] and its layer4 share (the slice minus the heads at one slice)."""
    slice_fwd, slice_train = aman(1, 1, train=False), aman(1, 1, train=True)
    return {"slice_fwd": slice_fwd, "slice_train": slice_train,
            "layer4_fwd": slice_fwd - heads(1, 1, train=False), "layer4_train": slice_train - heads(1, 1)}


def scenario_rows(s: Scenario, mag: dict[int, dict], trunk: int, model: dict, epochs: int, batch: int,
                  seeds: int) -> list[dict]:
    """Every stage of scenario s: FLOPs per unit, units, and independent jobs the units split into."""
    N, S, F, K = s.clips, s.subjects, s.frames, s.slots
    variants = ablation_variants(s.factors)
    aman_k = len(variants[0].factor_slots)  # the AMAN variant: the magnified slots
    train_clips = (S - 1) * N * epochs  # each fold trains on the other subjects' clips, every epoch
    test_clips = N * epochs  # and tests on its own subject every epoch
    steps = S * math.ceil(N * (S - 1) / S / batch) * epochs  # per (variant, seed); subjects of equal size
    sweep_jobs, V = S * len(variants) * seeds, len(variants)
    step_heads = [heads(F, len(v.factor_slots), batch, grad_input=False, use_alpha=v.use_alpha,
                        use_beta=v.use_beta) for v in variants]
    test_heads = [heads(F, len(v.factor_slots), train=False, use_alpha=v.use_alpha, use_beta=v.use_beta)
                  for v in variants]
    slot_uses = sum(len(v.factor_slots) for v in variants)
    rows = []

    def add(group, stage, unit, flops, units, jobs):
        rows.append(dict(scenario=s.name, group=group, stage=stage, unit=unit, flops_per_unit=flops,
                         units=units, jobs=jobs))

    for size in s.mag_sizes:
        group = f"magnification {size}px"
        add(group, f"magnifier {size}px: encoder(onset)", "clip", mag[size]["onset"], N, N)
        add(group, f"magnifier {size}px: encoder(frame) + g + texture", "frame", mag[size]["frame"], N * F, N)
        add(group, f"magnifier {size}px: h + decoder", "(frame, factor)", mag[size]["factor"], N * F * s.magnified,
            N)
    add("trunk", "trunk conv1..layer3, 224px", "image", trunk, N * F * K, N)
    full = "full-model LOSO, one run (AMAN variant)"
    add(full, "layer4 fwd+bwd (train)", "slice", model["layer4_train"], train_clips * F * aman_k, S)
    add(full, "heads fwd+bwd (train)", "clip", heads(F, aman_k), train_clips, S)
    add(full, "layer4 fwd (test, every epoch)", "slice", model["layer4_fwd"], test_clips * F * aman_k, S)
    add(full, "heads fwd (test, every epoch)", "clip", heads(F, aman_k, train=False), test_clips, S)
    frozen = f"frozen-layer4 sweep ({V} variants x {seeds} seeds)"
    add(frozen, "layer4 fwd, pooled once", "slice", model["layer4_fwd"], N * F * K, N)
    add(frozen, f"heads fwd+bwd, batch {batch} (mean over variants)", "model-step", sum(step_heads) / V,
        steps * V * seeds, sweep_jobs)
    add(frozen, "heads fwd, test (mean over variants)", "clip", sum(test_heads) / V, test_clips * V * seeds,
        sweep_jobs)
    gpu = f"full-model sweep ({V} variants x {seeds} seeds: notebook 04 on a GPU)"
    add(gpu, "layer4 fwd+bwd (train)", "slice", model["layer4_train"], train_clips * F * slot_uses * seeds, sweep_jobs)
    add(gpu, "layer4 fwd (test, every epoch)", "slice", model["layer4_fwd"], test_clips * F * slot_uses * seeds,
        sweep_jobs)
    return rows


def with_times(table: pd.DataFrame, peak_tflops: float, utilisation: float, gpus: list[int]) -> pd.DataFrame:
    """PFLOP and hours per row on n GPUs: whole jobs (clips, folds, fold x variant x seed) spread over GPUs."""
    table = table.copy()
    table["pflop"] = table.flops_per_unit * table.units / 1e15
    table["peak_tflops"], table["utilisation"] = peak_tflops, utilisation
    one_gpu_h = table.pflop * 1e15 / (peak_tflops * 1e12 * utilisation) / 3600
    for n in gpus:
        table[f"hours_{n}gpu"] = one_gpu_h * (-(-table.jobs // n)) / table.jobs
    return table


def show(table: pd.DataFrame, gpus: list[int]) -> None:
    """The stage table of one scenario and its subtotals per group."""
    hours = [f"hours_{n}gpu" for n in gpus]
    shown = table[["stage", "unit", "flops_per_unit", "units", "pflop", *hours]].copy()
    shown["gflop_per_unit"] = shown.pop("flops_per_unit") / 1e9
    shown = shown[["stage", "unit", "gflop_per_unit", "units", "pflop", *hours]]
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(table.groupby("group", sort=False)[["pflop", *hours]].sum().to_string(float_format=lambda v: f"{v:.4g}"))


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real-sizes", type=int, nargs="+", default=[224, 384],
                   help="magnification sizes on real data (the kit magnifies at each clip's own size: CASME II "
                        "crops are about 231x282; the authors' demo resizes to 384)")
    p.add_argument("--synthetic-size", type=int, default=SyntheticConfig.size, help="the synthetic set's frame size")
    p.add_argument("--composite-unmagnified", action="store_true",
                   help="count the kit's factor-1 slot in the composite too (10 slots instead of 9)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seeds", type=int, default=5, help="seeds of the ablation sweeps (notebook 04's default)")
    p.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                   help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--utilisation", type=float, default=0.4, help="share of the peak reached")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out", default="results/bench/flops.csv")
    args = p.parse_args(argv)
    composite = Scenario("MEGC2019 composite", 442, 68, 11, 9, args.composite_unmagnified, tuple(args.real_sizes))
    default = SyntheticConfig()  # the synthetic default as make reproduce runs it (notebook defaults, 5 factors)
    synthetic = Scenario("synthetic default", default.n_subjects * default.clips_per_subject, default.n_subjects,
                         params.SCHEMA["n_frames"].default, len(DEFAULT_FACTORS), True, (args.synthetic_size,))

    mag = {size: magnifier_stages(size) for size in {*args.real_sizes, args.synthetic_size}}
    trunk, model = trunk_image(), model_stages()
    print("# FLOPs: convolutions and matrix products (FlopCounterMode), multiply-add = 2 FLOPs; element-wise "
          "ops, pooling and the optimiser not counted")
    for size, m in sorted(mag.items()):
        print(f"magnifier {size}px: encoder(onset) {m['onset'] / 1e9:.3f} GFLOP per clip, encoder(frame) + g + "
              f"texture {m['frame'] / 1e9:.3f} per frame, h + decoder {m['factor'] / 1e9:.3f} per (frame, factor)")
    counted, predicted = check_magnifier_split()
    print(f"  check: one real call (64px, 3 frames, 4 factors) counts {counted / 1e9:.4f} GFLOP, the stages "
          f"predict {predicted / 1e9:.4f} (ratio {counted / predicted:.4f})")
    print(f"trunk conv1..layer3 at 224px: {trunk / 1e9:.3f} GFLOP per image")
    print(f"AMAN on one slice [1, 1, 1, 256, 14, 14]: forward {model['slice_fwd'] / 1e9:.4f} GFLOP, forward+backward "
          f"{model['slice_train'] / 1e9:.4f} (of which the heads {(model['slice_fwd'] - model['layer4_fwd']) / 1e3:.1f}"
          f" / {(model['slice_train'] - model['layer4_train']) / 1e3:.1f} kFLOP)")
    for s in (composite, synthetic):
        F, K = s.frames, len(ablation_variants(s.factors)[0].factor_slots)
        whole = aman(F, K, train=True)
        parts = F * K * model["layer4_train"] + heads(F, K)
        print(f"{s.name}: heads per clip [1, {F}, {K}, 512] forward {heads(F, K, train=False) / 1e6:.4f} MFLOP, "
              f"fwd+bwd {heads(F, K) / 1e6:.4f}; check: AMAN fwd+bwd on one clip {whole / 1e9:.3f} GFLOP = "
              f"layer4 x {F * K} + heads {parts / 1e9:.3f} (ratio {whole / parts:.6f})")
    print(f"frozen-layer4 heads per model-step (batch {args.batch}, AMAN variant, no gradient into the features): "
          f"{heads(synthetic.frames, synthetic.magnified, args.batch, grad_input=False) / 1e6:.3f} MFLOP synthetic, "
          f"{heads(composite.frames, composite.magnified, args.batch, grad_input=False) / 1e6:.3f} MFLOP composite")

    tables = []
    for s in (composite, synthetic):
        table = with_times(pd.DataFrame(scenario_rows(s, mag, trunk, model, args.epochs, args.batch, args.seeds)),
                           args.peak_tflops, args.utilisation, args.gpus)
        print(f"\n## {s.name}: {s.clips} clips, {s.subjects} LOSO folds, {s.frames} frames, {s.magnified} magnified "
              f"factors, {s.slots} slots, {args.epochs} epochs, batch {args.batch}; hours at "
              f"{args.utilisation:.0%} of {args.peak_tflops:g} TFLOP/s per GPU (whole clips / folds per GPU)")
        show(table, args.gpus)
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    sanity(table[table.scenario == composite.name], composite, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"wrote {args.out}")
    return table


def sanity(table: pd.DataFrame, s: Scenario, args) -> None:
    """The issue's two figures against these counts, with what explains a difference."""
    print("\n## sanity check against the issue (composite)")
    totals = {size: table[table.group == f"magnification {size}px"].pflop.sum() for size in s.mag_sizes}
    closest = min(totals, key=lambda size: abs(totals[size] - ISSUE_MAGNIFICATION_PFLOP))
    for size, total in totals.items():
        mag = table[table.group == f"magnification {size}px"]
        per_pair = mag.flops_per_unit.iloc[0] + mag.flops_per_unit.iloc[1]
        reencoded = total + (s.clips * s.frames - s.clips) * mag.flops_per_unit.iloc[0] / 1e15
        ratio = total / ISSUE_MAGNIFICATION_PFLOP
        verdict = "agrees" if abs(ratio - 1) < 0.1 else \
            f"differs: the magnifier's FLOPs grow with the pixels, and the issue's figure is the {closest}px count"
        print(f"magnification at {size}px: {total:.3f} PFLOP, {ratio:.2f}x the issue's {ISSUE_MAGNIFICATION_PFLOP}: "
              f"{verdict} (the kit encodes the onset once per clip; re-encoding it for every frame, "
              f"{per_pair / 1e9:.1f} GFLOP per pair as bench/magnify.py reports it, would give {reencoded:.3f})")
    full = table[table.group.str.startswith("full-model LOSO")]
    sweep = table[table.group.str.startswith("full-model sweep")].pflop.sum()
    train = full[full.stage.str.contains("train")].pflop.sum()
    ratio = train / ISSUE_FULL_LOSO_PFLOP
    print(f"full-model LOSO ({s.subjects} folds x {args.epochs} epochs): training {train:.1f} PFLOP, {ratio:.3f}x the "
          f"issue's {ISSUE_FULL_LOSO_PFLOP:g}: {'agrees' if abs(ratio - 1) < 0.1 else 'differs'} (layer4 forward + "
          f"backward over the other {s.subjects - 1} subjects' clips; the test passes after every epoch add "
          f"{full.pflop.sum() - train:.2f}, magnification and trunk are counted apart). Notebook 04 on a GPU trains "
          f"every ablation variant with every seed: {sweep:.0f} PFLOP")
    print("the heads (and so the frozen-layer4 sweep) are products of a few hundred values: a GPU runs them far "
          "below any share of its peak, so their hours here are a floor, not an estimate")


if __name__ == "__main__":
    main()
