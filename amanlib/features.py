"""The ResNet-18 feature trunk (conv1 .. layer3: 224x224 -> 256x14x14) and batched feature extraction."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision import models, transforms
from tqdm.auto import tqdm

from .model import load_state_file
from .runtime import resolve_device

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
    for start in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress, leave=False):
        batch = preprocess(images[start:start + batch_size].to(device, torch.float32))
        out.append(trunk(batch.contiguous(memory_format=torch.channels_last)).to("cpu", dtype))
    return torch.cat(out) if out else torch.empty(0, 256, 14, 14, dtype=dtype)
