"""AMAN (Wei et al., ICASSP 2022): layer4 per (frame, factor), magnification attention alpha, frame attention beta.

State-dict keys match the authors' implementation (layer4.*, alpha.0.*, beta.0.*, pred_fc.*) so their
checkpoints load as they are. In train mode layer4's BatchNorms see, as in the authors' loop, one batch per
(frame, factor) slice ('per_slice', the default) or, as one call over all maps would, one batch ('joint').
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from .batchnorm import GroupBatchNorm2d, batch_groups, use_group_batch_norm
from .checkpoints import check_architecture, read_state_dict

LAYER4_BN = ("per_slice", "joint")


def make_layer4(in_channels: int = 256) -> nn.Sequential:
    """ResNet-18 layer4: two BasicBlocks, in_channels -> 512, stride 2 (torchvision naming)."""
    downsample = nn.Sequential(conv1x1(in_channels, 512, stride=2), nn.BatchNorm2d(512))
    return nn.Sequential(BasicBlock(in_channels, 512, stride=2, downsample=downsample), BasicBlock(512, 512))


def side_by_side(module: nn.Module, copies: int, device=None) -> nn.Module:
    """`copies` independent copies of a module made of torchvision blocks, as one module on copies * C channels: copy
    m owns channels m*C to (m+1)*C of every tensor, each convolution is grouped by copy and each BatchNorm spans every
    copy's channels (so its statistics stay per copy). One call runs M models on their own inputs [n, M*C_in, H, W].
    The new weights are left uninitialised on `device`: fill them per copy (load_copy)."""
    new = copy.deepcopy(module).to("meta")
    for parent in new.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, name, nn.Conv2d(copies * child.in_channels, copies * child.out_channels,
                                                child.kernel_size, child.stride, child.padding, child.dilation,
                                                copies * child.groups, child.bias is not None, device="meta"))
            elif isinstance(child, nn.BatchNorm2d):
                wide = nn.BatchNorm2d(copies * child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats, device="meta")
                setattr(parent, name, GroupBatchNorm2d.adopt(wide, child.batch_stats)
                        if isinstance(child, GroupBatchNorm2d) else wide)
    return new.to_empty(device=device or "cpu")


@torch.no_grad()
def load_copy(wide: nn.Module, m: int, module: nn.Module) -> None:
    """Put `module`'s weights and BatchNorm statistics into copy m of its side_by_side form `wide`."""
    state = wide.state_dict()
    for name, value in module.state_dict().items():
        if name.endswith("num_batches_tracked"):  # one count for all copies: they take every step together
            state[name].copy_(value)
        else:
            target = state[name]
            target.view(-1, value.numel())[m].copy_(value.flatten())


