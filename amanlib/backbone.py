"""The ResNet-18 feature trunk (conv1 .. layer3: 224x224 -> 256x14x14) and its weights: the paper's FER+
ResNet-18, the kit's own pre-training, or random."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models, transforms

from .batchnorm import batch_groups, use_group_batch_norm
from .checkpoints import check_architecture, read_state_dict

log = logging.getLogger(__name__)

BACKBONES = ("auto", "fer", "synthetic_macro", "random")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
TRUNK_BN = ("running", "frame_batch")

preprocess = transforms.Compose([
    transforms.Resize((224, 224), antialias=True),
    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
])
"""Tensor [N, 3, H, W] in [0, 1] -> [N, 3, 224, 224], ImageNet-normalised (as in the authors' extraction)."""


class ResNet18Trunk(nn.Module):
    """conv1, bn1, relu, maxpool, layer1-3 of torchvision's ResNet-18; optionally layer4 too (for pre-training).

    bn 'running': BatchNorms use the running statistics (in eval mode). 'frame_batch' (the authors' extraction,
    which never calls eval()): every BatchNorm uses the statistics of the batch it is given, in either mode,
    and leaves the running statistics alone.
    """

    def __init__(self, with_layer4: bool = False, bn: str = "running"):
        super().__init__()
        if bn not in TRUNK_BN:
            raise ValueError(f"bn must be one of {TRUNK_BN}, got {bn!r}")
        resnet = models.resnet18(weights=None)
        for name in TRUNK_LAYERS + (("layer4",) if with_layer4 else ()):
            setattr(self, name, getattr(resnet, name))
        self.source = "random"  # what the weights are: 'random', a checkpoint path, ...
        self.bn = bn
        if bn == "frame_batch":
            use_group_batch_norm(self, batch_stats="always")  # same state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] (one batch) or [G, n, 3, H, W] (G batches, e.g. the K magnified images of each of G
        frames; with frame_batch each is normalised with its own statistics) -> [N or G, n, 256, 14, 14] at 224."""
        if x.dim() not in (4, 5):
            raise ValueError(f"the trunk expects images [N, 3, H, W] or [G, n, 3, H, W], got {tuple(x.shape)}")
        if x.dim() == 4:
            return self.features(x, 1)
        G, n = x.shape[:2]
        if self.bn == "running":
            return self.features(x.flatten(0, 1), 1).unflatten(0, (G, n))
        y = self.features(x.transpose(0, 1).flatten(0, 1), G)  # n*G, 256, 14, 14: row b*G + g is image b of batch g
        return y.unflatten(0, (n, G)).transpose(0, 1).contiguous()  # G, n, 256, 14, 14

    def features(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """conv1 .. layer3 on x [N, 3, H, W], a frame_batch trunk's BatchNorms seeing `groups` interleaved batches."""
        with batch_groups(self, groups):
            for name in TRUNK_LAYERS:
                x = getattr(self, name)(x)
        return x  # N, 256, 14, 14 for 224x224 input


