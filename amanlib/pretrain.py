"""The kit's stand-in for FER+: a ResNet-18 trained to classify the synthetic macro-expressions.

Used only when no FER+ checkpoint (Emotion-FAN's Resnet18_FER+_pytorch.pth.tar) is at hand. The saved file
has the FER+ layout ({'state_dict': ...} with torchvision names), so load_fer_checkpoint and
AMAN(init_layer4_from=...) read it like the real one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchvision import models
from torchvision.transforms import v2

from .cache import build_once, file_digest
from .data import load_clip_frames
from .backbone import preprocess
from .runtime import autocast, progress_bar, resolve_device, resolve_precision, seed_everything, torch_save_atomic


@dataclass
class PretrainConfig:
    epochs: int = 6  # bench/pretrain.py: 10 epochs gain 0.04 held-out accuracy (within its 0.05 SE) for 1.6x time
    crop: int = 160  # train on random crops of the 224x224 images: faces keep the scale of feature extraction
    batch_size: int = 32
    lr: float = 3e-3  # peak of the one-cycle schedule
    weight_decay: float = 1e-4
    val_subjects: int = 4  # held-out subjects for the accuracy we report
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # runtime.PRECISIONS: auto takes bf16 only where the device has it natively


@dataclass(frozen=True)
class Pretrained:
    """A pre-trained trunk's checkpoint (FER+ layout) and its held-out accuracy."""

    path: Path
    summary: dict

    @property
    def val_accuracy(self) -> float:
        return self.summary["val_accuracy"]


def pretrain_trunk(macro: pd.DataFrame, root: str | Path, cfg: PretrainConfig | None = None,
                   progress: bool = True) -> Pretrained:
    """Train ResNet-18 (random init) on macro images (columns path, subject, label) into root/<key>/trunk.pth.

    The key covers the images (by content), their labels and subjects, and the config (not the device), so a
    finished trunk is reused and anything else trains anew.
    """
    cfg = cfg or PretrainConfig()
    for col in ("path", "subject", "label"):
        if col not in macro:
            raise ValueError(f"macro table lacks column '{col}' (have {list(macro.columns)})")
    config = {k: v for k, v in asdict(cfg).items() if k != "device"}
    config["precision"] = str(resolve_precision(cfg.precision, resolve_device(cfg.device)))  # what 'auto' resolves to
    images = [[Path(p).name, file_digest(p), str(s), int(y)] for p, s, y in zip(macro["path"], macro["subject"],
                                                                               macro["label"])]
    entry = build_once(root, {"images": images, "config": config}, "pretrained trunk",
                       lambda folder: _train(macro, folder / "trunk.pth", cfg, progress))
    return Pretrained(entry.path / "trunk.pth", entry.stamp())


def _train(macro: pd.DataFrame, out_path: Path, cfg: PretrainConfig, progress: bool) -> dict:
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    images = preprocess(load_clip_frames(macro["path"].tolist(), size=224))  # N, 3, 224, 224
    labels = torch.tensor(macro["label"].to_numpy(dtype=np.int64))
    subjects = sorted(macro["subject"].unique())
    val = macro["subject"].isin(subjects[-cfg.val_subjects:]).to_numpy()
    train_rows, val_rows = np.flatnonzero(~val), np.flatnonzero(val)

    net = models.resnet18(num_classes=int(labels.max()) + 1).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(train_rows) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    augment = v2.Compose([v2.RandomCrop(cfg.crop), v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=5)])
    center = v2.CenterCrop(cfg.crop)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = progress_bar(total=steps, desc="pre-training trunk on synthetic macro", disable=not progress)
    for _ in range(cfg.epochs):
        net.train()
        order = train_rows[torch.randperm(len(train_rows), generator=gen).numpy()]
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            x = augment(images[idx]).to(device, memory_format=torch.channels_last)
            with autocast(device, dtype):
                loss = torch.nn.functional.cross_entropy(net(x).float(), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    net.eval()
    with torch.inference_mode():
        pred = torch.cat([net(center(images[val_rows[s:s + 64]]).to(device)).argmax(1).cpu()
                          for s in range(0, len(val_rows), 64)])
    summary = {"source": "amanlib synthetic macro-expression pre-training (stand-in for FER+)",
               "val_accuracy": float((pred == labels[val_rows]).float().mean()), "val_images": int(len(val_rows)),
               "train_images": int(len(train_rows)), "config": asdict(cfg)}
    torch_save_atomic({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "summary": summary}, out_path)
    return summary