def attention_weights(scores: torch.Tensor, on, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AMAN's attention sigmoid(s) and the weights of its weighted mean, sigmoid(s) / sum over `dim`, computed as
    softmax(log sigmoid(s)): the same numbers, but still defined when every sigmoid underflows to 0 (scores below
    about -100, e.g. after a large learning rate), where the paper's ratio gives 0 / 0 = NaN. Where `on` (a bool or
    a broadcastable bool tensor) is False the attention is ones and the weights uniform (the ablations)."""
    on = torch.as_tensor(on, device=scores.device)
    attention = torch.where(on, torch.sigmoid(scores), 1.0)
    weights = torch.where(on, torch.softmax(F.logsigmoid(scores), dim), 1.0 / scores.shape[dim])
    return attention, weights


HEAD_LAYERS = ("alpha.0", "beta.0", "pred_fc")  # AMANHead's Linear layers on pooled vectors, in z's order


def head_projection(params) -> tuple[torch.Tensor, torch.Tensor]:
    """AMANHead's three Linear layers as one, from its parameters by state-dict name (stacked over models or not):
    weight ..., J, 512 and bias ..., J with J = 2 + C (alpha's score, beta's score, the C classes)."""
    return (torch.cat([params[f"{n}.weight"] for n in HEAD_LAYERS], -2),
            torch.cat([params[f"{n}.bias"] for n in HEAD_LAYERS], -1))


def attend(z: torch.Tensor, use_alpha=True, use_beta=True):
    """AMAN's attention on z ..., F, K, J: the head's Linear layers applied to every pooled vector (head_projection).
    Alpha's weighted mean over factors, then beta's over frames, then the classifier equal these means taken of z,
    since the Linear layers commute with a mean whose weights sum to 1 -> logits ..., C, alpha ..., F, K, beta ..., F.
    use_alpha / use_beta: bools or bool tensors broadcastable to alpha / beta (off: a plain mean, the ablations)."""
    alpha, w_alpha = attention_weights(z[..., 0], use_alpha, -1)  # ..., F, K
    frame = (w_alpha[..., None] * z[..., 1:]).sum(-2)  # ..., F, 1 + C: beta's score and the classes of v_frame
    beta, w_beta = attention_weights(frame[..., 0], use_beta, -1)  # ..., F
    return (w_beta[..., None] * frame[..., 1:]).sum(-2), alpha, beta  # logits ..., C


class AMANHead(nn.Module):
    """AMAN after layer4: magnification attention alpha over factors, frame attention beta over frames, classifier.

    forward: pooled f [B, F, K, 512] -> (logits [B, C], alpha [B, F, K], beta [B, F]). A custom head for run_loso /
    run_sweep (`head=`) is any module built as head(num_classes, n_frames, n_factors) with this forward.
    """

    def __init__(self, num_classes: int, n_frames: int | None = None, n_factors: int | None = None,
                 use_alpha: bool = True, use_beta: bool = True):
        super().__init__()
        self.use_alpha, self.use_beta = use_alpha, use_beta  # ablation switches
        # magnification and frame attention; attend applies the sigmoid through attention_weights
        self.alpha = nn.Sequential(nn.Linear(512, 1), nn.Sigmoid())
        self.beta = nn.Sequential(nn.Linear(512, 1), nn.Sigmoid())
        self.pred_fc = nn.Linear(512, num_classes)

    @torch.no_grad()
    def zero_unused_attention(self, n_factors: int) -> None:
        """Zero the attention layers whose scores nothing reads (switched off, or alpha over one factor), so weight
        decay keeps them at 0: decayed towards 0 instead, they turn denormal, and every matmul that reads a denormal
        takes the CPU's slow path (measured: the sweep's ran 5x slower). Predictions do not change."""
        for layer, read in ((self.alpha[0], self.use_alpha and n_factors > 1), (self.beta[0], self.use_beta)):
            if not read:
                layer.weight.zero_()
                layer.bias.zero_()

    def forward(self, f: torch.Tensor):
        """f B, F, K, 512 -> logits B, C, alpha B, F, K, beta B, F. The weighted means are sum(alpha f) / sum(alpha),
        computed by attention_weights so that they stay finite; with use_alpha / use_beta off, a plain mean."""
        weight, bias = head_projection(dict(self.named_parameters()))  # J, 512 and J
        return attend(F.linear(f, weight, bias), self.use_alpha, self.use_beta)


class AMAN(AMANHead):
    """Attention-based Magnification-Adaptive Network on cached trunk features [B, F, K, C, 14, 14]: layer4 and
    average pooling per (frame, factor), then its head (AMANHead, whose modules sit at the top so the state-dict keys
    stay the authors').

    layer4_bn: in train mode layer4's BatchNorms use the statistics of each (frame, factor) slice's B clips
    ('per_slice', the authors') or of all B*F*K maps at once ('joint'); in eval mode both use the running ones.
    """

    def __init__(self, num_classes: int, in_channels: int = 256, init_layer4_from: str | Path | None = None,
                 use_alpha: bool = True, use_beta: bool = True, channels_last: bool = False, layer4: bool = True,
                 layer4_bn: str = "per_slice"):
        if layer4_bn not in LAYER4_BN:
            raise ValueError(f"layer4_bn must be one of {LAYER4_BN}, got {layer4_bn!r}")
        trunk = make_layer4(in_channels) if layer4 else None  # drawn before the head: a seed's weights as ever
        super().__init__(num_classes, use_alpha=use_alpha, use_beta=use_beta)
        self.channels_last, self.layer4_bn = channels_last, layer4_bn
        self.layer4 = trunk  # None: features come pooled (frozen layer4)
        if self.layer4 is not None and layer4_bn == "per_slice":
            use_group_batch_norm(self.layer4)  # same state dict; BatchNorm batches set in pool
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if init_layer4_from is not None:
            self.load_layer4(init_layer4_from)

    def load_layer4(self, path: str | Path) -> None:
        """Start layer4 from a pre-trained ResNet-18 checkpoint (FER+ or the kit's own trunk); its layer4.* must be
        exactly ResNet-18's, but num_batches_tracked may be absent (old FER+ files)."""
        state = {k: v for k, v in read_state_dict(path, "ResNet-18 checkpoint").items() if k.startswith("layer4.")}
        if not state:
            raise ValueError(f"{path}: no 'layer4.*' weights in this checkpoint, cannot initialise AMAN's layer4")
        target = {f"layer4.{k}": v for k, v in self.layer4.state_dict().items()}
        check_architecture(state, {k: v.shape for k, v in target.items()}, path,
                           f"ResNet-18 layer4 from {self.layer4[0].conv1.in_channels} channels",
                           may_lack=("num_batches_tracked",))
        self.layer4.load_state_dict({k.removeprefix("layer4."): state.get(k, v) for k, v in target.items()})

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """One layer4 call over all B*F*K maps, then global average pooling: -> B, F, K, 512. With per_slice each
        (frame, factor) slice's B maps are one BatchNorm batch, as in the authors' loop over slices."""
        B, F, K = x.shape[:3]
        x = x.flatten(0, 2)  # B*F*K, C, 14, 14: B clips of F*K slices, slice j*K + i (frame-major)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with batch_groups(self.layer4, F * K if self.layer4_bn == "per_slice" else 1):
            f = self.layer4(x)  # B*F*K, 512, 7, 7
        return self.avgpool(f).flatten(1).view(B, F, K, -1)  # B, F, K, 512

    def attend(self, f: torch.Tensor):
        """The head on pooled features f B, F, K, 512 -> logits, alpha, beta (AMANHead.forward)."""
        return super().forward(f)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if x.dim() != 6:
            raise ValueError(f"AMAN expects features [B, F, K, C, H, W], got shape {tuple(x.shape)}")
        logits, alpha, beta = self.attend(self.pool(x))
        return (logits, alpha, beta) if return_attention else logits

    @classmethod
    def from_checkpoint(cls, path: str | Path, num_classes: int | None = None, **kw) -> "AMAN":
        """Build a model whose class count is read from the checkpoint's pred_fc, then load it."""
        state = read_state_dict(path, "AMAN checkpoint")
        if "pred_fc.weight" not in state:
            raise ValueError(f"{path}: not an AMAN checkpoint (no 'pred_fc.weight'; keys start {list(state)[:3]})")
        model = cls(num_classes or state["pred_fc.weight"].shape[0], **kw)
        return model._load_state(state, path)

    def load_checkpoint(self, path: str | Path) -> "AMAN":
        """Load an AMAN checkpoint: plain state dict or {'state_dict': ...}, with or without 'module.'."""
        return self._load_state(read_state_dict(path, "AMAN checkpoint"), path)

    def _load_state(self, state: dict[str, torch.Tensor], path: str | Path) -> "AMAN":
        """Load a checkpoint's state after checking it fits this model: class count first, then every key and shape."""
        weight = state.get("pred_fc.weight")
        if weight is not None and weight.dim() == 2 and weight.shape[0] != self.pred_fc.out_features:
            raise ValueError(f"{path}: the checkpoint classifies {weight.shape[0]} classes (pred_fc has "
                             f"{weight.shape[0]} outputs) but the model has {self.pred_fc.out_features}; build it with "
                             f"AMAN.from_checkpoint(path) or num_classes={weight.shape[0]}")
        check_architecture(state, {k: v.shape for k, v in self.state_dict().items()}, path,
                           "AMAN checkpoint of this shape")
        self.load_state_dict(state)
        return self