def load_fer_checkpoint(module: nn.Module, path: str | Path) -> nn.Module:
    """Load Emotion-FAN's FER+ ResNet-18 (`Resnet18_FER+_pytorch.pth.tar`) or any ResNet-18 state dict.

    'module.' prefixes are stripped and fc.* (any class count) is skipped; the rest must be exactly ResNet-18's
    keys and shapes (num_batches_tracked may be absent from old files), so another architecture or a wrong file
    is refused, never half-loaded. `module` gets its own subset (layer4.* only where it has a layer4).
    """
    state = {k: v for k, v in read_state_dict(path, "FER+ checkpoint").items() if not k.startswith("fc.")}
    resnet18 = {k: v.shape for k, v in models.resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    check_architecture(state, resnet18, path, "ResNet-18 (FER+ layout: conv1, bn1, layer1-4, fc)",
                       may_lack=("num_batches_tracked",))
    module.load_state_dict({k: state.get(k, v) for k, v in module.state_dict().items()})
    module.source = str(path)
    return module


def load_trunk(checkpoint: str | Path | None = None, allow_random: bool = False, bn: str = "running") -> ResNet18Trunk:
    """A trunk from a checkpoint; without one only if allow_random, and then with a loud warning. bn: see
    ResNet18Trunk."""
    trunk = ResNet18Trunk(bn=bn)
    if checkpoint is not None:
        return load_fer_checkpoint(trunk, checkpoint).eval()
    if not allow_random:
        raise ValueError("no trunk checkpoint given: pass the FER+ checkpoint (Resnet18_FER+_pytorch.pth.tar), "
                         "the kit's own pre-trained trunk, or allow_random=True")
    log.warning("ResNet-18 trunk has RANDOM weights: features will be weak and results not comparable to the paper")
    return trunk.eval()




@dataclass
class Backbone:
    """A trunk and what it is: name ('fer+', 'synthetic_macro', 'random'), the checkpoint its layer4 can
    start from (None for random) and a sentence for notebooks and figures."""

    trunk: ResNet18Trunk
    name: str
    checkpoint: Path | None
    note: str


def choose_backbone(backbone: str = "auto", work_dir: str | Path = "results/work", fer_checkpoint=None,
                    seed: int = 0, data_dir: str | Path = "data", pretrain_epochs: int | None = None,
                    device="auto", precision: str = "auto", trunk_bn: str = "running",
                    download_fer: bool = True) -> Backbone:
    """'fer' (the paper's FER+ file), 'synthetic_macro' (the kit's pre-training, cached under work_dir/trunks by
    its inputs), 'random' (drawn from seed), or 'auto': FER+ when fer_checkpoint is given or the verified file is
    in ~/.cache/amanlib (downloaded there when absent and download_fer), else synthetic_macro. trunk_bn: see
    ResNet18Trunk. pretrain_epochs None: PretrainConfig's; precision: runtime.PRECISIONS."""
    from .fer import FER_BLOB_SHA1, default_fer_path, find_fer_checkpoint, git_blob_sha1
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    fallback = ""
    if backbone == "auto":
        fer_checkpoint = fer_checkpoint or find_fer_checkpoint(download=download_fer)
        backbone = "fer" if fer_checkpoint else "synthetic_macro"
        fallback = "" if fer_checkpoint else (f"the FER+ file is not at {default_fer_path()} and "
                                              f"{'could not be downloaded' if download_fer else 'download_fer is off'}"
                                              "; ")
    if backbone == "fer":
        if fer_checkpoint is None:
            raise ValueError("backbone 'fer' needs fer_checkpoint (Resnet18_FER+_pytorch.pth.tar, git blob SHA-1 "
                             f"{FER_BLOB_SHA1}: amanlib.features.download_fer_checkpoint() fetches it)")
        path = Path(fer_checkpoint)
        trunk = load_trunk(path, bn=trunk_bn)  # its errors name the file
        blob = git_blob_sha1(path)
        if blob == FER_BLOB_SHA1:
            return Backbone(trunk, "fer+", path, f"FER+ ResNet-18 from {path}, as in the paper")
        log.warning("%s is a ResNet-18 checkpoint but not the paper's FER+ file (git blob SHA-1 %s, expected %s)",
                    path, blob, FER_BLOB_SHA1)
        return Backbone(trunk, "resnet18 (own checkpoint)", path,
                        f"NOT the paper's FER+ backbone: a ResNet-18 checkpoint from {path} (git blob SHA-1 {blob}; "
                        f"the paper's is {FER_BLOB_SHA1}); results are not comparable to the paper")
    if backbone == "synthetic_macro":
        from .data import make_synthetic_macro
        from .pretrain import PretrainConfig, pretrain_trunk  # it trains a ResNet-18 fed by this module's preprocess
        macro = make_synthetic_macro(Path(data_dir) / "synthetic_macro", seed=seed)
        epochs = PretrainConfig.epochs if pretrain_epochs is None else pretrain_epochs
        trained = pretrain_trunk(macro, Path(work_dir) / "trunks", PretrainConfig(epochs=epochs, seed=seed,
                                                                                 device=device, precision=precision))
        return Backbone(load_trunk(trained.path, bn=trunk_bn), "synthetic_macro", trained.path,
                        f"{fallback}NOT the paper's FER+ backbone: ResNet-18 pre-trained by the kit on {len(macro)} "
                        f"synthetic macro-expression images (held-out accuracy {trained.val_accuracy:.2f})")
    torch.manual_seed(seed)
    return Backbone(load_trunk(None, allow_random=True, bn=trunk_bn), "random", None,
                    f"RANDOM ResNet-18 weights (seed {seed}): features are weak; results are not comparable to the "
                    "paper")
