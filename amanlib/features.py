"""The ResNet-18 feature trunk (conv1 .. layer3: 224x224 -> 256x14x14) and batched feature extraction."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import models, transforms

from .data import load_clip_frames, select_frames
from .model import load_state_file
from .runtime import atomic_write, progress_bar, resolve_device

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")

preprocess = transforms.Compose([
    transforms.Resize((224, 224), antialias=True),
    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
])
"""Tensor [N, 3, H, W] in [0, 1] -> [N, 3, 224, 224], ImageNet-normalised (as in the authors' extraction)."""


class ResNet18Trunk(nn.Module):
    """conv1, bn1, relu, maxpool, layer1-3 of torchvision's ResNet-18; optionally layer4 too (for pre-training)."""

    def __init__(self, with_layer4: bool = False):
        super().__init__()
        resnet = models.resnet18(weights=None)
        for name in TRUNK_LAYERS + (("layer4",) if with_layer4 else ()):
            setattr(self, name, getattr(resnet, name))
        self.source = "random"  # what the weights are: 'random', a checkpoint path, ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in TRUNK_LAYERS:
            x = getattr(self, name)(x)
        return x  # N, 256, 14, 14 for 224x224 input


def load_fer_checkpoint(module: nn.Module, path: str | Path) -> nn.Module:
    """Load Emotion-FAN's FER+ ResNet-18 (`Resnet18_FER+_pytorch.pth.tar`) or any ResNet-18 state dict.

    'module.' prefixes are stripped, fc.* is skipped, layer4.* is kept only where `module` has a layer4.
    Every parameter of `module` must be found in the file, so a wrong file cannot half-load silently.
    """
    state = load_state_file(path)
    target = module.state_dict()
    has_layer4 = any(k.startswith("layer4.") for k in target)
    state = {k: v for k, v in state.items()
             if not k.startswith("fc.") and (has_layer4 or not k.startswith("layer4."))}
    missing = [k for k in target if k not in state]
    if missing:
        raise ValueError(f"{path}: not a ResNet-18 checkpoint (FER+ of Emotion-FAN, keys 'module.conv1.weight', ...); "
                         f"{len(missing)} weights of the trunk are missing, e.g. {missing[:3]}")
    bad = [k for k in target if state[k].shape != target[k].shape]
    if bad:
        raise ValueError(f"{path}: shapes differ from ResNet-18 for {bad[:3]} "
                         f"({tuple(state[bad[0]].shape)} vs {tuple(target[bad[0]].shape)})")
    module.load_state_dict({k: state[k] for k in target})
    module.source = str(path)
    return module


def load_trunk(checkpoint: str | Path | None = None, allow_random: bool = False) -> ResNet18Trunk:
    """A trunk from a checkpoint; without one only if allow_random, and then with a loud warning."""
    trunk = ResNet18Trunk()
    if checkpoint is not None:
        return load_fer_checkpoint(trunk, checkpoint).eval()
    if not allow_random:
        raise ValueError("no trunk checkpoint given: pass the FER+ checkpoint (Resnet18_FER+_pytorch.pth.tar), "
                         "the kit's own pre-trained trunk, or allow_random=True")
    log.warning("ResNet-18 trunk has RANDOM weights: features will be weak and results not comparable to the paper")
    return trunk.eval()


@torch.inference_mode()
def extract_features(images: torch.Tensor, trunk: nn.Module, batch_size: int = 64, device="auto",
                     dtype: torch.dtype = torch.float32, progress: bool = True) -> torch.Tensor:
    """Run images [N, 3, H, W] in [0, 1] through preprocess + trunk in batches -> [N, 256, 14, 14] on CPU."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"extract_features expects images [N, 3, H, W], got {tuple(images.shape)}")
    device = resolve_device(device)
    trunk = trunk.to(device).eval()
    out = []
    starts = range(0, len(images), batch_size)
    for start in progress_bar(starts, desc="features", disable=not progress, leave=False):
        batch = preprocess(images[start:start + batch_size].to(device, torch.float32))
        out.append(trunk(batch.contiguous(memory_format=torch.channels_last)).to("cpu", dtype))
    return torch.cat(out) if out else torch.empty(0, 256, 14, 14, dtype=dtype)


def magnify_clip(row, magnifier, factors, n_frames: int, size: int | None = None, device="cpu") -> torch.Tensor:
    """The n_frames frames after the onset up to the apex, each magnified against the onset: [F, K, 3, H, W].

    A factor of 1 is the unmagnified frame itself (the 'no magnification' input), not a network pass.
    """
    images = load_clip_frames(select_frames(row, n_frames + 1), size).to(device)  # F+1, 3, H, W (onset first)
    frames = images[1:]
    onset = images[:1].expand_as(frames)
    factors = [float(f) for f in factors]
    magnified = [f for f in factors if f != 1.0]
    out = frames[:, None].expand(-1, len(factors), -1, -1, -1).clone()  # F, K, 3, H, W
    if magnified:
        slots = [k for k, f in enumerate(factors) if f != 1.0]
        out[:, slots] = magnifier(onset, frames, magnified).to(out.dtype)
    return out


def _cache_meta(index, factors, n_frames, size, magnifier_name, trunk) -> dict:
    return {"clips": [f"{d}/{s}/{c}" for d, s, c in zip(index["dataset"], index["subject"], index["clip"])],
            "factors": [float(f) for f in factors], "n_frames": int(n_frames), "size": size,
            "magnifier": magnifier_name, "trunk": getattr(trunk, "source", "unknown")}


def build_feature_cache(index, magnifier, trunk: nn.Module, factors, n_frames: int, out_dir: str | Path,
                        magnifier_name: str = "", size: int | None = None, batch_size: int = 64, device="auto",
                        progress: bool = True) -> np.memmap:
    """Magnify every clip and run the trunk: float16 memmap [N, F, K, 256, 14, 14] in out_dir/features.f16.

    Clips already done (out_dir/done.npy) are skipped, so an interrupted run resumes where it stopped; a
    cache built with other settings (meta.json) is an error rather than a silent mix.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _cache_meta(index, factors, n_frames, size, magnifier_name, trunk)
    meta_path, done_path, data_path = out_dir / "meta.json", out_dir / "done.npy", out_dir / "features.f16"
    shape = (len(index), n_frames, len(meta["factors"]), 256, 14, 14)
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != meta:
            diff = [k for k in meta if old.get(k) != meta[k]]
            raise ValueError(f"{out_dir} holds features built with other settings ({', '.join(diff)}); "
                             "use another folder or delete it")
        done = np.load(done_path)
        mode = "r+"
    else:
        done = np.zeros(len(index), bool)
        mode = "w+"
    data = np.lib.format.open_memmap(data_path, mode=mode, dtype=np.float16, shape=shape)
    if mode == "w+":
        atomic_write(done_path, lambda tmp: np.save(tmp, done))
        atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    device = resolve_device(device)
    if hasattr(magnifier, "to"):
        magnifier = magnifier.to(device)
    todo = np.flatnonzero(~done)
    rows = index.reset_index(drop=True)
    for i in progress_bar(todo, desc="magnify + features", disable=not progress or not len(todo)):
        with torch.inference_mode():
            clip = magnify_clip(rows.loc[i], magnifier, meta["factors"], n_frames, size, device)  # F, K, 3, H, W
        feats = extract_features(clip.flatten(0, 1), trunk, batch_size, device, torch.float16, progress=False)
        data[i] = feats.view(shape[1:]).numpy()
        data.flush()
        done[i] = True
        atomic_write(done_path, lambda tmp: np.save(tmp, done))
    return np.lib.format.open_memmap(data_path, mode="r")


def load_feature_cache(out_dir: str | Path):
    """(features memmap [N, F, K, 256, 14, 14], meta dict) of a finished cache; an error if it is incomplete."""
    out_dir = Path(out_dir)
    if not (out_dir / "meta.json").exists():
        raise FileNotFoundError(f"no feature cache in {out_dir}: run notebook 03 (build_feature_cache) first")
    done = np.load(out_dir / "done.npy")
    if not done.all():
        raise ValueError(f"feature cache {out_dir} is incomplete ({done.sum()}/{len(done)} clips): re-run notebook 03")
    return np.lib.format.open_memmap(out_dir / "features.f16", mode="r"), json.loads((out_dir / "meta.json").read_text())
