"""Where the kit can differ from the AMAN authors' code (github.com/weimengting/AMAN), the option that controls
each difference, and two presets that set the BatchNorm and layer4 choices at once."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

FIDELITIES = ("auto", "authors", "kit")


@dataclass(frozen=True)
class Fidelity:
    """The choices a preset fixes: trunk BatchNorm while extracting features, layer4 BatchNorm while training,
    and what layer4 starts from."""

    name: str
    trunk_bn: str  # frame_batch: each frame's magnified images normalised by their own statistics | running
    layer4_bn: str  # per_slice: statistics per (frame, factor) slice of the batch | joint: over all slices
    layer4_init: str  # random | backbone: the trunk checkpoint's layer4


PRESETS = {"authors": Fidelity("authors", "frame_batch", "per_slice", "random"),
           "kit": Fidelity("kit", "running", "joint", "backbone")}


def preset_name(fidelity: str, synthetic: bool) -> str:
    """'auto' is the authors' preset on real data and the kit's on the synthetic set, where the CPU default
    (frozen layer4) needs a pre-trained layer4 and the trunk's running statistics are the ones it learned."""
    if fidelity not in FIDELITIES:
        raise ValueError(f"fidelity must be one of {FIDELITIES}, got {fidelity!r}")
    return ("kit" if synthetic else "authors") if fidelity == "auto" else fidelity


def resolve_fidelity(fidelity: str, index: pd.DataFrame) -> Fidelity:
    """The preset a fidelity setting names for this clip table (see preset_name)."""
    return PRESETS[preset_name(fidelity, set(index["dataset"].astype(str)) == {"synthetic"})]


def name_of(trunk_bn: str, layer4_bn: str, layer4_init: str) -> str:
    """The preset these three choices make ('authors', 'kit'), or 'mixed' with the choices named."""
    for name, preset in PRESETS.items():
        if (preset.trunk_bn, preset.layer4_bn, preset.layer4_init) == (trunk_bn, layer4_bn, layer4_init):
            return name
    return f"mixed (trunk bn {trunk_bn}, layer4 bn {layer4_bn}, layer4 init {layer4_init})"


DIFFERENCES = [  # what, the authors' file, the kit's option, the authors' behaviour, the kit's default
    ("Trunk BatchNorm while extracting features", "`extract_features/resnet_features.py`",
     "`fidelity` (03) / `ResNet18Trunk(bn=)`", "batch statistics of each frame's K magnified images (never eval())",
     "`authors`: the same; `kit`: running statistics"),
    ("layer4 BatchNorm while training", "`main/network.py`", "`fidelity` (04) / `TrainConfig.layer4_bn`",
     "statistics per (frame, factor) slice; running statistics updated F*K times per step",
     "`authors`: the same, vectorised; `kit`: one call over all slices"),
    ("layer4's start", "`main/train.py`", "`fidelity` (04) / `TrainConfig.layer4_init`",
     "random (`model_directory` is never read)", "`authors`: random; `kit`: the trunk checkpoint's layer4"),
    ("layer4 trains", "`main/train.py`", "`frozen_layer4`", "always",
     "auto: frozen (pre-trained, pooled once) on a CPU, trained on a GPU"),
    ("Epoch whose predictions count", "`main/train.py`", "`epoch_selection`",
     "first epoch with the best test-subject accuracy; stop at 100%; the last epoch if never right",
     "`fixed` (last epoch, honest); `paper` is theirs to the letter, reported as optimistic"),
    ("Trunk weights", "`assets/Resnet18_FER+_pytorch.pth.tar`", "`backbone`, `fer_checkpoint`",
     "FER+ ResNet-18", "`auto`: FER+ when present or downloadable (git blob SHA-1 checked), else the kit's own "
     "pre-training; the synthetic default pins the kit's own"),
    ("Magnified images", "`mag_imple/mag.py`", "(none)", "written to image files (JPEG in their demo), read back "
     "through PIL", "kept in memory as floats: no file, JPEG or 8-bit rounding"),
    ("Magnification size", "`mag_imple/mag.py`", "`mag_size`", "384x384 in their demo",
     "None: each clip's own size"),
    ("Resize to 224x224", "`extract_features/resnet_features.py`", "(none)", "PIL resize of the 8-bit image",
     "antialiased tensor resize"),
    ("Several GPUs", "`main/train.py`, `extract_features/resnet_features.py`", "(none)",
     "DataParallel over 4 GPUs by default: BatchNorm statistics per GPU's share of the batch",
     "one device: statistics over the whole batch (their single-GPU behaviour)"),
    ("Compute precision", "all", "`precision`", "fp32",
     "`auto`: bf16 where the CPU or GPU has it natively, else fp32 (never emulated); recorded in metrics.json"),
    ("Frames and factors", "the paper", "`n_frames`, `factors`",
     "10-11 frames, 9 factors (their shape comments; the values are not published)",
     "2 frames and 5 factors over 2-12 (their demo's range) by default, sized for 5 seeds in 5 minutes on a CPU; "
     "pass 10-11 frames and 9 factors on real data"),
    ("No-magnification slot", "(absent)", "`include_unmagnified`", "none",
     "the unmagnified frame as an extra slot, extracted as a batch of its own (it changes no other slot)"),
    ("Heads on frozen features", "(absent)", "`frozen_layer4`", "none",
     "pooled features standardised with the fold's training clips"),
]


def differences_markdown() -> str:
    """The DIFFERENCES as a Markdown table (README and the notebooks show this one)."""
    head = "| what | the authors' code | option | the authors | the kit |\n|---|---|---|---|---|\n"
    return head + "".join(f"| {what} | {file} | {option} | {theirs} | {ours} |\n"
                          for what, file, option, theirs, ours in DIFFERENCES)


def train_settings(preset: Fidelity, cache) -> dict:
    """TrainConfig's layer4 fields under a preset, for features `cache` (a FeatureCache: its trunk's checkpoint
    is where layer4 starts from under layer4_init 'backbone')."""
    checkpoint = cache.backbone["checkpoint"] if preset.layer4_init == "backbone" else None
    if preset.layer4_init == "backbone" and checkpoint is None:
        raise ValueError(f"fidelity {preset.name!r} starts layer4 from the trunk's checkpoint, but the features in "
                         f"{cache.path} come from a trunk without one ({cache.backbone['name']}); use fidelity "
                         "'authors' (random layer4) or build the features with a pre-trained backbone")
    return {"layer4_bn": preset.layer4_bn, "layer4_init": preset.layer4_init, "init_layer4_from": checkpoint}
